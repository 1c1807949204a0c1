"""Rollout throughput: vLLM (the project's engine) vs transformers `generate`, and scaling with the batch.

    .venv/bin/python -m bench.rollout_throughput [--prompts 8] [--n_samples 4] [--max_new_tokens 48]

Same prompts, same sampling settings, same dtype, both in this one process (vLLM in-process, as inside its
Ray actor). Prints generated tokens/s of each and their ratio, then vLLM completions/s at batch B and 4B
(target: time per completion flat or falling as the batch grows 4x).
"""
from __future__ import annotations

import argparse
import os
import time

import pyarrow as pa
import torch

from pipeline.arrow import numpy_to_ragged, ragged_to_numpy
from pipeline.chat import encode_prompt
from pipeline.data import builtin_prompts
from pipeline.models import load_causal_lm, load_tokenizer, resolve_model
from pipeline.rollout import RolloutConfig

for name, value in {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}",
                    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(name, value)  # what actors/cluster.py gives the engine actor

from actors.rollout import RolloutEngine  # noqa: E402


def prompt_table(tokenizer, count: int) -> pa.Table:
    messages = builtin_prompts()["prompt"].to_pylist()
    ids = [encode_prompt(tokenizer, messages[i % len(messages)]) for i in range(count)]
    return pa.table({"prompt_id": [str(i) for i in range(count)], "prompt_ids": numpy_to_ragged(ids, pa.int32())})


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: pa.Table, n: int, cfg: RolloutConfig) -> int:
    """Left-padded batch `generate` with the same sampling settings; returns generated tokens."""
    rows = [p.tolist() for p in ragged_to_numpy(prompts["prompt_ids"]) for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                         top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = out[:, width:]
    return int(((new != tokenizer.pad_token_id) | (torch.arange(new.shape[1]) == 0)).sum())  # EOS=pad counted once


def vllm_tokens(table: pa.Table) -> int:
    return sum(len(r) for r in ragged_to_numpy(table["response_ids"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n_samples", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()

    path = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    cfg = RolloutConfig(n_samples=args.n_samples, max_new_tokens=args.max_new_tokens, max_prompt_tokens=256,
                        cpus_per_engine=os.cpu_count())
    engine = RolloutEngine(path, args.dtype, "cpu", cfg)
    model = load_causal_lm(path, args.dtype)
    small, large = prompt_table(tokenizer, args.prompts), prompt_table(tokenizer, 4 * args.prompts)

    engine.generate(small.slice(0, 2))  # warm-up both
    hf_generate(model, tokenizer, small.slice(0, 2), 1, cfg)

    start = time.perf_counter()
    out = engine.generate(small)
    t_vllm = time.perf_counter() - start
    start = time.perf_counter()
    hf_tokens = hf_generate(model, tokenizer, small, args.n_samples, cfg)
    t_hf = time.perf_counter() - start
    start = time.perf_counter()
    out_large = engine.generate(large)
    t_large = time.perf_counter() - start

    completions = args.prompts * args.n_samples
    print(f"{args.prompts} prompts x {args.n_samples} samples, <= {args.max_new_tokens} new tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"  vLLM                    {vllm_tokens(out) / t_vllm:7.0f} tok/s  ({t_vllm:.1f} s)")
    print(f"  transformers generate   {hf_tokens / t_hf:7.0f} tok/s  ({t_hf:.1f} s)")
    print(f"vLLM / generate = {(vllm_tokens(out) / t_vllm) / (hf_tokens / t_hf):.2f}x (tokens/s)")
    per_small, per_large = t_vllm / completions, t_large / (4 * completions)
    print(f"batch {completions:4d} completions: {completions / t_vllm:6.2f} completions/s, {1000 * per_small:6.0f} ms each "
          f"({vllm_tokens(out) / completions:.0f} tokens avg)")
    print(f"batch {4 * completions:4d} completions: {4 * completions / t_large:6.2f} completions/s, {1000 * per_large:6.0f} ms each "
          f"({vllm_tokens(out_large) / (4 * completions):.0f} tokens avg)")
    print(f"time per completion, 4x batch / 1x batch = {per_large / per_small:.2f} (target <= 1.0: flat or better)")


if __name__ == "__main__":
    main()

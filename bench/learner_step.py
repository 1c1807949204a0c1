"""The learner's train phase against a bare forward+backward of the same tokens, and packed vs padded layout.

    .venv/bin/python -m bench.learner_step            # ~5 min on 2 cores

One process per measurement (its peak RSS is the measurement's own), 2 torch threads, the bundled SmolLM2-135M,
the compute dtype `auto` resolves to here. Batch: TRL's config (8 prompts x 4 completions, responses of 16..64
tokens), and a long-sequence batch (2 prompts x 2 completions of 1024 tokens) for memory. Random token ids:
the time and memory of a step do not depend on which tokens they are.

  learner  the real PolicyLearner.train_step (DeepSpeed ZeRO-2, one rank, AdamW step): the train phase
  packed   pipeline/policy.py: policy_forward + policy_loss + backward (the learner's math, no DeepSpeed)
  padded   the same loss on the previous layout (right padding, [B, T, V] float32 logits): the baseline
  bare     one forward+backward of the packed tokens, loss = sum of the chosen logits: the floor
Prints seconds (median of --repeats after one warm-up) and peak RSS of each, and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.machine import machine_line

BATCHES = {"trl": (8, 4, (16, 64)), "long": (2, 2, (1024, 1024))}  # prompts, completions, response lengths
VARIANTS = ("bare", "packed", "padded", "learner")


def make_rows(kind: str, seed: int = 0):
    from pipeline.data import builtin_prompts
    from pipeline.models import load_tokenizer, resolve_model

    prompts_n, samples, (low, high) = BATCHES[kind]
    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    rng = np.random.default_rng(seed)
    texts = builtin_prompts().column("prompt").to_pylist()[:prompts_n]
    prompts = [np.asarray(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=True, return_dict=False), np.int32) for messages in texts]
    prompt_ids = [p for p in prompts for _ in range(samples)]
    response_ids = [rng.integers(10, 49000, rng.integers(low, high + 1)).astype(np.int32) for _ in prompt_ids]
    return prompt_ids, response_ids


def padded_forward(model, prompt_ids, response_ids):
    """The previous layout: right padding, logits of every column from the first response column, gathered into
    [B, T, V] and cast to float32 (the baseline)."""
    import torch

    from pipeline.arrow import ragged_to_padded
    from pipeline.losses import token_logprobs

    sequences = [np.concatenate([p, r]) for p, r in zip(prompt_ids, response_ids)]
    input_ids, attention_mask = ragged_to_padded(sequences, 0, torch.long)
    targets, mask = ragged_to_padded(response_ids, 0, torch.long)
    positions = torch.tensor([len(p) for p in prompt_ids])[:, None] - 1 + torch.arange(targets.shape[1])[None]
    positions = positions.clamp(max=input_ids.shape[1] - 1)
    first = min(len(p) for p in prompt_ids) - 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(), logits_to_keep=input_ids.shape[1] - first,
                   use_cache=False).logits
    logits = logits.gather(1, (positions - first)[..., None].expand(-1, -1, logits.shape[-1])).float()
    return token_logprobs(logits, targets) * mask, mask


def measure(variant: str, kind: str, repeats: int, micro_batch_size: int, zero_stage: int = 2) -> dict:
    import torch

    from pipeline.models import ModelConfig, load_causal_lm, resolve_model
    from pipeline.policy import LearnerConfig, pack_rows, policy_forward, policy_loss
    from pipeline.precision import autocast, resolve_dtype

    torch.set_num_threads(2)
    prompt_ids, response_ids = make_rows(kind)
    path = resolve_model("smollm2-135m-instruct")
    dtype = resolve_dtype("auto", "cpu")
    cfg = LearnerConfig(ranks=1, micro_batch_size=micro_batch_size, dtype=dtype, lr=1e-6, zero_stage=zero_stage)
    chunks = [slice(s, s + micro_batch_size) for s in range(0, len(prompt_ids), micro_batch_size)]
    if variant == "learner":
        import pyarrow as pa

        from actors.learner import PolicyLearner
        from pipeline.arrow import numpy_to_ragged

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        learner = PolicyLearner(0, 1, "127.0.0.1", port, path, ModelConfig(name=path), cfg)
        zeros = [np.zeros(len(r), np.float32) for r in response_ids]
        rng = np.random.default_rng(1)
        table = pa.table({"prompt_ids": numpy_to_ragged(prompt_ids, pa.int32()),
                          "response_ids": numpy_to_ragged(response_ids, pa.int32()),
                          "sample_logprobs": numpy_to_ragged(zeros, pa.float32()),
                          "ref_logprobs": numpy_to_ragged(zeros, pa.float32()),
                          "advantages": numpy_to_ragged([rng.standard_normal(len(r)).astype(np.float32)
                                                         for r in response_ids], pa.float32())})
        step = lambda: learner.train_step(table)  # noqa: E731
    else:
        model = load_causal_lm(path, "float32")

        def step():
            for rows in chunks:
                prompts, responses = prompt_ids[rows], response_ids[rows]
                with autocast(dtype, "cpu"):
                    if variant == "bare":
                        packed = pack_rows(prompts, responses, "cpu")
                        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                       attention_mask=packed.attention_mask, logits_to_keep=packed.predict_at).logits
                        loss = logits[0].gather(-1, packed.targets[:, None]).float().sum()
                    else:
                        if variant == "packed":
                            logprobs, entropy, mask = policy_forward(model, prompts, responses, entropy_grad=False)
                        else:
                            (logprobs, mask), entropy = padded_forward(model, prompts, responses), None
                        advantages = torch.randn(mask.shape) * mask
                        loss, _ = policy_loss(logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, cfg,
                                              entropy=entropy)
                loss.backward()
            model.zero_grad(set_to_none=True)
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    tokens = int(sum(len(p) + len(r) for p, r in zip(prompt_ids, response_ids)))
    return {"variant": variant, "batch": kind, "dtype": dtype, "seconds": statistics.median(times), "tokens": tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro_batch_size", type=int, default=8, help="rows per forward pass in every variant")
    ap.add_argument("--zero_stage", type=int, default=2, help="the learner variant's ZeRO stage (configs/local.yaml: 2)")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.repeats, args.micro_batch_size, args.zero_stage)))
        return
    print(machine_line(), flush=True)
    results = {}
    for kind, variants in (("trl", VARIANTS), ("long", ("packed", "padded"))):
        for variant in variants:
            out = subprocess.run([sys.executable, "-m", "bench.learner_step", "--one", variant, kind, "--repeats",
                                  str(args.repeats), "--micro_batch_size", str(args.micro_batch_size),
                                  "--zero_stage", str(args.zero_stage)],
                                 check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            results[kind, variant] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[kind, variant]
            print(f"{kind:5s} {variant:8s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"({r['tokens']} tokens, {r['dtype']})", flush=True)
    t = lambda kind, v: results[kind, v]["seconds"]  # noqa: E731
    m = lambda kind, v: results[kind, v]["peak_rss_mb"]  # noqa: E731
    print(f"\ntrain phase (learner) / bare forward+backward: {t('trl', 'learner') / t('trl', 'bare'):.2f}x (target <= 1.3)")
    print(f"packed / padded time, TRL batch: {t('trl', 'packed') / t('trl', 'padded'):.2f}x; "
          f"long batch: {t('long', 'packed') / t('long', 'padded'):.2f}x")
    print(f"peak RSS, long batch: packed {m('long', 'packed'):.0f} MB vs padded {m('long', 'padded'):.0f} MB")


if __name__ == "__main__":
    main()

"""Endogenous scoring throughput: packed (the project's path) vs naive padded per-pair vs a bare forward pass.

    .venv/bin/python -m bench.endo_throughput [--pairs 48] [--dtype float32] [--pack_tokens 512]

All three run in this one process on the same HH pairs and the real model; the ratios are what to compare
(absolute tokens/s depend on the machine and its load). The project's path packs a pair's prompt once with
both responses behind it (tree mask) and runs the LM head only where a response token is predicted.
"bare forward" is the model (hidden states + full logits) on exactly the same packed tokens with no reward
arithmetic. tok/s counts the tokens of the pairs as given (prompt twice per pair) for all three.
Targets (issue 2): packed >= 0.9x bare forward, >= 2x padded.
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.chat import encode_prompt, encode_response
from pipeline.data import load_hh
from pipeline.endogenous import EndoRewardConfig, packed_hidden_states, prompt_shared_packs, score_endogenous
from pipeline.models import load_causal_lm, load_tokenizer, resolve_model


@torch.no_grad()
def padded_pair_scoring(model, prompts, responses, pad_id):
    """The naive way: each (chosen, rejected) pair as a right-padded batch of 2, full logits, float32 log-softmax."""
    for i in range(0, len(prompts), 2):
        seqs = [prompts[j] + responses[j] for j in (i, i + 1)]
        width = max(map(len, seqs))
        ids = torch.full((2, width), pad_id)
        mask = torch.zeros((2, width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        values = torch.logsumexp(logits, dim=-1)
        for row, j in enumerate((i, i + 1)):
            p, h = len(prompts[j]), len(responses[j])
            q = logits[row, p - 1:p + h - 1].gather(-1, torch.tensor(responses[j])[:, None]).squeeze(-1)
            v_next = torch.cat([values[row, p:p + h - 1], torch.zeros(1)])
            _ = (q - v_next).sum(), logprobs[row, p - 1:p + h - 1]


@torch.no_grad()
def bare_forward(model, prompts, responses, pack_tokens):
    """The model on exactly the packed, prompt-shared tokens the scorer uses: hidden states + full logits."""
    for _, segments in prompt_shared_packs(prompts, responses, pack_tokens):
        model.get_output_embeddings()(packed_hidden_states(model, segments))


def best_times(methods: dict, rounds: int) -> dict[str, float]:
    """Best wall time of each method over `rounds`, the methods interleaved (ABCABC) so that load drifting on a
    shared machine hits all of them alike."""
    for fn in methods.values():
        fn()  # warm-up
    best = {name: float("inf") for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--pack_tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/hh_harmless_base_test.jsonl")
    args = ap.parse_args()

    path = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_causal_lm(path, args.dtype), load_tokenizer(path)
    pairs, _ = load_hh(args.data)
    pairs = pairs.slice(0, args.pairs)
    prompts, responses = [], []
    for messages, chosen, rejected in zip(pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist()):
        p = encode_prompt(tokenizer, messages)
        prompts += [p, p]
        responses += [encode_response(tokenizer, chosen), encode_response(tokenizer, rejected)]
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    cfg = EndoRewardConfig(pack_tokens=args.pack_tokens)

    best = best_times({"packed": lambda: score_endogenous(model, prompts, responses, [True] * len(prompts), cfg),
                       "bare": lambda: bare_forward(model, prompts, responses, args.pack_tokens),
                       "padded": lambda: padded_pair_scoring(model, prompts, responses, tokenizer.pad_token_id)},
                      args.repeats)
    t_packed, t_bare, t_padded = best["packed"], best["bare"], best["padded"]

    print(f"{args.pairs} HH pairs, {tokens} tokens, {args.dtype}, pack_tokens={args.pack_tokens}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} interleaved rounds")
    for name, t in (("packed scoring", t_packed), ("bare forward (same packs)", t_bare), ("padded per-pair scoring", t_padded)):
        print(f"  {name:28s} {tokens / t:8.0f} tok/s")
    print(f"packed / bare forward = {t_bare / t_packed:.2f}x  (target >= 0.9x)")
    print(f"packed / padded       = {t_padded / t_packed:.2f}x  (target >= 2x)")


if __name__ == "__main__":
    main()

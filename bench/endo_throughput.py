"""Endogenous scoring throughput: packed (the project's path) vs naive padded per-pair vs a bare forward pass.

    .venv/bin/python -m bench.endo_throughput [--pairs 48] [--dtype float32] [--pack_tokens 512]

All three run in this one process on the same HH pairs and the real model; the ratios are what to compare
(absolute tokens/s depend on the machine and its load). The project's path packs a pair's prompt once with
both responses behind it (tree mask) and runs the LM head only where a response token is predicted.
"bare forward" is the model (hidden states + full logits) on exactly the same packed tokens with no reward
arithmetic. tok/s counts the tokens of the pairs as given (prompt twice per pair) for all three.
Targets (issue 2): packed >= 0.9x bare forward, >= 2x padded.

--forms raw,centered,pmi,contrastive (issue 12) then times score_endogenous once per reward form on the same pairs,
interleaved: each form's time relative to raw next to the tokens it scores relative to raw (pmi scores each
response after its own prompt and after x0, contrastive after the prompt, x+principle and x+anti). Target: a
form's time ratio is at most its token ratio (a second context costs no more than the tokens it adds).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from pipeline.chat import encode_contexts, encode_prompt, encode_response
from pipeline.data import load_hh
from pipeline.endogenous import FORMS, EndoRewardConfig, packed_hidden_states, prompt_shared_packs, score_endogenous
from pipeline.models import load_causal_lm, load_tokenizer, resolve_model

from bench.machine import machine_line


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
    ap.add_argument("--forms", default="", help=f"also time these reward forms against raw (comma-separated: {','.join(FORMS)})")
    ap.add_argument("--skip_methods", action="store_true", help="time only --forms, not packed vs bare vs padded")
    args = ap.parse_args()

    path = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_causal_lm(path, args.dtype), load_tokenizer(path)
    pairs, _ = load_hh(args.data)
    pairs = pairs.slice(0, args.pairs)
    prompts, responses, messages_of = [], [], []
    for messages, chosen, rejected in zip(pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist()):
        p = encode_prompt(tokenizer, messages)
        prompts += [p, p]
        messages_of += [messages, messages]
        responses += [encode_response(tokenizer, chosen), encode_response(tokenizer, rejected)]
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    cfg = EndoRewardConfig(pack_tokens=args.pack_tokens)

    print(machine_line())
    if not args.skip_methods:
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

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if forms:
        time_forms(model, tokenizer, prompts, responses, messages_of, cfg, ["raw"] + [f for f in forms if f != "raw"],
                   args.repeats, args.dtype)


def time_forms(model, tokenizer, prompts, responses, messages_of, cfg, forms, repeats, dtype) -> None:
    """Each reward form's score_endogenous on the same rows, interleaved; time and scored tokens relative to raw."""
    window = model.config.max_position_embeddings
    runs, scored = {}, {}
    for form in forms:
        form_cfg = dataclasses.replace(cfg, form=form)
        contexts = [encode_contexts(tokenizer, m, r, window, form_cfg) for m, r in zip(messages_of, responses)]
        k = len(contexts[0])  # rows, then every row after its j-th context, as score_endogenous packs them
        rows_p, rows_r = list(prompts) + [c[j] for j in range(k) for c in contexts], list(responses) * (1 + k)
        scored[form] = sum(len(p) + sum(map(len, rs)) for _, segments in prompt_shared_packs(rows_p, rows_r, cfg.pack_tokens)
                           for p, rs in segments)  # the tokens its packs hold (a shared prompt counted once)
        runs[form] = (lambda c=form_cfg, x=contexts: score_endogenous(model, prompts, responses, [True] * len(prompts), c, x))
    best = best_times(runs, repeats)
    print(f"reward forms, {len(prompts) // 2} HH pairs, {dtype}, best of {repeats} interleaved rounds")
    print(f"  {'form':12s} {'seconds':>8s} {'time/raw':>9s} {'tokens/raw':>11s} {'scored tok/s':>13s}")
    for form in forms:
        print(f"  {form:12s} {best[form]:8.2f} {best[form] / best['raw']:8.2f}x {scored[form] / scored['raw']:10.2f}x "
              f"{scored[form] / best[form]:13.0f}")


if __name__ == "__main__":
    main()

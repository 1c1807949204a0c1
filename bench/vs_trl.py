"""EndoRL's RL loop against TRL's GRPOTrainer, back to back on this machine, at TRL's config.

    make .venv-trl/.installed                   # TRL in its own environment (bench only, never a runtime dependency)
    .venv/bin/python -m bench.vs_trl            # both runs, then the table; ~15 min on 2 cores

Same model (the bundled SmolLM2-135M-Instruct), the same builtin prompts, 8 prompts x 4 completions of <= 64
tokens at temperature 1, KL weight 0.04, lr 1e-6, one optimizer step per batch (on-policy), the same precision
policy (EndoRL's dtype auto as resolved here: bf16 autocast with fp32 weights where the CPU has native bf16, else
fp32; TRL gets --bf16 when EndoRL resolves bf16), and a one-forward frozen-model reward on each side (TRL: the
frozen model's log-likelihood; EndoRL: the endogenous reward, which also gives the KL reference).
Steps 2..N, median (step 1 holds the warm-up). Prints completions/s of each and the ratio, and each one's phases.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from pipeline.data import builtin_prompts
from pipeline.models import resolve_model
from bench.machine import cpu_model, machine_line
from pipeline.precision import resolve_dtype

TRL_PYTHON = ".venv-trl/bin/python"


def median_phases(steps: list[dict]) -> dict:
    return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in steps[0]}


def run_trl(args, model_dir: str, bf16: bool) -> dict:
    prompts = os.path.join(args.work, "prompts.json")
    json.dump(builtin_prompts().column("prompt").to_pylist(), open(prompts, "w"))
    out = os.path.join(args.work, "trl.json")
    command = [TRL_PYTHON, "bench/trl_grpo.py", "--model", model_dir, "--prompts", prompts, "--out", out,
               "--steps", str(args.steps), "--prompts_per_step", str(args.prompts_per_step), "--n_samples",
               str(args.n_samples), "--max_new_tokens", str(args.max_new_tokens), "--beta", str(args.beta), "--lr",
               str(args.lr), *(["--bf16"] if bf16 else [])]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.load(open(out))


def run_endorl(args) -> list[dict]:
    storage = os.path.join(args.work, "endorl")
    command = [sys.executable, "-m", "jobs.rlhf", "--config", "configs/local.yaml", "--storage", storage,
               "--steps", str(args.steps), "--prompts_per_step", str(args.prompts_per_step), "--rollout.n_samples",
               str(args.n_samples), "--rollout.max_new_tokens", str(args.max_new_tokens), "--learner.kl_coef",
               str(args.beta), "--learner.lr", str(args.lr), "--eval_every", "0", "--checkpoint_every", "0",
               "--sync_check_every", "0", "--export", "false"]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = [json.loads(line) for line in open(os.path.join(storage, "metrics.jsonl")) if '"time/step"' in line]
    return [{"step": r["time/step"], "rollout": r.get("time/rollout", 0.0),
             "score": r.get("time/score", 0.0) + r.get("time/values", 0.0),
             "train": r.get("time/train", 0.0) + r.get("time/experience", 0.0), "sync": r.get("time/sync", 0.0)}
            for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts_per_step", type=int, default=8)
    ap.add_argument("--n_samples", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--work", default="runs/bench_vs_trl")
    args = ap.parse_args()
    if not os.path.exists(TRL_PYTHON):
        raise SystemExit(f"{TRL_PYTHON} is missing. Fix: make .venv-trl/.installed")
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2: step 1 holds the warm-up and is not counted")
    os.makedirs(args.work, exist_ok=True)
    dtype = resolve_dtype("auto", "cpu")
    print(f"{machine_line()}; dtype auto -> {dtype}", flush=True)
    model_dir = resolve_model("smollm2-135m-instruct")

    trl = median_phases(run_trl(args, model_dir, dtype == "bfloat16")["steps"][1:])
    endorl = median_phases(run_endorl(args)[1:])
    completions = args.prompts_per_step * args.n_samples
    print(f"\nCPU: {cpu_model()}; dtype {dtype}; {args.prompts_per_step} prompts x {args.n_samples} completions of "
          f"<= {args.max_new_tokens} tokens; steps 2-{args.steps}, median seconds")
    print("| run | s/step | completions/s | vs TRL | rollout | score (+ref) | train | sync |")
    print("|---|---|---|---|---|---|---|---|")
    for name, p in [("TRL GRPOTrainer", trl), ("EndoRL jobs.rlhf", endorl)]:
        print(f"| {name} | {p['step']:.1f} | {completions / p['step']:.3f} | {trl['step'] / p['step']:.2f}x | "
              f"{p['rollout']:.1f} | {p['score']:.1f} | {p['train']:.1f} | {p.get('sync', 0.0):.1f} |")


if __name__ == "__main__":
    main()

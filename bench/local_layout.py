"""The fastest local layout, measured: learner ranks, threads per rank and micro-batch size on this machine.

    .venv/bin/python -m bench.local_layout            # ~15 min on 2 cores

Each layout runs `jobs.rlhf --config configs/local.yaml` for --steps steps (no eval, checkpoint or sync check),
back to back in this script; prints the median (steps 2..N) of the step and of its phases, and each layout's
step time relative to the first (the layout configs/local.yaml had before packing: 2 ranks x 1 CPU, 4 rows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench.machine import machine_line

LAYOUTS = {  # name -> overrides of configs/local.yaml
    "2 ranks x 1 cpu, 4 rows": ["--learner.ranks", "2", "--learner.cpus_per_rank", "1", "--learner.micro_batch_size", "4"],
    "2 ranks x 1 cpu, 8 rows": ["--learner.ranks", "2", "--learner.cpus_per_rank", "1", "--learner.micro_batch_size", "8"],
    "1 rank x 2 cpus, 8 rows": ["--learner.ranks", "1", "--learner.cpus_per_rank", "2", "--learner.micro_batch_size", "8"],
    "1 rank x 2 cpus, 16 rows": ["--learner.ranks", "1", "--learner.cpus_per_rank", "2", "--learner.micro_batch_size", "16"],
}
PHASES = ("step", "rollout", "score", "train", "sync")


def run(name: str, overrides: list[str], args) -> dict[str, float]:
    storage = os.path.join(args.work, name.replace(" ", "_").replace(",", ""))
    command = [sys.executable, "-m", "jobs.rlhf", "--config", "configs/local.yaml", "--storage", storage, "--steps",
               str(args.steps), "--eval_every", "0", "--checkpoint_every", "0", "--sync_check_every", "0",
               "--export", "false", *overrides]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(os.path.join(storage, "metrics.jsonl")) if '"time/step"' in line][1:]
    return {phase: statistics.median(r.get(f"time/{phase}", 0.0) for r in rows) for phase in PHASES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", default="runs/bench_layout")
    ap.add_argument("--layouts", default="", help="comma-separated indexes into LAYOUTS (default: all)")
    args = ap.parse_args()
    print(machine_line(), flush=True)
    results = {}
    chosen = [list(LAYOUTS)[int(i)] for i in args.layouts.split(",")] if args.layouts else list(LAYOUTS)
    for name in chosen:
        overrides = LAYOUTS[name]
        results[name] = run(name, overrides, args)
        print(name, {k: round(v, 1) for k, v in results[name].items()}, flush=True)
    first = results[chosen[0]]["step"]
    print(f"\n| layout | s/step | vs first | {' | '.join(PHASES[1:])} |\n|---|---|---|{'---|' * (len(PHASES) - 1)}")
    for name, r in results.items():
        print(f"| {name} | {r['step']:.1f} | {first / r['step']:.2f}x | "
              + " | ".join(f"{r[p]:.1f}" for p in PHASES[1:]) + " |")


if __name__ == "__main__":
    main()

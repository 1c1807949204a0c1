"""Where an RL step's time goes: per-phase breakdown, weight-sync share, and the Ray/Arrow/driver overhead share.

    .venv/bin/python -m bench.rl_step --run runs/local        # read a finished run of jobs.rlhf
    .venv/bin/python -m bench.rl_step                          # first run configs/local.yaml into runs/bench_rl

Phases come from the run's metrics.jsonl (steps after the first, which includes warm-up). The overhead share
is measured here, in this process, against the same run: the batch tables of one step make a fixed number of
object-store hops between actors (prompts -> engine, rollouts -> scorer, scored -> concat -> experience ->
learners, experience -> each learner rank); each hop is timed as a real round trip of an Arrow table of the
run's batch size through an actor, plus the driver's own time outside every phase.
Targets (issue 3): sync <= 5% of a step, driver/Arrow/Ray overhead <= 5%.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import pyarrow as pa
import ray

from pipeline.arrow import numpy_to_ragged

HOPS_PER_STEP = 7  # prompts->engine, rollout->scorer, scored->concat, ->experience, experience->2 ranks, metrics


@ray.remote(num_cpus=0)
class Echo:
    def take(self, table: pa.Table) -> int:
        return table.num_rows  # the table arrived (deserialised from the object store)


def batch_like(rows: int, prompt_len: int, response_len: int) -> pa.Table:
    """An Arrow table shaped like one step's scored experience."""
    rng = np.random.default_rng(0)
    ints = lambda n: [rng.integers(0, 49152, n) for _ in range(rows)]  # noqa: E731
    floats = lambda n: [rng.standard_normal(n).astype(np.float32) for _ in range(rows)]  # noqa: E731
    return pa.table({"prompt_ids": numpy_to_ragged(ints(prompt_len), pa.int32()),
                     "response_ids": numpy_to_ragged(ints(response_len), pa.int32()),
                     **{name: numpy_to_ragged(floats(response_len), pa.float32())
                        for name in ("sample_logprobs", "ref_logprobs", "token_rewards", "advantages", "returns")}})


def hop_seconds(table: pa.Table, repeats: int = 20) -> float:
    """Median time to ray.put a table and have an actor receive it."""
    echo = Echo.remote()
    ray.get(echo.take.remote(ray.put(table)))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ray.get(echo.take.remote(ray.put(table)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="folder of a finished jobs.rlhf run (default: run configs/local.yaml)")
    args = ap.parse_args()
    run = args.run
    if not run:
        from jobs import rlhf
        run = rlhf.main(["--config", "configs/local.yaml", "--storage", "runs/bench_rl", "--steps", "6",
                         "--eval_every", "0", "--checkpoint_every", "0"])
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    steps = [r for r in rows if "time/step" in r][1:]  # skip step 1 (warm-up)
    if not steps:
        raise SystemExit(f"{run}/metrics.jsonl has fewer than 2 training steps")
    phases = sorted({k for r in steps for k in r if k.startswith("time/")})
    mean = {k: statistics.mean(r.get(k, 0.0) for r in steps) for k in phases}  # a phase absent in a step took 0 s
    step_time = mean["time/step"]
    print(f"run {run}: {len(steps)} steps after warm-up, mean step {step_time:.2f} s")
    for key, value in sorted(mean.items(), key=lambda kv: -kv[1]):
        if key not in ("time/step",):
            print(f"  {key[5:]:16s} {value:7.3f} s  {100 * value / step_time:5.1f}%")

    import yaml
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    rows_per_step = cfg["prompts_per_step"] * cfg["rollout"]["n_samples"]
    response_len = int(statistics.mean(r["rollout/response_length"] for r in steps))
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    hop = hop_seconds(batch_like(rows_per_step, 64, response_len))
    transfer = HOPS_PER_STEP * hop
    driver = mean.get("time/driver_overhead", 0.0)
    print(f"sync share:      {100 * mean.get('time/sync', 0.0) / step_time:5.2f}% of a step (target <= 5%)")
    print(f"overhead share:  {100 * (transfer + driver) / step_time:5.2f}% of a step (target <= 5%): "
          f"{HOPS_PER_STEP} object-store hops x {1000 * hop:.1f} ms ({rows_per_step} rows) + driver {1000 * driver:.1f} ms")


if __name__ == "__main__":
    main()

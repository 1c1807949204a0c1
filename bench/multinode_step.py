"""The cost of going multi-node: an RL step on a 3-node Ray cluster on this machine vs the same step in local mode.

    .venv/bin/python -m bench.multinode_step [--steps 5] [--model smollm2-135m-instruct]

Starts the test cluster of tests/multinode.py (a head and two worker nodes as separate raylets, each worker in its
own mount namespace with a private /tmp and home cache, token auth on), submits jobs.rlhf with `ray job submit
--working-dir .` with the scorer pinned to the head, the vLLM engine to worker0 and both DeepSpeed ranks to worker1,
then runs the same config in local mode (one embedded Ray) right after. Prints which actor ran on which node, and
per phase the mean seconds of steps 2..N (step 1 warms up) of both runs with their ratio. Same machine, same
cores: the ratio is the overhead of crossing raylets (object transfers between nodes, per-node workers), not of a
network.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench.machine import machine_line
from tests.multinode import LocalCluster, NodeSpec, REPO_ROOT

HEAD = NodeSpec(1, {"endorl_scorer": 4})
WORKERS = (NodeSpec(1, {"endorl_engine": 4}), NodeSpec(2, {"endorl_learner": 4}))
PINS = ["--scorer_resources", "{endorl_scorer: 1}", "--rollout.resources", "{endorl_engine: 1}",
        "--learner.resources", "{endorl_learner: 1}"]


def rl_args(model: str, storage: str, steps: int) -> list[str]:
    return ["--config", "configs/local.yaml", "--model.name", model, "--storage", storage, "--steps", str(steps),
            "--prompts_per_step", "4", "--rollout.n_samples", "4", "--rollout.max_new_tokens", "32",
            "--rollout.cpus_per_engine", "1", "--scorer_cpus", "1", "--eval_every", "0", "--checkpoint_every", "0",
            "--sync_check_every", "0", "--placement.timeout_s", "300"]


def step_means(storage: str) -> dict[str, float]:
    rows = [json.loads(line) for line in open(os.path.join(storage, "metrics.jsonl"))]
    steps = [row for row in rows if "time/step" in row][1:]
    keys = sorted({key for row in steps for key in row if key.startswith("time/")})
    return {key[5:]: statistics.mean(row.get(key, 0.0) for row in steps) for key in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled name (converted on each node), or a "
                                                                       "folder every node sees")
    args = ap.parse_args()
    print(machine_line())

    with LocalCluster(workers=WORKERS, head=HEAD) as cluster:
        storage = str(cluster.shared_dir / "multinode")
        result = cluster.submit_cli(["python", "-m", "jobs.rlhf", *rl_args(args.model, storage, args.steps), *PINS,
                                     "--local", "false"],  # configs/local.yaml says local: true
                                    timeout_s=1800)
        if result.status != "SUCCEEDED":
            raise SystemExit(f"multi-node run ended {result.status}:\n{result.output[-4000:]}")
        nodes = json.load(open(os.path.join(storage, "nodes.json")))
        names = {node_id: name for name, node_id in cluster.node_ids.items()}
        multi = step_means(storage)

    local_storage = tempfile.mkdtemp(prefix="bench-local-")
    subprocess.run([sys.executable, "-m", "jobs.rlhf", "--local", *rl_args(args.model, local_storage, args.steps)],
                   cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    local = step_means(local_storage)

    print("\n| actor | node |\n|---|---|")
    for role, where in nodes.items():
        for i, node in enumerate(where):
            print(f"| {role} {i} | {names.get(node['node_id'], node['node_id'][:8])} ({node['node_id'][:8]}) |")
    print(f"\nmean of steps 2..{args.steps}, seconds\n\n| phase | local | multi-node | multi / local |\n|---|---|---|---|")
    for phase in ["step"] + [p for p in multi if p != "step"]:
        base = local.get(phase, 0.0)
        ratio = f"{multi[phase] / base:.2f}x" if base > 1e-3 else "-"
        print(f"| {phase} | {base:.3f} | {multi[phase]:.3f} | {ratio} |")


if __name__ == "__main__":
    main()

"""Job entrypoint for tests/test_multinode.py: what does each node of the cluster see?

Run as a Ray job with `--working-dir .`: connects with ray.init(), runs one task pinned to each alive node and
prints one line `MULTINODE_PROBE {json}` with, for the driver and for every node: its node id, its mount
namespace, whether the project's packages import and from where, which of the given paths exist there, and
whether the shared folder is readable and writable from there (each node writes `from-<node id>` into it).

    python tests/multinode_probe.py --shared DIR --path home=/root/.cache/x/marker --path tmp=/tmp/y/marker
"""
import argparse
import importlib
import json
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

PACKAGES = ("pipeline", "actors", "jobs")


def look(paths: dict, shared: str, expected: str) -> dict:
    node_id = ray.get_runtime_context().get_node_id()
    imports = {}
    for pkg in PACKAGES:
        try:
            imports[pkg] = importlib.import_module(pkg).__file__
        except Exception as e:  # reported, not raised: the test says which node failed and why
            imports[pkg] = f"ERROR {e!r}"
    marker = os.path.join(shared, "marker")
    try:
        with open(marker) as f:
            shared_read = f.read() == expected
        with open(os.path.join(shared, f"from-{node_id}"), "w") as f:
            f.write(node_id)
        shared_write = True
    except OSError:
        shared_read = shared_write = False
    return {
        "node_id": node_id,
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "mnt_ns": os.readlink("/proc/self/ns/mnt"),
        "imports": imports,
        "exists": {name: os.path.exists(p) for name, p in paths.items()},
        "shared_read": shared_read,
        "shared_write": shared_write,
    }


@ray.remote(num_cpus=0)
def look_remote(paths: dict, shared: str, expected: str) -> dict:
    return look(paths, shared, expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", required=True, help="shared folder holding `marker`")
    parser.add_argument("--expected", required=True, help="the content of the shared marker")
    parser.add_argument("--path", action="append", default=[], help="NAME=PATH whose existence each node reports")
    args = parser.parse_args()
    paths = dict(p.split("=", 1) for p in args.path)

    ray.init()  # RAY_ADDRESS is set by the job supervisor
    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = {
        n["NodeID"]: look_remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(paths, args.shared, args.expected)
        for n in nodes
    }
    result = {
        "driver": look(paths, args.shared, args.expected),
        "head_node_ids": [n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"]],
        "tasks": {node_id: ray.get(ref, timeout=300) for node_id, ref in refs.items()},
    }
    print("MULTINODE_PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Where each role runs: one placement group per role, reserved all or nothing, with a bounded wait.

  - learner ranks: PACK (the ranks of one group on as few nodes as possible: NCCL inside a node is fastest)
  - rollout engines and scorers: SPREAD (one node lost takes as few of them as possible)

Every request is per actor and must fit one node: CPUs, GPUs and custom resources come from config (a role can
be pinned to a node type with a custom resource the node type advertises, e.g. `--learner.resources
'{gpu8_node: 1}'`), never from a cluster total. An autoscaling cluster adds nodes for a pending placement group in
minutes, so the wait is long and says what it waits for; when it ends, the error names the request and the nodes.
"""
from __future__ import annotations

import dataclasses
import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import opt


@dataclasses.dataclass
class PlacementConfig:
    timeout_s: float = opt(600, "how long a role waits for the cluster to have room for it (an autoscaler adds "
                                "nodes in minutes), then fails naming what it waited for")
    report_every_s: float = opt(30, "while waiting, print what is still pending every so many seconds")


def bundle(cpus: float, gpus: float, resources: dict | None = None) -> dict[str, float]:
    """One actor's request: {"CPU": .., "GPU": .. (only if > 0), custom resources ..}."""
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {}), **{k: float(v) for k, v in (resources or {}).items()}}


def gpus_for(device: str, gpus: float) -> float:
    """A cuda role asks for a GPU per actor unless told otherwise; a cpu role never does."""
    return (gpus or 1.0) if device == "cuda" else gpus


def node_resources() -> list[dict[str, float]]:
    """Total resources of every alive node (what a single actor can at most be given)."""
    return [{k: v for k, v in node["Resources"].items() if not k.startswith("node:")}
            for node in ray.nodes() if node["Alive"]]


def fits(request: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) >= amount for name, amount in request.items() if amount > 0)


def describe_nodes(nodes: list[dict[str, float]]) -> str:
    return "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(n.items()) if k in ("CPU", "GPU") or "memory" not in k)
                     for n in nodes) or "none"


def reserve(role: str, bundles: list[dict[str, float]], strategy: str, cfg: PlacementConfig) -> PlacementGroup:
    """A placement group of `bundles` for `role`, ready; or a RuntimeError after cfg.timeout_s naming the request."""
    group = placement_group(bundles, strategy=strategy, name=f"endorl-{role}")
    started = time.monotonic()
    while True:
        ready, _ = ray.wait([group.ready()], timeout=min(cfg.report_every_s, cfg.timeout_s))
        if ready:
            return group
        waited = time.monotonic() - started
        nodes = node_resources()
        what = f"{len(bundles)} x {bundles[0]} ({strategy}) for the {role}"
        if waited >= cfg.timeout_s:
            remove_placement_group(group)
            no_node = "" if any(fits(bundles[0], node) for node in nodes) else " No node of the cluster has room for even one of them."
            gpu_hint = (" The cluster has no GPU: use --model.device cpu, or add GPU nodes."
                        if bundles[0].get("GPU") and not any(node.get("GPU") for node in nodes) else "")
            raise RuntimeError(f"waited {waited:.0f} s for {what}; the nodes are: {describe_nodes(nodes)}.{no_node}{gpu_hint} "
                               f"Fix: ask for less per actor (the role's cpus/gpus/resources options), fewer actors, "
                               f"a node type that fits them, or a longer --placement.timeout_s while an autoscaler "
                               f"adds nodes.")
        print(f"waiting for {what}: {waited:.0f} s of {cfg.timeout_s:g} s (nodes: {describe_nodes(nodes)})", flush=True)


def in_bundle(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)


def node_of(actor) -> dict:
    """Where an actor runs: Ray node id, IP and host name, its actor id, and the files Ray sends its stdout and
    stderr to on its node (recorded in the run log)."""
    def where(_self):
        import os
        import socket
        context = ray.get_runtime_context()
        files = {name: os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
                 for name, fd in (("stdout_file", 1), ("stderr_file", 2))}
        return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "actor_id": context.get_actor_id(), **files}
    return actor.__ray_call__.remote(where)


def wait_for_room(role: str, request: dict[str, float], cfg: PlacementConfig) -> None:
    """Block until the cluster could place one actor of `role` (an autoscaler may add a node for it), or fail
    after cfg.timeout_s naming the request: for work handed to a library (Ray Data) that would wait forever."""
    remove_placement_group(reserve(role, [request], "PACK", cfg))

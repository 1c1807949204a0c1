"""Weight sync that scales: the policy streamed from learner rank 0 to every rollout engine in fixed-size buckets
over a torch.distributed broadcast group (gloo on CPU, NCCL on GPU: the same code, the backend from the device).

Pure torch, no Ray. The group is its own: a TCPStore on learner rank 0's node and a ProcessGroupGloo/NCCL made
from it, apart from DeepSpeed's group (the learners) and vLLM's (inside each engine). Rank 0 of the sync group
is learner rank 0; engines are ranks 1..E.

A sync is a `plan`: the policy's parameters in order, cut into buckets of at most `bucket_bytes` in the sync dtype
(a larger tensor is a bucket of its own). For each bucket rank 0 copies the parameters into one flat buffer and
broadcasts it; each engine receives into a flat buffer of its own and hands views of it to vLLM's
`reload_weights`, which copies them into the engine's own weights. So the extra memory on either side is one
bucket (plus, on the learners, the one ZeRO-3 parameter being gathered), never the model.
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Callable, ContextManager, Iterator, Literal

import torch
import torch.distributed as dist

from pipeline.config import opt
from pipeline.precision import DTYPES

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclasses.dataclass
class SyncConfig:
    mode: Literal["broadcast", "object_store"] = opt(
        "broadcast", "broadcast: stream buckets over a torch.distributed group (gloo/NCCL) from learner rank 0 to the "
                     "engines; object_store: rank 0's full state dict through Ray's object store (the fallback)")
    bucket_mb: float = opt(512, "bucket size of the broadcast, MiB: the extra memory a sync needs on each side")

    def __post_init__(self):
        if not self.bucket_mb > 0:
            raise ValueError(f"sync.bucket_mb must be > 0, got {self.bucket_mb}. Fix: --sync.bucket_mb 256")


@dataclasses.dataclass(frozen=True)
class Bucket:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def numel(self) -> int:
        return sum(shape_numel(s) for s in self.shapes)


def shape_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def bucket_plan(params: list[tuple[str, tuple[int, ...]]], dtype: str, bucket_bytes: int) -> list[Bucket]:
    """The parameters (name, shape), in order, cut into buckets of at most bucket_bytes; a larger one goes alone."""
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    buckets, names, shapes, used = [], [], [], 0
    for name, shape in params:
        size = shape_numel(shape) * itemsize
        if names and used + size > bucket_bytes:
            buckets.append(Bucket(tuple(names), tuple(shapes)))
            names, shapes, used = [], [], 0
        names.append(name)
        shapes.append(tuple(int(d) for d in shape))
        used += size
    return buckets + [Bucket(tuple(names), tuple(shapes))] if names else buckets


class SyncGroup:
    """One member of the broadcast group: rank 0 (learner rank 0) hosts the store; every member calls this at
    the same time (the store waits for all of them, up to `timeout_s`)."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, device: str, timeout_s: float = 600):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        if BACKENDS[device] == "nccl":
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self.rank, self.device = rank, device

    def broadcast(self, flat: torch.Tensor) -> None:
        self.group.broadcast(flat, 0).wait()


def send_buckets(group: SyncGroup | None, plan: list[Bucket], dtype: str,
                 gathered: Callable[[str], ContextManager[torch.Tensor]]) -> None:
    """Learner ranks: for each bucket, each parameter in turn is gathered (`gathered(name)`: a context holding the
    full tensor; a ZeRO-3 all-gather, so every rank runs this) and rank 0 (`group` not None) copies it into one
    flat buffer in the sync dtype, then broadcasts the buffer."""
    for bucket in plan:
        flat = None if group is None else torch.empty(bucket.numel(), dtype=DTYPES[dtype], device=group.device)
        offset = 0
        for name, shape in zip(bucket.names, bucket.shapes):
            n = shape_numel(shape)
            with gathered(name) as tensor:
                if flat is not None:
                    flat[offset:offset + n].copy_(tensor.detach().reshape(-1))  # cast to the sync dtype here
            offset += n
        if group is not None:
            group.broadcast(flat)
        del flat  # before the next bucket is allocated: one bucket at a time


def receive_buckets(group: SyncGroup, plan: list[Bucket], dtype: str) -> Iterator[tuple[str, torch.Tensor]]:
    """An engine: (name, tensor) for each parameter, as views of each received bucket (a generator: a bucket is
    received when the consumer reaches it)."""
    for bucket in plan:
        flat = torch.empty(bucket.numel(), dtype=DTYPES[dtype], device=group.device)
        group.broadcast(flat)
        offset = 0
        for name, shape in zip(bucket.names, bucket.shapes):
            n = shape_numel(shape)
            yield name, flat[offset:offset + n].view(shape)
            offset += n
        del flat  # before the next bucket is allocated (the consumer may still hold its last view)

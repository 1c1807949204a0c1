"""The bucketed broadcast of pipeline/weight_sync.py: the plan, and a real gloo group of three processes (one
sender, two receivers) on 127.0.0.1 that must deliver every tensor exactly, bucket by bucket."""
import contextlib

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.weight_sync import Bucket, SyncConfig, SyncGroup, bucket_plan, receive_buckets, send_buckets
from tests.ray_processes import free_ports

SHAPES = [("embed.weight", (50, 8)), ("layer.0.w", (8, 8)), ("layer.0.b", (8,)), ("layer.1.w", (8, 8)),
          ("head.big", (40, 40))]


def params(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES}


def test_plan_keeps_order_and_bucket_size():
    plan = bucket_plan(SHAPES, "float32", bucket_bytes=500 * 4)
    assert [b.names for b in plan] == [("embed.weight", "layer.0.w", "layer.0.b"), ("layer.1.w",), ("head.big",)]
    assert all(b.numel() <= 500 for b in plan[:2]) and plan[2].numel() == 1600  # a larger tensor goes alone
    assert sum(b.numel() for b in bucket_plan(SHAPES, "bfloat16", 1 << 30)) == sum(b.numel() for b in plan)
    with pytest.raises(ValueError, match="sync.bucket_mb"):
        SyncConfig(bucket_mb=0)


def member(rank: int, world: int, port: int, dtype: str, results):
    group = SyncGroup("127.0.0.1", port, rank, world, "cpu", timeout_s=60)
    plan = bucket_plan(SHAPES, dtype, bucket_bytes=600 * 4)
    want = params()
    if rank == 0:
        send_buckets(group, plan, dtype, lambda name: contextlib.nullcontext(want[name]))
        results.put((rank, True))
        return
    got = dict(receive_buckets(group, plan, dtype))
    exact = list(got) == list(want) and all(
        torch.equal(got[name], want[name].to(getattr(torch, dtype))) and got[name].shape == want[name].shape
        for name in want)
    results.put((rank, exact))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_broadcast_delivers_every_tensor_to_every_engine(dtype):
    (port,) = free_ports(1)
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=member, args=(rank, 3, port, dtype, results)) for rank in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert sorted(results.get(timeout=5) for _ in range(3)) == [(0, True), (1, True), (2, True)]


def test_non_zero_learner_ranks_only_take_part_in_the_gathers():
    """group None (learner ranks 1..): every parameter is still gathered, in plan order, and nothing is sent."""
    seen = []

    @contextlib.contextmanager
    def gathered(name):
        seen.append(name)
        yield params()[name]

    send_buckets(None, [Bucket(("layer.0.w", "layer.0.b"), ((8, 8), (8,)))], "float32", gathered)
    assert seen == ["layer.0.w", "layer.0.b"]

"""Sampling seeds and data orders from a stable hash, never from sums.

Additive seeds collide: with seed = run_seed * K + step + prompt_index, (step s, prompt j+1) and (step s+1,
prompt j) share a seed, and held-out prompts share seeds with training prompts. Here every seed is
blake2b(run seed, domain, prompt id, sample index), so a sample's noise depends only on what it is, not on
which engine or which position in a shard it landed on.
"""
from __future__ import annotations

import hashlib

HELDOUT = "heldout"  # the held-out evaluation's domain: the same seeds at every evaluation, none shared with training
SEED_BITS = 31  # vLLM SamplingParams.seed and numpy accept any int in [0, 2**31)


def stable_hash(*parts, bits: int = SEED_BITS) -> int:
    """A `bits`-bit int from blake2b of the parts' reprs (unambiguous: each part is length-prefixed)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = repr(part).encode()
        digest.update(len(data).to_bytes(4, "little") + data)
    return int.from_bytes(digest.digest(), "little") % (1 << bits)


def sample_seed(run_seed: int, step: int | str, prompt_id: str, sample_index: int) -> int:
    """Seed of sample `sample_index` of prompt `prompt_id` at training step `step` (or step=HELDOUT)."""
    return stable_hash("sample", int(run_seed), step, str(prompt_id), int(sample_index))


def prompt_seeds(run_seed: int, step: int | str, prompt_ids: list[str], n_samples: int) -> list[list[int]]:
    """One seed per (prompt, sample): [[seed of prompt 0 sample 0, sample 1, ...], ...]."""
    return [[sample_seed(run_seed, step, pid, k) for k in range(n_samples)] for pid in prompt_ids]


def epoch_seed(run_seed: int, epoch: int) -> int:
    """Seed of the prompt order of `epoch` (seed + epoch would make run seed 1's epoch 0 run seed 0's epoch 1)."""
    return stable_hash("epoch", int(run_seed), int(epoch))

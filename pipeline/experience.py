"""From scored rollouts to experience: mix reward sources, optional KL-in-reward, advantages. Pure, no Ray.

Per-token rewards are first-class: the endogenous reward puts one on every token, the sentence RM puts a_k*r_k
on the last token of each sentence. A source with weight 0 is skipped entirely.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from pipeline.advantages import compute_advantages, masked_mean
from pipeline.arrow import FLOATS, numpy_to_ragged, padded_to_ragged, ragged_to_numpy, ragged_to_padded
from pipeline.config import opt


@dataclasses.dataclass
class AdvantageConfig:
    estimator: Literal["grpo", "rloo", "reinforce", "reinforce_pp", "gae"] = opt(
        "grpo", "grpo/rloo (group baselines over the n samples), reinforce (returns-to-go), reinforce_pp, gae (PPO + critic)")
    gamma: float = opt(1.0, "discount (1 = the sentence-RM paper's setting)")
    lam: float = opt(0.95, "GAE lambda")
    endogenous_weight: float = opt(1.0, "weight of the endogenous token rewards in the total reward")
    sentence_rm_weight: float = opt(0.0, "weight of the sentence-RM dense rewards (needs a trained sentence RM)")


def mixed_token_rewards(scored: pa.Table, cfg: AdvantageConfig) -> list[np.ndarray]:
    """r_t = w_endo * r_endo_t + w_srm * r_srm_t for every response token."""
    rows = [np.zeros(len(r), dtype=np.float32) for r in ragged_to_numpy(scored["response_ids"])]
    for column, weight in (("token_rewards", cfg.endogenous_weight), ("sentence_rewards", cfg.sentence_rm_weight)):
        if weight:
            rows = [total + weight * r for total, r in zip(rows, ragged_to_numpy(scored[column]))]
    return rows


def build_experience(scored: pa.Table, cfg: AdvantageConfig, group_size: int, kl_coef: float,
                     kl_in_reward: bool, values: list[np.ndarray] | None = None) -> tuple[pa.Table, dict]:
    """Append `advantages` and `returns` to a scored rollout table; return it with batch metrics."""
    rewards, mask = ragged_to_padded(mixed_token_rewards(scored, cfg))
    old_logp, _ = ragged_to_padded(ragged_to_numpy(scored["sample_logprobs"]))
    ref_logp, _ = ragged_to_padded(ragged_to_numpy(scored["ref_logprobs"]))
    kl = (old_logp - ref_logp) * mask  # k1 estimate of KL(pi || pi_ref) per token
    task_reward = (rewards * mask).sum(1)
    if kl_in_reward:
        rewards = rewards - kl_coef * kl  # r_t <- r_t - beta * (log pi - log pi_ref)
    value_tensor = ragged_to_padded(values)[0] if values is not None else None
    advantages, returns = compute_advantages(cfg.estimator, rewards, mask, values=value_tensor, group_size=group_size,
                                             gamma=cfg.gamma, lam=cfg.lam)
    if returns is None:
        returns = advantages
    experience = scored.append_column(pa.field("advantages", FLOATS), numpy_to_ragged(padded_to_ragged(advantages, mask), pa.float32()))
    experience = experience.append_column(pa.field("returns", FLOATS), numpy_to_ragged(padded_to_ragged(returns, mask), pa.float32()))
    lengths = mask.sum(1)
    metrics = {
        "reward/total": task_reward.mean().item(),
        "reward/endogenous": float(np.mean(scored["reward"].to_numpy())),
        "kl/k1_rollout": (kl.sum(1)).mean().item(),
        "rollout/response_length": lengths.mean().item(),
        "rollout/finished_fraction": float(np.mean(scored["finished"].to_numpy(zero_copy_only=False))),
        "advantage/mean": masked_mean(advantages, mask).item(),
        "advantage/std": torch.sqrt(masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask)).item(),
    }
    metrics["reward/endogenous_group_std"] = group_std(scored["reward"].to_numpy(), group_size)
    if "sentence_reward" in scored.column_names:
        metrics["reward/sentence_rm"] = float(np.mean(scored["sentence_reward"].to_numpy()))
        metrics["reward/sentence_rm_group_std"] = group_std(scored["sentence_reward"].to_numpy(), group_size)
    return experience, metrics


def group_std(scores: np.ndarray, group_size: int) -> float:
    """Mean over prompts of the std of one source's response scores among that prompt's samples: the spread a
    group baseline sees, so the weights of two reward sources can be set to balance them."""
    if group_size < 2 or len(scores) % group_size:
        return float(np.std(scores))
    return float(np.std(scores.reshape(-1, group_size), axis=1).mean())

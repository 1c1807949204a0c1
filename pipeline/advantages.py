"""Advantage estimators for RLHF: REINFORCE, REINFORCE++, GRPO, RLOO and GAE. Pure torch, no Ray.

Conventions shared by every function here:
  - per-token tensors are float [B, T] over RESPONSE tokens only, padded at the right end;
  - `mask` [B, T] is 1.0 on real response tokens and 0.0 on padding;
  - rewards are per-token (dense); an outcome reward is simply a reward on the last real token;
  - advantages come back as [B, T] with zeros wherever mask == 0 (whatever the padding held).
"""
from __future__ import annotations

import torch

ESTIMATORS = ("reinforce", "reinforce_pp", "grpo", "rloo", "gae")


# ---------------------------------------------------------------------------------------------- helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over entries where mask == 1 (all of them, or along `dim`); 0 where nothing is valid."""
    # mean = sum(x * m) / sum(m); the count is clamped to 1 so an all-padding row gives 0, not NaN
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x shifted and scaled to mean 0, std 1 over its valid entries (population std); padding is 0."""
    mean = masked_mean(x, mask)
    # population variance: var = mean_valid((x - mean)^2)
    var = masked_mean((x - mean) ** 2, mask)
    # whiten: (x - mean) / sqrt(var + eps)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def _check_same_shape(rewards: torch.Tensor, mask: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape != mask.shape:
        raise ValueError(
            f"rewards and mask must both be [B, T]; got rewards {tuple(rewards.shape)}, mask {tuple(mask.shape)}"
        )


def _check_groups(batch_size: int, group_size: int) -> None:
    if group_size < 2:
        raise ValueError(
            f"GRPO needs at least 2 samples per prompt; set rollout.n_samples >= 2 (got group_size={group_size})"
        )
    if batch_size % group_size != 0:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of group_size {group_size}; "
            "the n samples of each prompt must be adjacent rows of the batch"
        )


def _sequence_scores_by_group(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sequence scores R_i = sum_t r_{i,t}, reshaped to [B / group_size, group_size]."""
    _check_same_shape(rewards, mask)
    _check_groups(rewards.shape[0], group_size)
    # sequence score: R_i = sum_t r_{i,t} over valid tokens
    scores = (rewards * mask).sum(dim=1)
    return scores.view(-1, group_size)


# ------------------------------------------------------------------------------------------- estimators


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted returns-to-go G_t per token [B, T]; 0 on padding."""
    _check_same_shape(rewards, mask)
    rewards = rewards * mask  # padding may hold anything; it must not leak into the sums
    returns = torch.zeros_like(rewards)
    future = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        # returns-to-go: G_t = r_t + gamma * G_{t+1}  (= sum_{k>=t} gamma^(k-t) r_k)
        future = rewards[:, t] + gamma * future
        returns[:, t] = future
    return returns * mask


def reinforce(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE advantages: the returns-to-go themselves, no baseline."""
    # REINFORCE: A_t = G_t
    return returns_to_go(rewards, mask, gamma)


def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ advantages: returns-to-go whitened over every valid token of the whole batch."""
    # REINFORCE++: A_t = (G_t - mean_batch(G)) / std_batch(G)
    return masked_whiten(returns_to_go(rewards, mask, gamma), mask)


def grpo(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each sequence's score normalised within its prompt group, on every valid token.

    Rows [k*group_size, (k+1)*group_size) are the samples of prompt k. The std is the POPULATION
    std (correction=0: divide by n, not n - 1), so a 2-sample group with scores a < b gets
    advantages -1 and +1 (up to eps). A group whose scores are all equal gets 0.
    """
    scores = _sequence_scores_by_group(rewards, mask, group_size)
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True, correction=0)
    # GRPO: A_i = (R_i - mean_group(R)) / (std_group(R) + eps)
    advantages = (scores - mean) / (std + eps)
    return advantages.reshape(-1, 1) * mask


def rloo(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages: each sequence's score minus the mean score of the OTHER samples of its prompt."""
    scores = _sequence_scores_by_group(rewards, mask, group_size)
    # leave-one-out baseline: b_i = (sum_group(R) - R_i) / (n - 1)
    baseline = (scores.sum(dim=1, keepdim=True) - scores) / (group_size - 1)
    # RLOO: A_i = R_i - b_i
    advantages = scores - baseline
    return advantages.reshape(-1, 1) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda): (advantages [B, T], returns = advantages + values [B, T]), both 0 on padding.

    values[b, t] is the critic's V(s_t) for response token t; the value after the last real token is 0.
    """
    _check_same_shape(rewards, mask)
    if values.shape != rewards.shape:
        raise ValueError(f"values must be [B, T] like rewards {tuple(rewards.shape)}; got {tuple(values.shape)}")
    rewards = rewards * mask
    values = values * mask  # padding is at the right, so V_{t+1} after the last real token reads 0
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        # TD error: delta_t = r_t + gamma * V_{t+1} - V_t
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # GAE: A_t = delta_t + gamma * lam * A_{t+1}
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    # value target: R_t = A_t + V_t
    returns = (advantages + values) * mask
    return advantages, returns


# --------------------------------------------------------------------------------------------- dispatch


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages [B, T], returns [B, T] for "gae" else None) from the estimator called `name`."""
    if name == "reinforce":
        return reinforce(rewards, mask, gamma), None
    if name == "reinforce_pp":
        return reinforce_pp(rewards, mask, gamma), None
    if name == "grpo":
        return grpo(rewards, mask, group_size), None
    if name == "rloo":
        return rloo(rewards, mask, group_size), None
    if name == "gae":
        if values is None:
            raise ValueError("the 'gae' estimator needs the critic's values; pass values=[B, T]")
        return gae(rewards, values, mask, gamma, lam)
    raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")

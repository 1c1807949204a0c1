"""Policy-gradient losses for RLHF: PPO clipped surrogate, clipped value loss, KL estimators,
entropy and per-token log-probs. Pure torch, no Ray.

Per-token tensors are [B, T] over response tokens with a `mask` [B, T] (1.0 real, 0.0 padding);
every mean over tokens is `masked_mean` from pipeline.advantages.
"""
from __future__ import annotations

import torch

from pipeline.advantages import masked_mean


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 KL estimate of KL(pi || ref): unbiased, can be negative."""
    # k1 = log pi(x) - log ref(x)
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 KL estimate of KL(pi || ref) (Schulman): unbiased and never negative."""
    log_ratio = ref_logp - logp
    # k3 = r - log r - 1, with r = ref(x) / pi(x)
    return torch.exp(log_ratio) - log_ratio - 1.0


def ppo_clip_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(PPO clipped surrogate loss, a scalar to minimise; clip fraction, a detached scalar).

    The clip fraction is the share of valid tokens whose clipped term won the max, i.e. whose
    gradient the clip switched off.
    """
    # probability ratio: rho_t = exp(log pi(a_t) - log pi_old(a_t))
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    # clipped surrogate term: -A_t * clip(rho_t, 1 - eps, 1 + eps)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # PPO-clip: L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t))
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).detach()
    return loss, clip_fraction


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2
) -> torch.Tensor:
    """Clipped value loss, a scalar: the new values may move at most clip_eps from the old ones for free."""
    # clipped value: v_clip = v_old + clip(v - v_old, -eps, eps)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    # value loss: L_V = 0.5 * mean_t max((v - R)^2, (v_clip - R)^2)
    squared_error = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(squared_error, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position, float32, shape logits.shape[:-1] (e.g. [B, T])."""
    logits = logits.float()
    log_normaliser = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - log_normaliser.unsqueeze(-1))
    # entropy: H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v
    return log_normaliser - (probs * logits).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, float32, shape token_ids.shape (e.g. [B, T]).

    Only one float32 copy of the logits is made (for the log-sum-exp); the chosen logits are
    gathered from the original tensor and cast up, which is exact.
    """
    log_normaliser = torch.logsumexp(logits.float(), dim=-1)
    chosen = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float()
    # log-prob: log p(x_t) = z_{x_t} - logsumexp(z)
    return chosen - log_normaliser

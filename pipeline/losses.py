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


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is float64: log-softmax statistics never run in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position, float32, shape logits.shape[:-1] (e.g. [B, T])."""
    logits = wide(logits)
    log_normaliser = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - log_normaliser.unsqueeze(-1))
    # entropy: H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v
    return log_normaliser - (probs * logits).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, float32, shape token_ids.shape (e.g. [B, T]).

    Only one float32 copy of the logits is made (for the log-sum-exp); the chosen logits are
    gathered from the original tensor and cast up, which is exact.
    """
    log_normaliser = torch.logsumexp(wide(logits), dim=-1)
    chosen = wide(logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1))
    # log-prob: log p(x_t) = z_{x_t} - logsumexp(z)
    return chosen - log_normaliser


class ChunkedLogProbsEntropy(torch.autograd.Function):
    """(log softmax(z / T)[target], entropy of softmax(z / T)) per row of logits z [R, V], float32, computed over
    `chunk` rows at a time in the forward and again in the backward, so no float32 [R, V] tensor is kept for
    backward: only `logits` itself, in the dtype the model made it (bf16 under autocast)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int):
        logprobs = wide(logits.new_empty(logits.shape[0]))
        entropy = torch.empty_like(logprobs)
        for start in range(0, logits.shape[0], chunk):
            z = wide(logits[start:start + chunk]) / temperature
            logprobs[start:start + chunk] = token_logprobs(z, targets[start:start + chunk])
            entropy[start:start + chunk] = entropy_from_logits(z)
        ctx.save_for_backward(logits, targets, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            z = wide(logits[rows]) / ctx.temperature
            log_p = torch.log_softmax(z, dim=-1)
            p = log_p.exp()
            g = torch.zeros_like(z)
            if grad_logprobs is not None:
                # d log p_y / dz = onehot(y) - p
                g -= p * grad_logprobs[rows, None]
                g.scatter_add_(-1, targets[rows, None], grad_logprobs[rows, None])
            if grad_entropy is not None:
                # dH / dz = -p * (log p + H)
                g -= p * (log_p + entropy[rows, None]) * grad_entropy[rows, None]
            grad[rows] = (g / ctx.temperature).to(grad.dtype)  # chain rule through z / T
        return grad, None, None, None


def chunked_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                             chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [R], entropies [R]) of `targets` [R] under softmax(logits [R, V] / temperature); see
    ChunkedLogProbsEntropy. Differentiable in both outputs."""
    return ChunkedLogProbsEntropy.apply(logits, targets, temperature, chunk)

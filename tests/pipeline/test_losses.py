"""Losses checked against numbers worked out by hand (in the comments), not re-implementations."""
import math

import pytest
import torch

from pipeline.losses import entropy_from_logits, kl_k1, kl_k3, ppo_clip_loss, token_logprobs, value_loss

PAD = 99.0  # padding holds garbage on purpose: the masked mean must ignore it
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------- KL


def test_kl_k1_and_k3_on_known_values():
    logp = torch.tensor([math.log(0.5), math.log(0.3)])
    ref_logp = torch.tensor([math.log(0.25), math.log(0.3)])
    # k1 = log(0.5 / 0.25) = log 2; k3 = r - log r - 1 with r = 0.25 / 0.5: 0.5 + log 2 - 1
    close(kl_k1(logp, ref_logp), [math.log(2.0), 0.0])
    close(kl_k3(logp, ref_logp), [0.5 + math.log(2.0) - 1.0, 0.0])


def test_kl_k3_is_never_negative():
    torch.manual_seed(0)
    logp, ref_logp = torch.randn(64, 32) * 3, torch.randn(64, 32) * 3
    assert (kl_k3(logp, ref_logp) >= 0).all()


# ---------------------------------------------------------------------------------------------- PPO


def test_ppo_clip_loss_with_ratio_one_is_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, PAD]])
    advantages = torch.tensor([[1.0, -2.0, 3.0], [0.5, 2.0, PAD]])
    loss, clip_fraction = ppo_clip_loss(logp, logp.clone(), advantages, MASK)
    close(loss, -(1.0 - 2.0 + 3.0 + 0.5 + 2.0) / 5)  # -0.9
    close(clip_fraction, 0.0)


def test_ppo_clip_loss_clips_large_ratio_with_positive_advantage():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    old_logp = torch.zeros(1, 1)
    loss, clip_fraction = ppo_clip_loss(logp, old_logp, torch.ones(1, 1), torch.ones(1, 1), clip_eps=0.2)
    # max(-1 * 1.5, -1 * clip(1.5, 0.8, 1.2)) = max(-1.5, -1.2) = -1.2
    close(loss, -1.2)
    close(clip_fraction, 1.0)
    loss.backward()
    assert logp.grad.item() == 0.0  # a clipped token sends no gradient


def test_ppo_clip_loss_mixed_tokens_by_hand():
    ratios = torch.tensor([[1.5, 0.5], [0.5, 1.0]])
    advantages = torch.tensor([[1.0, 1.0], [-1.0, PAD]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, clip_fraction = ppo_clip_loss(ratios.log(), torch.zeros(2, 2), advantages, mask, clip_eps=0.2)
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2  (clipped)
    # A=+1, r=0.5: max(-0.5, -0.8) = -0.5  (not clipped: a pessimistic bound never helps a drop)
    # A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clipped)
    close(loss, (-1.2 - 0.5 + 0.8) / 3)
    close(clip_fraction, 2 / 3)


# -------------------------------------------------------------------------------------------- value


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, PAD]])
    old_values = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: v_clip = 0 + clip(1, -0.2, 0.2) = 0.2; max((1-2)^2, (0.2-2)^2) = 3.24
    # token 1: v_clip = 0; max((0-1)^2, (0-1)^2) = 1
    close(value_loss(values, old_values, returns, mask, clip_eps=0.2), 0.5 * (3.24 + 1.0) / 2)


def test_value_loss_is_zero_when_values_hit_returns_unclipped():
    values = torch.tensor([[1.0, 2.0]])
    close(value_loss(values, values - 0.1, values.clone(), torch.ones(1, 2)), 0.0)


# ------------------------------------------------------------------------------ entropy and log-probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_of_uniform_logits_is_log_vocab(dtype):
    entropy = entropy_from_logits(torch.zeros(2, 3, 7, dtype=dtype))
    assert entropy.shape == (2, 3) and entropy.dtype == torch.float32
    close(entropy, torch.full((2, 3), math.log(7.0)))


def test_entropy_of_known_distribution():
    # p = [1/2, 1/4, 1/4]: H = 1/2 log 2 + 2 * 1/4 log 4 = 1.5 log 2
    logits = torch.tensor([0.5, 0.25, 0.25]).log() + 3.0  # a shift must not matter
    close(entropy_from_logits(logits), 1.5 * math.log(2.0))


def test_token_logprobs_matches_float64_log_softmax_on_bf16_logits():
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 50) * 3).to(torch.bfloat16)
    token_ids = torch.randint(0, 50, (2, 5))
    logprobs = token_logprobs(logits, token_ids)
    expected = torch.log_softmax(logits.double(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    assert logprobs.shape == (2, 5) and logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-5, rtol=0)

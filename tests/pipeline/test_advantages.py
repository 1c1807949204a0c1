"""Advantage estimators checked against numbers worked out by hand (in the comments), not re-implementations."""
import math

import pytest
import torch

from pipeline.advantages import (
    compute_advantages,
    gae,
    grpo,
    masked_mean,
    masked_whiten,
    reinforce,
    reinforce_pp,
    returns_to_go,
    rloo,
)

PAD = 99.0  # padding holds garbage on purpose: every function must ignore it

# Two responses: 3 tokens and 2 tokens (+1 padding).
REWARDS = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, PAD]])
VALUES = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, PAD]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- helpers


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, PAD]])
    close(masked_mean(x, MASK), 3.0)  # (1+2+3+4+5) / 5
    close(masked_mean(x, MASK, dim=1), [2.0, 4.5])


def test_masked_mean_of_all_padding_is_zero_not_nan():
    close(masked_mean(torch.ones(2, 3), torch.zeros(2, 3)), 0.0)
    close(masked_mean(torch.ones(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 0]]), dim=1), [1.0, 0.0])


def test_masked_whiten_gives_mean_zero_std_one_and_zero_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, PAD]])
    white = masked_whiten(x, MASK)
    # valid 1..5: mean 3, population std sqrt(2)
    s = math.sqrt(2.0)
    close(white, [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])


# ------------------------------------------------------------------------------------ REINFORCE family


def test_returns_to_go_by_hand():
    close(returns_to_go(REWARDS, MASK), [[3.0, 2.0, 2.0], [3.0, 3.0, 0.0]])


def test_returns_to_go_discounted_by_hand():
    # row 0: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5; row 1: G1 = 3, G0 = 0 + 0.5*3 = 1.5
    close(returns_to_go(REWARDS, MASK, gamma=0.5), [[1.5, 1.0, 2.0], [1.5, 3.0, 0.0]])


def test_reinforce_is_returns_to_go():
    close(reinforce(REWARDS, MASK), [[3.0, 2.0, 2.0], [3.0, 3.0, 0.0]])


def test_outcome_reward_on_last_token_spreads_to_every_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, PAD]])
    close(reinforce(rewards, MASK), [[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])


def test_reinforce_pp_by_hand():
    # returns-to-go on valid tokens: 3, 2, 2, 3, 3 -> mean 2.6, population var 0.24
    a, b = 0.4 / math.sqrt(0.24), -0.6 / math.sqrt(0.24)  # 0.8165, -1.2247
    close(reinforce_pp(REWARDS, MASK), [[a, b, b], [a, a, 0.0]])


def test_reinforce_pp_is_whitened_over_valid_tokens():
    torch.manual_seed(0)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] * 2 + [0.0] * 4])
    rewards = torch.randn(3, 6) * 5 + 2
    advantages = reinforce_pp(rewards, mask)
    valid = advantages[mask.bool()]
    assert abs(valid.mean().item()) < 1e-5
    assert abs(valid.std(correction=0).item() - 1.0) < 1e-4
    assert (advantages[~mask.bool()] == 0).all()


# ---------------------------------------------------------------------------------------- GRPO and RLOO


def test_grpo_identical_rewards_give_zero_advantages():
    # both sequence scores are 3 -> the group has no signal
    close(grpo(REWARDS, MASK, group_size=2), [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_grpo_two_samples_by_hand():
    # scores R = [1, 0]: mean 0.5, population std 0.5 -> A = [+1, -1]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, PAD]])
    close(grpo(rewards, MASK, group_size=2), [[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])


def test_grpo_uses_population_std():
    # scores R = [0, 1, 2]: mean 1, population std sqrt(2/3) -> A = [-sqrt(1.5), 0, +sqrt(1.5)]
    # (the unbiased std, 1, would give [-1, 0, 1] instead)
    rewards = torch.tensor([[0.0, 0.0], [1.0, PAD], [0.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    a = math.sqrt(1.5)  # 1.2247
    close(grpo(rewards, mask, group_size=3), [[-a, -a], [0.0, 0.0], [a, a]])


def test_grpo_groups_are_adjacent_rows_and_do_not_mix():
    rewards = torch.tensor([[1.0], [3.0], [10.0], [10.0]])
    close(grpo(rewards, torch.ones(4, 1), group_size=2), [[-1.0], [1.0], [0.0], [0.0]])


def test_rloo_by_hand():
    # group of 3, scores R = [0, 1, 2]: A_0 = 0 - (1+2)/2, A_1 = 1 - (0+2)/2, A_2 = 2 - (0+1)/2
    rewards = torch.tensor([[0.0, 0.0], [1.0, PAD], [0.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    close(rloo(rewards, mask, group_size=3), [[-1.5, -1.5], [0.0, 0.0], [1.5, 1.5]])


def test_rloo_two_groups_of_two_by_hand():
    # group 1: R = [3, 1] -> [3-1, 1-3]; group 2: R = [5, 5] -> [0, 0]
    rewards = torch.tensor([[3.0], [1.0], [5.0], [5.0]])
    close(rloo(rewards, torch.ones(4, 1), group_size=2), [[2.0], [-2.0], [0.0], [0.0]])


@pytest.mark.parametrize("estimator", [grpo, rloo])
def test_group_size_one_is_refused(estimator):
    with pytest.raises(ValueError, match=r"at least 2 samples per prompt; set rollout\.n_samples >= 2"):
        estimator(REWARDS, MASK, group_size=1)


@pytest.mark.parametrize("estimator", [grpo, rloo])
def test_batch_not_multiple_of_group_size_is_refused(estimator):
    rewards = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="batch size 3 is not a multiple of group_size 2"):
        estimator(rewards, torch.ones(3, 2), group_size=2)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"rewards and mask must both be \[B, T\]"):
        reinforce(REWARDS, MASK[:, :2])


# ------------------------------------------------------------------------------------------------- GAE


def test_gae_with_lambda_one_is_returns_to_go_minus_values():
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    # returns-to-go [[3, 2, 2], [3, 3, 0]] minus values [[0.5, 1, 1.5], [2, 1, -]]
    close(advantages, [[2.5, 1.0, 0.5], [1.0, 2.0, 0.0]])
    close(returns, [[3.0, 2.0, 2.0], [3.0, 3.0, 0.0]])


def test_gae_with_lambda_zero_is_one_step_td():
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)
    # delta_t = r_t + V_{t+1} - V_t, V after the last real token = 0
    # row 0: 1+1-0.5, 0+1.5-1, 2+0-1.5;  row 1: 0+1-2, 3+0-1
    close(advantages, [[1.5, 0.5, 0.5], [-1.0, 2.0, 0.0]])
    close(returns, [[2.0, 1.5, 2.0], [1.0, 3.0, 0.0]])


def test_gae_discounted_by_hand():
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.5, lam=0.5)
    # row 0: delta = [1 + 0.5*1 - 0.5, 0 + 0.5*1.5 - 1, 2 - 1.5] = [1, -0.25, 0.5]
    #        A2 = 0.5, A1 = -0.25 + 0.25*0.5 = -0.125, A0 = 1 + 0.25*(-0.125) = 0.96875
    # row 1: delta = [0 + 0.5*1 - 2, 3 - 1] = [-1.5, 2];  A1 = 2, A0 = -1.5 + 0.25*2 = -1
    close(advantages, [[0.96875, -0.125, 0.5], [-1.0, 2.0, 0.0]])
    close(returns, [[1.46875, 0.875, 2.0], [1.0, 3.0, 0.0]])


# -------------------------------------------------------------------------------------------- dispatch


def test_compute_advantages_dispatches_by_name():
    advantages, returns = compute_advantages("reinforce", REWARDS, MASK)
    close(advantages, [[3.0, 2.0, 2.0], [3.0, 3.0, 0.0]])
    assert returns is None
    advantages, returns = compute_advantages("rloo", torch.tensor([[3.0], [1.0]]), torch.ones(2, 1), group_size=2)
    close(advantages, [[2.0], [-2.0]])
    assert returns is None
    advantages, returns = compute_advantages("gae", REWARDS, MASK, values=VALUES, lam=0.0)
    close(advantages, [[1.5, 0.5, 0.5], [-1.0, 2.0, 0.0]])
    close(returns, [[2.0, 1.5, 2.0], [1.0, 3.0, 0.0]])


@pytest.mark.parametrize("name", ["reinforce", "reinforce_pp", "grpo", "rloo", "gae"])
def test_every_estimator_zeroes_padding(name):
    advantages, _ = compute_advantages(name, REWARDS, MASK, values=VALUES, group_size=2)
    assert advantages[1, 2] == 0.0
    assert torch.isfinite(advantages).all()


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; choose one of reinforce, reinforce_pp, grpo"):
        compute_advantages("ppo", REWARDS, MASK)


def test_gae_without_values_is_refused():
    with pytest.raises(ValueError, match="'gae' estimator needs the critic's values"):
        compute_advantages("gae", REWARDS, MASK)

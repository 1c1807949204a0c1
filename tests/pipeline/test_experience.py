import numpy as np
import pyarrow as pa
import pytest

from pipeline.arrow import FLOATS, numpy_to_ragged, ragged_to_numpy
from pipeline.experience import AdvantageConfig, build_experience, mixed_token_rewards


def scored_table(token_rewards, sample_logprobs, ref_logprobs):
    return pa.table({
        "response_ids": numpy_to_ragged([np.arange(len(r)) for r in token_rewards], pa.int32()),
        "finished": pa.array([True] * len(token_rewards)),
        "token_rewards": numpy_to_ragged(token_rewards, pa.float32()),
        "sample_logprobs": numpy_to_ragged(sample_logprobs, pa.float32()),
        "ref_logprobs": numpy_to_ragged(ref_logprobs, pa.float32()),
        "reward": pa.array([float(np.sum(r)) for r in token_rewards], pa.float32()),
    })


def test_grpo_experience_by_hand():
    # two samples of one prompt: rewards sum to 3 and 1 -> group mean 2, population std 1 -> advantages +1 / -1
    table = scored_table([[1.0, 2.0], [1.0]], [[-1.0, -1.0], [-1.0]], [[-1.0, -1.0], [-1.0]])
    experience, metrics = build_experience(table, AdvantageConfig(estimator="grpo"), group_size=2, kl_coef=0.1,
                                           kl_in_reward=False)
    adv = ragged_to_numpy(experience["advantages"])
    np.testing.assert_allclose(adv[0], [1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(adv[1], [-1.0], atol=1e-5)
    assert experience.schema.field("advantages").type == FLOATS
    assert metrics["reward/total"] == pytest.approx(2.0) and metrics["rollout/response_length"] == pytest.approx(1.5)
    assert metrics["kl/k1_rollout"] == pytest.approx(0.0)


def test_k1_kl_goes_into_the_reward_when_asked():
    # log pi - log pi_ref = 1 on every token; with beta 0.5 each token reward drops by 0.5
    table = scored_table([[1.0, 1.0]], [[0.0, 0.0]], [[-1.0, -1.0]])
    plain, m = build_experience(table, AdvantageConfig(estimator="reinforce"), 1, 0.5, kl_in_reward=False)
    with_kl, _ = build_experience(table, AdvantageConfig(estimator="reinforce"), 1, 0.5, kl_in_reward=True)
    np.testing.assert_allclose(ragged_to_numpy(plain["advantages"])[0], [2.0, 1.0])      # returns-to-go of [1, 1]
    np.testing.assert_allclose(ragged_to_numpy(with_kl["advantages"])[0], [1.0, 0.5])    # of [0.5, 0.5]
    assert m["kl/k1_rollout"] == pytest.approx(2.0)


def test_reward_sources_are_weighted_and_zero_weight_is_skipped():
    table = scored_table([[1.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]])
    table = table.append_column("sentence_rewards", numpy_to_ragged([np.array([0.0, 10.0])], pa.float32()))
    mixed = mixed_token_rewards(table, AdvantageConfig(endogenous_weight=0.5, sentence_rm_weight=0.1))
    np.testing.assert_allclose(mixed[0], [0.5, 2.0])
    only_endo = mixed_token_rewards(table.drop(["sentence_rewards"]), AdvantageConfig())
    np.testing.assert_allclose(only_endo[0], [1.0, 2.0])


def test_each_source_reports_its_spread_within_groups():
    # 2 prompts x 2 samples; endogenous sums 3, 1 | 5, 5 -> group stds 1 and 0 -> 0.5; sentence R 0, 4 | 1, 1 -> 1.0
    table = scored_table([[1.0, 2.0], [1.0], [5.0], [2.0, 3.0]], [[0.0, 0.0], [0.0], [0.0], [0.0, 0.0]],
                         [[0.0, 0.0], [0.0], [0.0], [0.0, 0.0]])
    table = table.append_column("sentence_rewards", numpy_to_ragged([np.zeros(2), [4.0], [1.0], [0.0, 1.0]], pa.float32()))
    table = table.append_column("sentence_reward", pa.array([0.0, 4.0, 1.0, 1.0], pa.float32()))
    _, metrics = build_experience(table, AdvantageConfig(sentence_rm_weight=1.0), group_size=2, kl_coef=0.0,
                                  kl_in_reward=False)
    assert metrics["reward/endogenous_group_std"] == pytest.approx(0.5)
    assert metrics["reward/sentence_rm_group_std"] == pytest.approx(1.0)
    assert metrics["reward/sentence_rm"] == pytest.approx(1.5)

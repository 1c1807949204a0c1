"""The frozen-base-model actor: Arrow in, Arrow out, identical to scoring in-process."""
import numpy as np
import pyarrow as pa
import pytest

from actors.base_model import BaseModelActor, EndogenousScorer, ScoringConfig, map_with_actor_pool
from pipeline.arrow import SCORED_FIELDS, ragged_to_numpy, request_table
from pipeline.chat import encode_prompt, encode_response
from pipeline.endogenous import EndoRewardConfig, score_endogenous
from pipeline.models import ModelConfig, load_causal_lm, load_tokenizer


def requests(tokenizer, n=6):
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": f"Count to {i}."}]) for i in range(n)]
    responses = [encode_response(tokenizer, " ".join(str(k) for k in range(i + 1))) for i in range(n)]
    return prompts, responses, request_table(prompts, responses, [True] * n, tag=pa.array([f"row{i}" for i in range(n)]))


def test_remote_actor_and_actor_pool_match_in_process_scoring(tiny_model_dir, local_ray):
    model_cfg = ModelConfig(name=tiny_model_dir, dtype="float32")  # compared with a float32 reference
    reward_cfg = EndoRewardConfig()
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts, responses, table = requests(tokenizer)
    expected = score_endogenous(load_causal_lm(tiny_model_dir), prompts, responses, [True] * 6, reward_cfg)

    actor = BaseModelActor.remote(model_cfg, reward_cfg)
    scored = local_ray.get(actor.score.remote(local_ray.put(table)))  # Arrow through the object store by reference
    assert scored.column_names == table.column_names + [name for name, _ in SCORED_FIELDS]
    assert scored["tag"].to_pylist() == [f"row{i}" for i in range(6)]
    np.testing.assert_allclose(scored["reward"].to_numpy(), expected.rewards, rtol=1e-5, atol=1e-4)
    for got, want in zip(ragged_to_numpy(scored["token_rewards"]), expected.token_rewards):
        np.testing.assert_allclose(got, want, atol=1e-4)

    batches = list(map_with_actor_pool(table, EndogenousScorer, model_cfg, reward_cfg,
                                       ScoringConfig(replicas=2, cpus_per_replica=1, batch_size=2)))
    pooled = pa.concat_tables(batches)
    assert pooled["tag"].to_pylist() == table["tag"].to_pylist()  # order preserved across replicas
    np.testing.assert_allclose(pooled["reward"].to_numpy(), expected.rewards, rtol=1e-5, atol=1e-4)


def test_cuda_request_without_gpu_fails_loudly(tiny_model_dir):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA GPU.*set the device option to 'cpu'"):
        EndogenousScorer(ModelConfig(name=tiny_model_dir, device="cuda"), EndoRewardConfig())


def test_a_replica_asks_for_a_share_of_one_node_not_of_the_cluster():
    # regression: replicas asked for (cluster CPUs // replicas): 3 nodes of 4 CPUs gave 12 CPUs for one replica,
    # which no node has, and the pool never started
    from actors.base_model import ScoringConfig, replica_cpus

    nodes = [{"CPU": 0.0}, {"CPU": 4.0}, {"CPU": 4.0}, {"CPU": 4.0}]  # a head that hosts no work, three workers
    assert replica_cpus(ScoringConfig(replicas=1), nodes) == 4.0
    assert replica_cpus(ScoringConfig(replicas=3), nodes) == 1.0
    assert replica_cpus(ScoringConfig(replicas=8), nodes) == 1.0  # never below one CPU
    assert replica_cpus(ScoringConfig(replicas=1, cpus_per_replica=2), nodes) == 2.0  # config wins


def test_rl_rollout_with_contexts_gets_context_form_rewards_into_the_advantages(tiny_model_dir):
    """RL under --reward.form pmi: prompts carry x0 (tokenize_prompts), the engines copy it onto each sample, the
    scorer reads it, and the advantages are built from the pmi token rewards (REINFORCE: returns-to-go)."""
    from pipeline.arrow import CONTEXT_COLUMN, arrow_to_contexts
    from pipeline.data import builtin_prompts
    from pipeline.driver import tokenize_prompts
    from pipeline.experience import AdvantageConfig, build_experience
    from pipeline.rollout import outputs_to_rollout_table
    from tests.pipeline.test_rollout import fake_request, fake_sample

    tokenizer, cfg = load_tokenizer(tiny_model_dir), EndoRewardConfig(form="pmi")
    prompts = tokenize_prompts(builtin_prompts().slice(0, 2), tokenizer, cfg, 128)
    eos = tokenizer.eos_token_id
    outputs = [fake_request(fake_sample(0, [300, 301, eos], [-1.0] * 3, "stop"), fake_sample(1, [302], [-1.0], "length")),
               fake_request(fake_sample(0, [303, eos], [-1.0] * 2, "stop"))]
    prompt_ids = [p.tolist() for p in ragged_to_numpy(prompts["prompt_ids"])]
    contexts = [[c.tolist() for c in row] for row in arrow_to_contexts(prompts[CONTEXT_COLUMN])]
    rollout = outputs_to_rollout_table(prompt_ids, prompts["prompt_id"].to_pylist(), outputs, eos, contexts)
    scored = EndogenousScorer(ModelConfig(name=tiny_model_dir, dtype="float32"), cfg).score(rollout)
    (x0,) = contexts[0]
    direct = score_endogenous(load_causal_lm(tiny_model_dir), [prompt_ids[0], prompt_ids[0], prompt_ids[1]],
                              [s.token_ids for o in outputs for s in o.outputs], [True, False, True], cfg, [[x0]] * 3)
    experience, _ = build_experience(scored, AdvantageConfig(estimator="reinforce"), 1, 0.0, kl_in_reward=False)
    for i, advantages in enumerate(ragged_to_numpy(experience["advantages"])):
        np.testing.assert_allclose(advantages, np.cumsum(direct.token_rewards[i][::-1])[::-1], atol=1e-4)

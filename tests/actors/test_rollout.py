"""The vLLM rollout engine on CPU with the tiny model: rows, EOS, log-probs vs transformers, weight sync.

Most tests drive one in-process `RolloutEngine` (fast: no Ray); one test goes through a Ray actor.
References are transformers float32 forward passes: log_softmax(logits / temperature).
"""
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from ray.util.placement_group import remove_placement_group

from actors.cluster import RayConfig, worker_env
from actors.placement import PlacementConfig
from actors.rollout import RolloutEngine, cpu_threads_bind, start_rollout_engines
from pipeline.arrow import ROLLOUT_SCHEMA, numpy_to_ragged, ragged_to_numpy
from pipeline.models import build_tiny_model, load_causal_lm, load_tokenizer
from pipeline.rollout import RolloutConfig, logprob_parity, sampling_params_kwargs

TEMPERATURE = 0.7
CFG = RolloutConfig(n_samples=2, temperature=TEMPERATURE, max_new_tokens=8, max_prompt_tokens=256, cpus_per_engine=2)


def hf_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> np.ndarray:
    """log_softmax(logits / temperature) of each response token; logits at position t predict token t + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logprobs = (logits[len(prompt) - 1:-1] / temperature).log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> pa.Table:
    """Two prompts; the first is longer than one CPU KV block (128 tokens), so vLLM's prefix cache holds it."""
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = [" ".join(["the quick brown fox jumps over the lazy dog"] * 16), "Hello, who are you?"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert len(ids[0]) > 128
    return pa.table({"prompt_id": ["long", "short"], "prompt_ids": numpy_to_ragged(ids, pa.int32())})


@pytest.fixture(scope="module")
def new_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The same tiny architecture with other random weights (other embeddings too, so the tied head must move)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model_seed1")), tiny_model_dir, seed=1)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """One in-process engine for the module; the CPU vLLM variables it needs, restored afterwards."""
    env = worker_env(RayConfig(vllm_cpu_kvcache_gib=1))
    saved = {name: os.environ.get(name) for name in [*env, "VLLM_CPU_OMP_THREADS_BIND"]}
    os.environ.update(env)
    yield RolloutEngine(tiny_model_dir, "float32", "cpu", CFG, engine_index=0)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def prompt_lists(rollout: pa.Table) -> tuple[list, list]:
    return ([p.tolist() for p in ragged_to_numpy(rollout["prompt_ids"])],
            [r.tolist() for r in ragged_to_numpy(rollout["response_ids"])])


def test_cuda_request_fails_clearly_on_cpu(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="sees no CUDA GPU.*Fix"):
        RolloutEngine(tiny_model_dir, "float32", "cuda", CFG, engine_index=0)


def test_each_engine_binds_its_own_cores_of_its_node():
    cores = sorted(os.sched_getaffinity(0))
    one_core = RolloutConfig(engines=2, cpus_per_engine=1)
    binds = [cpu_threads_bind(one_core, i) for i in range(2)]
    if len(cores) >= 2:
        assert binds == [str(cores[0]), str(cores[1])]
    everything = RolloutConfig(engines=1, cpus_per_engine=64)  # more than the node has: all of its cores
    assert cpu_threads_bind(everything, 0) == ",".join(map(str, cores))


@pytest.mark.slow
def test_generate_rows_and_eos(engine, prompts):
    rollout = engine.generate(prompts)
    assert rollout.schema == ROLLOUT_SCHEMA
    assert rollout["prompt_id"].to_pylist() == ["long", "long", "short", "short"]
    prompt_ids, response_ids = prompt_lists(rollout)
    assert prompt_ids[1] == prompt_ids[0] == ragged_to_numpy(prompts["prompt_ids"])[0].tolist()
    for response, logprobs in zip(response_ids, ragged_to_numpy(rollout["sample_logprobs"])):
        assert len(response) == len(logprobs) == 8     # a random model almost never samples EOS in 8 tokens
    assert rollout["finish_reason"].to_pylist() == ["length"] * 4 and not any(rollout["finished"].to_pylist())

    # Make EOS likely (only 3 tokens allowed) to see how vLLM returns a stop: the EOS stays in the response.
    from vllm import SamplingParams

    default = engine.sampling
    engine.sampling = SamplingParams(**sampling_params_kwargs(CFG), allowed_token_ids=[engine.eos_token_id, 30, 31])
    try:
        rollout = engine.generate(prompts)
    finally:
        engine.sampling = default
    finished = rollout["finished"].to_pylist()
    assert any(finished)
    for done, reason, response in zip(finished, rollout["finish_reason"].to_pylist(),
                                      ragged_to_numpy(rollout["response_ids"])):
        assert reason == ("stop" if done else "length")
        assert (response[-1] == engine.eos_token_id) == done
        assert engine.eos_token_id not in response[:-1]


@pytest.mark.slow
def test_seeded_generate_is_reproducible_and_each_prompt_gets_its_own_noise(engine, prompts):
    first = engine.generate(prompts, n_samples=2, seed=5)
    assert first.equals(engine.generate(prompts, n_samples=2, seed=5))
    same_prompt_twice = pa.concat_tables([prompts.slice(0, 1), prompts.slice(0, 1)])
    responses = ragged_to_numpy(engine.generate(same_prompt_twice, n_samples=1, seed=5)["response_ids"])
    assert responses[0].tolist() != responses[1].tolist()


@pytest.mark.slow
def test_sample_logprobs_are_under_the_tempered_distribution(engine, prompts, tiny_model_dir):
    rollout = engine.generate(prompts)
    model = load_causal_lm(tiny_model_dir, "float32")
    prompt_ids, response_ids = prompt_lists(rollout)
    tempered = [hf_logprobs(model, p, r, TEMPERATURE) for p, r in zip(prompt_ids, response_ids)]
    untempered = [hf_logprobs(model, p, r, 1.0) for p, r in zip(prompt_ids, response_ids)]
    sampled = ragged_to_numpy(rollout["sample_logprobs"])
    assert logprob_parity(sampled, tempered) < 1e-3
    assert logprob_parity(sampled, untempered) > 1e-2   # i.e. not vLLM's default raw (temperature 1) log-probs


@pytest.mark.slow
def test_load_weights_moves_tied_head_and_prefix_cache(engine, prompts, tiny_model_dir, new_model_dir):
    old_model, new_model = load_causal_lm(tiny_model_dir, "float32"), load_causal_lm(new_model_dir, "float32")
    rollout = engine.generate(prompts)  # fills the prefix cache with the long prompt under the OLD weights
    prompt_ids, response_ids = prompt_lists(rollout)
    old = [hf_logprobs(old_model, p, r) for p, r in zip(prompt_ids, response_ids)]
    new = [hf_logprobs(new_model, p, r) for p, r in zip(prompt_ids, response_ids)]
    assert logprob_parity(engine.token_logprobs(prompt_ids, response_ids), old) < 1e-3

    # The trap: a state dict without the tied duplicate `lm_head.weight` (as DeepSpeed / safetensors give it).
    state = {name: tensor for name, tensor in new_model.state_dict().items() if name != "lm_head.weight"}
    seconds = engine.load_weights(state)
    print(f"load_weights: {seconds:.3f} s")
    synced = engine.token_logprobs(prompt_ids, response_ids)
    assert logprob_parity(synced, new) < 1e-3
    assert logprob_parity(synced, old) > 1e-2

    # Sampling after the sync uses the new weights too, also for the cached long prompt.
    rollout = engine.generate(prompts)
    prompt_ids, response_ids = prompt_lists(rollout)
    tempered = [hf_logprobs(new_model, p, r, TEMPERATURE) for p, r in zip(prompt_ids, response_ids)]
    assert logprob_parity(ragged_to_numpy(rollout["sample_logprobs"]), tempered) < 1e-3

    engine.load_weights(old_model.state_dict())  # and back: the module's engine ends as it started
    assert logprob_parity(engine.token_logprobs(prompt_ids, response_ids),
                          [hf_logprobs(old_model, p, r) for p, r in zip(prompt_ids, response_ids)]) < 1e-3


@pytest.mark.slow
def test_rollout_actor_through_ray(local_ray, prompts, tiny_model_dir, new_model_dir):
    cfg = RolloutConfig(n_samples=2, temperature=TEMPERATURE, max_new_tokens=8, max_prompt_tokens=256)
    (actor,), group = start_rollout_engines(tiny_model_dir, "float32", "cpu", cfg, RayConfig(vllm_cpu_kvcache_gib=1),
                                            PlacementConfig(timeout_s=60))
    try:
        rollout = local_ray.get(actor.generate.remote(prompts))
        assert rollout.schema == ROLLOUT_SCHEMA and rollout.num_rows == 4
        prompt_ids, response_ids = prompt_lists(rollout)
        new_model = load_causal_lm(new_model_dir, "float32")
        seconds = local_ray.get(actor.load_weights.remote(new_model.state_dict()))
        print(f"load_weights through Ray: {seconds:.3f} s")
        synced = local_ray.get(actor.token_logprobs.remote(prompt_ids, response_ids))
        assert logprob_parity(synced, [hf_logprobs(new_model, p, r) for p, r in zip(prompt_ids, response_ids)]) < 1e-3
    finally:
        local_ray.kill(actor)
        remove_placement_group(group)


@pytest.mark.slow
def test_per_sample_seeds_give_the_same_rollout_whatever_the_split(engine, prompts):
    """One engine call with all prompts == two calls (two engines' shards) concatenated: each sample has its own seed."""
    from pipeline.seeds import prompt_seeds
    seeds = prompt_seeds(0, 3, prompts["prompt_id"].to_pylist(), 2)
    whole = engine.generate(prompts, n_samples=2, seeds=seeds)
    half = prompts.num_rows // 2
    split = pa.concat_tables([engine.generate(prompts.slice(0, half), n_samples=2, seeds=seeds[:half]),
                              engine.generate(prompts.slice(half), n_samples=2, seeds=seeds[half:])])
    assert whole.num_rows == 2 * prompts.num_rows
    # the samples are the same: every column equal, the sampled tokens included ...
    assert whole.drop_columns(["sample_logprobs"]).equals(split.drop_columns(["sample_logprobs"]))
    # ... but their log-probs only to float noise (measured ~1e-6): the CPU kernels' reductions depend on the
    # batch's composition (not batch-invariant), so a different split sums in a different order
    a, b = (np.concatenate(ragged_to_numpy(t["sample_logprobs"])) for t in (whole, split))
    print("max |logprob diff| 1 vs 2 shards:", float(np.max(np.abs(a - b))))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert whole["prompt_id"].to_pylist() == [pid for pid in prompts["prompt_id"].to_pylist() for _ in range(2)]


@pytest.mark.slow
def test_per_sample_seeds_do_not_depend_on_the_engines_own_seed(engine, prompts):
    """Any engine, a replacement included, samples a prompt's seeds alike: engine i's own generator (LLM(seed=
    rollout.seed + i) seeds random, numpy and torch) is not used by seeded requests, so reseeding it changes nothing."""
    import random

    from pipeline.seeds import prompt_seeds
    seeds = prompt_seeds(0, 1, prompts["prompt_id"].to_pylist(), 2)
    first = engine.generate(prompts, n_samples=2, seeds=seeds)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # as LLM(seed=7), another engine's seed, would
    assert engine.generate(prompts, n_samples=2, seeds=seeds).equals(first)

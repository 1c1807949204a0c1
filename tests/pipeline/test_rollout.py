"""Rollout helpers without vLLM: config checks, vLLM outputs -> ROLLOUT_SCHEMA, weight-sync list, parity.

vLLM's RequestOutput / CompletionOutput / Logprob are FAKED here with SimpleNamespace objects that have only
the attributes the helpers read (outputs; index, token_ids, logprobs, finish_reason, stop_reason; logprob).
The real objects are exercised in tests/actors/test_rollout.py.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.arrow import ROLLOUT_SCHEMA, ragged_to_numpy
from pipeline.rollout import (RolloutConfig, engine_range, logprob_parity, outputs_to_rollout_table, prompt_logprobs_to_numpy,
                              sampling_params_kwargs, weights_for_sync)

EOS = 2


def fake_sample(index, token_ids, logprobs, finish_reason, stop_reason=None):
    """A fake vLLM CompletionOutput: logprobs[j] = {sampled token: Logprob-like}, as with SamplingParams(logprobs=0)."""
    steps = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(token_ids, logprobs)]
    return SimpleNamespace(index=index, token_ids=token_ids, logprobs=steps, finish_reason=finish_reason,
                           stop_reason=stop_reason)


def fake_request(*samples):
    """A fake vLLM RequestOutput."""
    return SimpleNamespace(outputs=list(samples))


def test_config_defaults_and_context():
    cfg = RolloutConfig()
    assert cfg.max_model_len == 512 + 64 + 1


@pytest.mark.parametrize("field, value", [("engines", 0), ("n_samples", 0), ("temperature", 0.0), ("top_p", 0.0),
                                          ("top_p", 1.5), ("max_new_tokens", 0), ("max_prompt_tokens", 0),
                                          ("gpu_memory_utilization", 0.0), ("cpus_per_engine", 0),
                                          ("gpus_per_engine", -1)])
def test_config_rejects_bad_values_naming_field_and_fix(field, value):
    with pytest.raises(ValueError, match=rf"rollout\.{field} .*Fix: --rollout\.{field} "):
        RolloutConfig(**{field: value})


@pytest.mark.parametrize("engines, expected", [(2, (2, 2)), ("3", (3, 3)), ("1..4", (1, 4)), ("2..2", (2, 2))])
def test_engines_is_a_count_or_an_elastic_range(engines, expected):
    cfg = RolloutConfig(engines=engines)
    assert (cfg.min_engines, cfg.max_engines) == expected and cfg.elastic == (expected[0] < expected[1])


@pytest.mark.parametrize("engines", ["0..2", "3..1", "1..", "..2", "a..b", "1-2", 0])
def test_a_bad_engine_range_names_the_field_and_the_fix(engines):
    with pytest.raises(ValueError, match=r"rollout\.engines must be N >= 1 or MIN\.\.MAX .*Fix: --rollout\.engines 2, or --rollout\.engines 1\.\.4"):
        engine_range(engines)


def test_sampling_params_kwargs():
    kwargs = sampling_params_kwargs(RolloutConfig(n_samples=3, temperature=0.7, top_p=0.9, max_new_tokens=5))
    assert kwargs["n"] == 3 and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9 and kwargs["max_tokens"] == 5
    assert kwargs["logprobs"] == 0           # the sampled token's log-prob only
    assert kwargs["seed"] is None            # no seed given: the engine's own generator
    seeded = sampling_params_kwargs(RolloutConfig(), n_samples=1, seed=11)
    assert seeded["n"] == 1 and seeded["seed"] == 11


def test_outputs_to_rollout_table_order_schema_and_finished():
    outputs = [
        fake_request(fake_sample(1, [7, 8], [-0.5, -0.6], "length"),            # listed out of index order
                     fake_sample(0, [5, EOS], [-0.1, -0.2], "stop")),             # EOS stop: kept as last token
        fake_request(fake_sample(0, [9, 11], [-1.0, -1.1], "stop", stop_reason=11),  # stop token id: finished
                     fake_sample(1, [9, 10], [-1.0, -1.2], "stop", stop_reason="xy")),  # stop string: not finished
    ]
    table = outputs_to_rollout_table([[1, 2, 3], [4]], ["p0", "p1"], outputs, eos_token_id=EOS)
    assert table.schema == ROLLOUT_SCHEMA
    assert table["prompt_id"].to_pylist() == ["p0", "p0", "p1", "p1"]
    assert [r.tolist() for r in ragged_to_numpy(table["prompt_ids"])] == [[1, 2, 3], [1, 2, 3], [4], [4]]
    assert [r.tolist() for r in ragged_to_numpy(table["response_ids"])] == [[5, EOS], [7, 8], [9, 11], [9, 10]]
    np.testing.assert_allclose(ragged_to_numpy(table["sample_logprobs"])[1], [-0.5, -0.6], rtol=1e-6)
    assert table["finish_reason"].to_pylist() == ["stop", "length", "stop", "stop"]
    assert table["finished"].to_pylist() == [True, False, True, False]


def test_outputs_to_rollout_table_refuses_a_stop_without_its_token():
    outputs = [fake_request(fake_sample(0, [5, 6], [-0.1, -0.2], "stop"))]  # EOS stop, EOS missing
    with pytest.raises(RuntimeError, match="does not end with it"):
        outputs_to_rollout_table([[1]], ["p0"], outputs, eos_token_id=EOS)


def test_outputs_to_rollout_table_needs_logprobs_and_matching_lengths():
    sample = fake_sample(0, [5], [-0.1], "length")
    sample.logprobs = None
    with pytest.raises(ValueError, match="logprobs=0"):
        outputs_to_rollout_table([[1]], ["p0"], [fake_request(sample)], eos_token_id=EOS)
    with pytest.raises(ValueError, match="must be equal"):
        outputs_to_rollout_table([[1], [2]], ["p0"], [], eos_token_id=EOS)


def test_prompt_logprobs_to_numpy():
    sequence = [1, 2, 3, 4]
    fake_prompt_logprobs = [None] + [{t: SimpleNamespace(logprob=-float(t))} for t in sequence[1:]]
    np.testing.assert_array_equal(prompt_logprobs_to_numpy(fake_prompt_logprobs, sequence, start=2), [-3.0, -4.0])


def test_weights_for_sync_ties_lm_head_to_embeddings():
    embed, stale_head, other = torch.ones(4, 2), torch.zeros(4, 2), torch.ones(3)
    state = {"model.embed_tokens.weight": embed, "lm_head.weight": stale_head, "model.norm.weight": other}
    tied = dict(weights_for_sync(state, tie_word_embeddings=True))
    assert tied["lm_head.weight"] is embed and tied["model.norm.weight"] is other and len(tied) == 3
    no_head = dict(weights_for_sync({"model.embed_tokens.weight": embed}, tie_word_embeddings=True))
    assert no_head["lm_head.weight"] is embed          # the trap: a state dict without the tied duplicate
    untied = dict(weights_for_sync(state, tie_word_embeddings=False))
    assert untied["lm_head.weight"] is stale_head
    with pytest.raises(ValueError, match="embed_tokens"):
        weights_for_sync({"model.norm.weight": other}, tie_word_embeddings=True)


def test_tied_head_stream_sends_the_embedding_as_the_head():
    """The broadcast's stream (named_parameters order, a tied weight once): the head follows the embedding."""
    from pipeline.rollout import tied_head_stream

    embed, stale_head, other = torch.ones(4, 2), torch.zeros(4, 2), torch.ones(3)
    items = [("model.embed_tokens.weight", embed), ("model.norm.weight", other)]
    tied = list(tied_head_stream(items, True))
    assert [n for n, _ in tied] == ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    assert tied[1][1] is embed
    assert list(tied_head_stream(items + [("lm_head.weight", stale_head)], True)) == tied  # a stale head is dropped
    assert list(tied_head_stream(items, False)) == items


def test_logprob_parity():
    a = [np.array([-1.0, -2.0]), np.array([], np.float32), np.array([-3.0])]
    b = [np.array([-1.0, -2.5]), np.array([], np.float32), np.array([-3.1])]
    assert logprob_parity(a, b) == pytest.approx(0.5)
    assert logprob_parity(a, a) == 0.0
    assert logprob_parity([np.array([np.nan])], [np.array([0.0])]) == float("inf")  # NaN never passes `< tol`
    with pytest.raises(ValueError):
        logprob_parity(a, b[:2])


def test_outputs_to_rollout_table_copies_each_prompts_extra_contexts_onto_its_samples():
    from pipeline.arrow import CONTEXT_COLUMN, arrow_to_contexts

    outputs = [fake_request(fake_sample(0, [5, EOS], [-0.1, -0.2], "stop"), fake_sample(1, [7], [-0.5], "length")),
               fake_request(fake_sample(0, [9], [-1.0], "length"))]
    contexts = [[[1], [2, 3]], [[4], [5]]]  # contrastive: (principle, anti) per prompt
    table = outputs_to_rollout_table([[1, 2, 3], [4]], ["p0", "p1"], outputs, EOS, contexts)
    got = [[c.tolist() for c in row] for row in arrow_to_contexts(table[CONTEXT_COLUMN])]
    assert got == [contexts[0], contexts[0], contexts[1]]
    assert table.select(ROLLOUT_SCHEMA.names).schema == ROLLOUT_SCHEMA
    assert outputs_to_rollout_table([[1, 2, 3], [4]], ["p0", "p1"], outputs, EOS).schema == ROLLOUT_SCHEMA  # raw: none
def test_prompt_probe_splits_each_prompt_into_prompt_and_response():
    """The parity probe of an engine replaced before any batch exists: prompts' tails as responses, nothing dropped."""
    from pipeline.arrow import ragged_to_numpy
    from pipeline.rollout import prompt_probe

    probe = prompt_probe([np.array([1]), np.array([1, 2, 3]), np.arange(10), np.arange(5)], rows=2)
    assert [p.tolist() for p in ragged_to_numpy(probe["prompt_ids"])] == [[1], [0, 1, 2, 3, 4, 5]]
    assert [r.tolist() for r in ragged_to_numpy(probe["response_ids"])] == [[2, 3], [6, 7, 8, 9]]

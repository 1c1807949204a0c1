"""The sentence-RM actor: Arrow in, Arrow out through Ray, identical to the in-process computation."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.sentence_rm import SENTENCE_RM_FIELDS, SentenceRMActor, SentenceRMScorer
from pipeline.arrow import numpy_to_ragged, ragged_to_numpy
from pipeline.chat import encode_prompt, encode_response
from pipeline.models import load_tokenizer
from pipeline.sentence_rewards import dense_sentence_rewards
from pipeline.sentence_rm import (RewardModelConfig, build_reward_model, load_reward_model,
                                  save_reward_model)


def rollout_like(tokenizer) -> pa.Table:
    texts = ["One. Two.", "A single sentence", "Hi! How are you? Fine.", "Cut here. And th"]
    finished = [True, True, True, False]
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": f"Question {i}?"}]) for i in range(4)]
    responses = [encode_response(tokenizer, t, done) for t, done in zip(texts, finished)]
    return pa.table({"prompt_id": [f"p{i}" for i in range(4)], "prompt_ids": numpy_to_ragged(prompts, pa.int32()),
                     "response_ids": numpy_to_ragged(responses, pa.int32()), "finished": finished,
                     "tag": [f"row{i}" for i in range(4)]})


def test_actor_appends_dense_rewards_in_row_order(tiny_sentence_rm_dir, local_ray):
    model, tokenizer, _ = load_reward_model(tiny_sentence_rm_dir)
    table = rollout_like(tokenizer)
    want_dense, want_scores = dense_sentence_rewards(model, tokenizer, tokenizer.convert_tokens_to_ids("<END>"),
                                                     ragged_to_numpy(table["prompt_ids"]),
                                                     ragged_to_numpy(table["response_ids"]), "pysbd",
                                                     table["finished"].to_pylist())

    actor = SentenceRMActor.remote(tiny_sentence_rm_dir, "cpu")
    scored = local_ray.get(actor.score.remote(local_ray.put(table)))
    assert scored.column_names == table.column_names + [name for name, _ in SENTENCE_RM_FIELDS]
    assert scored.schema.field("sentence_rewards").type == pa.list_(pa.float32())
    assert scored.schema.field("sentence_reward").type == pa.float32()
    assert scored.select(table.column_names).equals(table)  # input columns and row order untouched
    np.testing.assert_allclose(scored["sentence_reward"].to_numpy(), want_scores, rtol=1e-5, atol=1e-5)
    for dense, want, ids, r in zip(ragged_to_numpy(scored["sentence_rewards"]), want_dense,
                                   ragged_to_numpy(table["response_ids"]), want_scores):
        assert len(dense) == len(ids)
        np.testing.assert_allclose(dense, want, atol=1e-5)
        np.testing.assert_allclose(dense.sum(), r, rtol=1e-4, atol=1e-4)
    local_ray.kill(actor)


def test_cuda_request_without_gpu_fails_loudly(tiny_sentence_rm_dir, local_ray):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA GPU.*set the device option to 'cpu'"):
        SentenceRMScorer(tiny_sentence_rm_dir, "cuda")
    actor = SentenceRMActor.remote(tiny_sentence_rm_dir, "cuda")
    with pytest.raises(Exception, match="no CUDA GPU"):
        local_ray.get(actor.__ray_ready__.remote())


def test_baseline_rm_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModel

    tokenizer = load_tokenizer(tiny_model_dir)
    model = build_reward_model("response", AutoModel.from_pretrained(tiny_model_dir))
    save_reward_model(model, tokenizer, str(tmp_path), RewardModelConfig(kind="response"))
    with pytest.raises(ValueError, match="'response' reward model.*sentence-level"):
        SentenceRMScorer(str(tmp_path), "cpu")

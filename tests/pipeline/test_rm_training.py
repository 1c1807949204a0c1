"""Reward-model training parts without Ray: encoding per kind, truncation, shards and steps, the BT step, accuracy."""
import numpy as np
import pytest
import torch

from pipeline.chat import encode_prompt
from pipeline.data import pairs_table, split_prompts
from pipeline.models import load_tokenizer
from pipeline.rm_training import (EncodedPairs, accuracy_by_subset, encode_pairs, encode_side, epoch_steps,
                                  evaluate_pairs, pair_loss, shard_indices)
from pipeline.sentence_rm import RewardOutput, add_boundary_token, build_reward_model

PAIRS = [
    {"pair_id": "t:0", "subset": "a", "prompt": [{"role": "user", "content": "Tell me about Paris."}],
     "chosen": "Paris is the capital of France. It is on the Seine.", "rejected": "No."},
    {"pair_id": "t:1", "subset": "a", "prompt": [{"role": "user", "content": "Say hello."}],
     "chosen": "Hello there! Nice to meet you.", "rejected": "Go away."},
    {"pair_id": "t:2", "subset": "b", "prompt": [{"role": "user", "content": "Count to three."}],
     "chosen": "One, two, three.", "rejected": "Four. Five. Six. Seven."},
]


def load(tiny_model_dir, kind, seed=0):
    from transformers import AutoModel

    tokenizer = load_tokenizer(tiny_model_dir)
    backbone = AutoModel.from_pretrained(tiny_model_dir)
    boundary_id = add_boundary_token(tokenizer, backbone) if kind == "sentence" else None
    torch.manual_seed(seed)
    return build_reward_model(kind, backbone, boundary_id, attn_dim=16), tokenizer, boundary_id


@pytest.mark.parametrize("kind", ["sentence", "response", "token"])
def test_encoding_for_each_kind(tiny_model_dir, kind):
    _, tokenizer, boundary_id = load(tiny_model_dir, kind)
    encoded = encode_pairs(pairs_table(PAIRS), tokenizer, kind, boundary_id, max_length=512)
    assert len(encoded) == 3 and encoded.subsets == ["a", "a", "b"] and encoded.truncated == 0
    prompt = encode_prompt(tokenizer, PAIRS[0]["prompt"])
    for example in encoded.chosen + encoded.rejected:
        assert example["input_ids"][-1] == (boundary_id if kind == "sentence" else tokenizer.eos_token_id)
    first = encoded.chosen[0]
    assert first["input_ids"][:len(prompt)] == prompt
    if kind == "sentence":  # prompt E s_1 E s_2 E EOS E: markers h_0..h_K with K = 2 sentences
        assert len(first["boundary_positions"]) == 3 and first["boundary_positions"][0] == len(prompt)
    else:
        assert "boundary_positions" not in first and boundary_id not in first["input_ids"]


@pytest.mark.parametrize("kind", ["sentence", "response"])
def test_truncation_cuts_prompt_left_then_response_right(tiny_model_dir, kind):
    _, tokenizer, boundary_id = load(tiny_model_dir, kind)
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "word " * 200}])
    response = "This is a sentence. " * 40
    full, cut = encode_side(kind, prompt, response, tokenizer, boundary_id, "pysbd", max_length=10_000)
    assert not cut
    # 1) only the prompt is too long: its oldest tokens go, the response and the prompt's end stay
    budget = len(full["input_ids"]) - 100
    example, cut = encode_side(kind, prompt, response, tokenizer, boundary_id, "pysbd", max_length=budget)
    assert cut and len(example["input_ids"]) == budget
    assert example["input_ids"][-len(full["input_ids"]) + 100:] == full["input_ids"][100:]
    # 2) the response alone is too long: one prompt token is left and the response is a prefix of the original
    example, cut = encode_side(kind, prompt, response, tokenizer, boundary_id, "pysbd", max_length=40)
    assert cut and len(example["input_ids"]) <= 40 and example["input_ids"][0] == prompt[-1]
    kept = tokenizer.decode(example["response_ids"])
    assert 0 < len(kept) < len(response) and response.startswith(kept)
    with pytest.raises(ValueError, match="train.max_length"):
        encode_side(kind, prompt, response, tokenizer, boundary_id, "pysbd", max_length=1)
    encoded = encode_pairs(pairs_table(PAIRS), tokenizer, kind, boundary_id, max_length=40)
    assert encoded.truncated > 0 and all(len(e["input_ids"]) <= 40 for e in encoded.chosen + encoded.rejected)


@pytest.mark.parametrize("kind", ["sentence", "response", "token"])
def test_one_bradley_terry_step_lowers_the_loss(tiny_model_dir, kind):
    model, tokenizer, boundary_id = load(tiny_model_dir, kind)
    encoded = encode_pairs(pairs_table(PAIRS), tokenizer, kind, boundary_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    before, metrics = pair_loss(model, encoded.chosen, encoded.rejected, tokenizer.pad_token_id)
    assert metrics["loss"] == pytest.approx(before.item()) and 0.0 <= metrics["accuracy"] <= 1.0
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = pair_loss(model, encoded.chosen, encoded.rejected, tokenizer.pad_token_id)
    assert after.item() < before.item()


class LengthModel(torch.nn.Module):
    """Scores a sequence by its length: the longer side wins."""

    def forward(self, batch):
        score = batch["attention_mask"].sum(dim=1).float()
        return RewardOutput(score=score, values=score[:, None], mask=torch.ones_like(score, dtype=torch.bool)[:, None])


def test_accuracy_per_subset_on_a_hand_made_case(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    # subset a: the chosen side is longer twice (100%); subset b: shorter (0%); overall 2 of 3
    encoded = encode_pairs(pairs_table(PAIRS), tokenizer, "response")
    accuracy = evaluate_pairs(LengthModel(), encoded, batch_size=2, pad_id=tokenizer.pad_token_id)
    assert accuracy == pytest.approx({"a": 1.0, "b": 0.0, "overall": 2 / 3})
    tie = accuracy_by_subset(["x", "x"], np.array([1.0, 2.0]), np.array([1.0, 0.0]))
    assert tie == {"x": 0.75, "overall": 0.75}  # a tie counts half
    empty = evaluate_pairs(LengthModel(), EncodedPairs([], [], [], 0), 2, tokenizer.pad_token_id)
    assert np.isnan(empty["overall"])


def test_split_shards_and_steps_are_deterministic():
    table = pairs_table([dict(PAIRS[0], pair_id=f"t:{i}") for i in range(20)])
    train, heldout = split_prompts(table, 0.1, seed=3)
    again_train, again_heldout = split_prompts(table, 0.1, seed=3)
    assert train.equals(again_train) and heldout.equals(again_heldout) and heldout.num_rows == 2
    assert set(train["pair_id"].to_pylist()).isdisjoint(heldout["pair_id"].to_pylist())
    assert not split_prompts(table, 0.1, seed=4)[1].equals(heldout)

    shards = [shard_indices(9, 2, rank, seed=0) for rank in range(2)]
    assert shards == [shard_indices(9, 2, rank, seed=0) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4 and set(shards[0]).isdisjoint(shards[1])  # 1 pair left over

    steps = epoch_steps(7, batch_size=2, grad_accum=2, seed=0, epoch=0)
    assert steps == epoch_steps(7, 2, 2, 0, 0)
    assert [[len(m) for m in s] for s in steps] == [[2, 2], [2, 1]]
    assert sorted(i for s in steps for m in s for i in m) == list(range(7))
    assert steps != epoch_steps(7, 2, 2, 0, 1)  # reshuffled every epoch

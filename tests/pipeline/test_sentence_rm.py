"""Sentence-level RM (arXiv:2503.04793) and baselines on a tiny random Llama with the real tokenizer."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pipeline.models import load_tokenizer
from pipeline.sentence_rm import (BOUNDARY_TOKEN, RewardModelConfig, SentenceRewardModel, add_boundary_token,
                                  apply_rotary, bradley_terry_loss, build_reward_model, build_rm_input,
                                  build_sentence_rm_input, collate_rm_inputs, load_reward_model, save_reward_model)

RESPONSES = ["Paris is the capital. It is in France. Dr. Smith agrees.",
             "No.",
             "Here:\n- one\n- two\n\nThat's 3.5 items. Really",
             ""]


def load_model(tiny_model_dir, kind="sentence", attn_dim=16, freeze_layers=0, seed=0):
    from transformers import AutoModel

    tokenizer = load_tokenizer(tiny_model_dir)
    backbone = AutoModel.from_pretrained(tiny_model_dir)
    boundary_id = add_boundary_token(tokenizer, backbone)
    torch.manual_seed(seed)
    model = build_reward_model(kind, backbone, boundary_id, attn_dim=attn_dim, freeze_layers=freeze_layers)
    return model.eval(), tokenizer, boundary_id


@pytest.fixture(scope="module")
def sentence_rm(tiny_model_dir):
    return load_model(tiny_model_dir)


def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about Paris."}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def sentence_batch(tokenizer, boundary_id, responses=RESPONSES):
    examples = [build_sentence_rm_input(prompt_ids(tokenizer), r, tokenizer, boundary_id) for r in responses]
    return examples, collate_rm_inputs(examples, tokenizer.pad_token_id)


def test_input_layout(sentence_rm):
    _, tokenizer, boundary_id = sentence_rm
    prompt = prompt_ids(tokenizer)
    example = build_sentence_rm_input(prompt, RESPONSES[0], tokenizer, boundary_id)
    ids, positions = example["input_ids"], example["boundary_positions"]
    assert tokenizer.convert_tokens_to_ids(BOUNDARY_TOKEN) == boundary_id
    assert len(positions) == 4 and len(example["sentence_ends"]) == 3  # K = 3 sentences, markers j = 0..3
    assert all(ids[p] == boundary_id for p in positions)
    assert positions[0] == len(prompt)  # j = 0 right after the prompt
    # ... s_3 E EOS E: the final marker (after EOS) is h_K; the marker between s_3 and EOS is not read
    assert ids[-3:] == [boundary_id, tokenizer.eos_token_id, boundary_id] and positions[-1] == len(ids) - 1
    assert ids.count(boundary_id) == 5
    # the tokens between markers are the sentences, and sentence_ends index the response tokens
    response_ids = example["response_ids"]
    between = [ids[a + 1:b] for a, b in zip(positions, positions[1:-1] + [len(ids) - 3])]
    starts = [0] + [end + 1 for end in example["sentence_ends"][:-1]]
    assert between == [response_ids[s:e + 1] for s, e in zip(starts, example["sentence_ends"])]
    assert tokenizer.decode(between[1]).strip() == "It is in France."
    assert [i for i, m in zip(ids, example["response_mask"]) if m] == response_ids + [tokenizer.eos_token_id]


def test_empty_response_is_one_eos_sentence(sentence_rm):
    _, tokenizer, boundary_id = sentence_rm
    example = build_sentence_rm_input([1, 2], "", tokenizer, boundary_id)
    assert example["input_ids"] == [1, 2, boundary_id, tokenizer.eos_token_id, boundary_id]
    assert example["boundary_positions"] == [2, 4] and example["sentence_ends"] == [0]


def test_differential_rewards_and_attention(sentence_rm):
    model, tokenizer, boundary_id = sentence_rm
    examples, batch = sentence_batch(tokenizer, boundary_id)
    with torch.no_grad():
        out = model(batch)
    mask = batch["boundary_mask"]
    last = mask.sum(1) - 1
    v_last = out.values[torch.arange(len(examples)), last]
    torch.testing.assert_close(out.rewards.sum(1), v_last)  # sum_k r_k = v_0 + (v_K - v_0) = v_K
    torch.testing.assert_close(out.attention.sum(1), torch.ones(len(examples)))
    assert (out.attention[~mask] == 0).all() and (out.rewards[~mask] == 0).all()
    torch.testing.assert_close(out.score, (out.attention * out.rewards).sum(1))
    assert len({len(e["boundary_positions"]) for e in examples}) > 1  # really ragged


def test_batched_equals_unbatched(sentence_rm):
    model, tokenizer, boundary_id = sentence_rm
    _, batch = sentence_batch(tokenizer, boundary_id)
    with torch.no_grad():
        batched = model(batch).score
        alone = [model(sentence_batch(tokenizer, boundary_id, [r])[1]).score for r in RESPONSES]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)


def hand_built_model(sentence_rm, attn_dim=2):
    """A sentence RM whose head reads hand-set coordinates of hand-set hidden states."""
    model, _, boundary_id = sentence_rm
    hand = SentenceRewardModel(model.backbone, boundary_id, attn_dim=attn_dim)
    with torch.no_grad():
        for p in (hand.value_head.weight, hand.value_head.bias, hand.query.weight, hand.key.weight):
            p.zero_()
        hand.value_head.weight[0, 0] = 1.0  # v_j = h_j[0] + 0.5
        hand.value_head.bias.fill_(0.5)
        hand.query.weight[0, 1], hand.query.weight[1, 2] = 1.0, 1.0  # q = (h[1], h[2])
        hand.key.weight[0, 3], hand.key.weight[1, 4] = 1.0, 1.0  # k_j = (h_j[3], h_j[4])
    return hand


def hand_built_batch(hidden_rows):
    """4 markers (K = 3 sentences) at positions 1, 3, 5, 7 of an 8-token sequence."""
    hidden = torch.zeros(1, 8, 128)
    positions = [1, 3, 5, 7]
    for position, row in zip(positions, hidden_rows):
        hidden[0, position, :len(row)] = torch.tensor(row)
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "attention_mask": torch.ones(1, 8, dtype=torch.long),
             "boundary_positions": torch.tensor([positions]), "boundary_mask": torch.ones(1, 4, dtype=torch.bool)}
    return hidden, batch


def test_hand_built_three_sentences_uniform_attention(sentence_rm, monkeypatch):
    hand = hand_built_model(sentence_rm)
    hidden, batch = hand_built_batch([[0.5], [2.5], [1.5], [4.5, 1.0, 1.0]])  # v = 1, 3, 2, 5; all keys 0
    monkeypatch.setattr(hand, "hidden_states", lambda input_ids, attention_mask: hidden)
    out = hand(batch)
    torch.testing.assert_close(out.values, torch.tensor([[1.0, 3.0, 2.0, 5.0]]))
    torch.testing.assert_close(out.rewards, torch.tensor([[1.0, 2.0, -1.0, 3.0]]))  # r_0 = v_0, r_k = v_k - v_{k-1}
    torch.testing.assert_close(out.attention, torch.full((1, 4), 0.25))  # keys 0: equal logits
    torch.testing.assert_close(out.score, torch.tensor([1.25]))  # (1 + 2 - 1 + 3) / 4


def test_hand_built_three_sentences_rotary_attention(sentence_rm, monkeypatch):
    hand = hand_built_model(sentence_rm)
    rows = [[0.0, 0, 0, 1.0, 0.0], [1.0, 0, 0, 0.0, 2.0], [-1.0, 0, 0, 1.0, 1.0], [3.0, 1.0, 0.5, 0.5, 0.0]]
    hidden, batch = hand_built_batch(rows)
    monkeypatch.setattr(hand, "hidden_states", lambda input_ids, attention_mask: hidden)

    def rotate(x, angle):  # d = 2: one pair, frequency 1, angle = sentence index
        return (x[0] * math.cos(angle) - x[1] * math.sin(angle), x[0] * math.sin(angle) + x[1] * math.cos(angle))

    v = [row[0] + 0.5 for row in rows]  # 0.5, 1.5, -0.5, 3.5
    r = [v[0]] + [v[k] - v[k - 1] for k in range(1, 4)]
    q = rotate((rows[3][1], rows[3][2]), 3)
    logits = []
    for j, row in enumerate(rows):
        k = rotate((row[3], row[4]), j)
        logits.append((q[0] * k[0] + q[1] * k[1]) / math.sqrt(2))
    a = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    expected = sum(aj * rj for aj, rj in zip(a, r))

    out = hand(batch)
    torch.testing.assert_close(out.attention, torch.tensor([a]))
    torch.testing.assert_close(out.score, torch.tensor([expected]))
    assert abs(expected - sum(r) / 4) > 0.1  # attention is really not uniform here


def test_rotary_depends_on_relative_sentence_index():
    q, k = torch.randn(8), torch.randn(8)
    dot = lambda i, j: apply_rotary(q, torch.tensor(i)) @ apply_rotary(k, torch.tensor(j))  # noqa: E731
    torch.testing.assert_close(dot(5, 2), dot(13, 10))


def test_dense_rewards_on_last_token_of_each_sentence(sentence_rm):
    model, tokenizer, boundary_id = sentence_rm
    examples, batch = sentence_batch(tokenizer, boundary_id)
    length = max(len(e["response_ids"]) for e in examples) + 1  # response tokens + EOS
    with torch.no_grad():
        out = model(batch)
    dense = model.dense_rewards(out, batch["sentence_ends"], length)
    torch.testing.assert_close(dense.sum(1), out.score)  # the dense rewards sum to R
    weighted = out.attention * out.rewards
    for b, example in enumerate(examples):
        ends = example["sentence_ends"]
        expected = torch.zeros(length)
        for k, end in enumerate(ends, start=1):
            expected[end] = weighted[b, k] + (weighted[b, 0] if k == 1 else 0.0)  # a_0 r_0 joins sentence 1
        torch.testing.assert_close(dense[b], expected)
    assert examples[-1]["sentence_ends"] == [0]  # the empty response: its reward sits on the EOS


@pytest.mark.parametrize("kind", ["response", "token"])
def test_baselines_share_the_interface(tiny_model_dir, kind):
    model, tokenizer, boundary_id = load_model(tiny_model_dir, kind)
    examples = [build_rm_input(kind, prompt_ids(tokenizer), r, tokenizer, boundary_id) for r in RESPONSES]
    assert all(boundary_id not in e["input_ids"] for e in examples)
    with torch.no_grad():
        batched = model(collate_rm_inputs(examples, tokenizer.pad_token_id)).score
        alone = torch.cat([model(collate_rm_inputs([e], tokenizer.pad_token_id)).score for e in examples])
    assert batched.shape == (len(RESPONSES),)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    if kind == "token":  # R is the mean of v_t over response tokens + EOS
        example = examples[0]
        input_ids = torch.tensor([example["input_ids"]])
        hidden = model.hidden_states(input_ids, torch.ones_like(input_ids))
        values = model.value_head(hidden).squeeze(-1)[0]
        expected = values[torch.tensor(example["response_mask"]).bool()].mean()
        torch.testing.assert_close(batched[0], expected.detach(), atol=1e-5, rtol=1e-5)


def test_freeze_layers_keeps_the_marker_embedding_trainable(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir, freeze_layers=1)
    assert not model.backbone.get_input_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in model.backbone.layers[0].parameters())
    assert all(p.requires_grad for p in model.backbone.layers[1].parameters())
    assert model.boundary_embedding.requires_grad and model.value_head.weight.requires_grad
    tokenizer, boundary_id = load_tokenizer(tiny_model_dir), model.boundary_id
    tokenizer.add_tokens([BOUNDARY_TOKEN], special_tokens=True)
    _, batch = sentence_batch(tokenizer, boundary_id, RESPONSES[:2])
    score = model.train()(batch).score
    bradley_terry_loss(score[:1], score[1:]).backward()  # one BT step: the marker and the heads get gradients
    assert model.boundary_embedding.grad.abs().sum() > 0 and model.key.weight.grad.abs().sum() > 0
    assert model.backbone.layers[1].mlp.down_proj.weight.grad is not None
    assert model.backbone.get_input_embeddings().weight.grad is None
    with pytest.raises(ValueError, match="only 2 layers"):
        load_model(tiny_model_dir, freeze_layers=3)


def test_save_load_round_trip(tiny_model_dir, tmp_path):
    model, tokenizer, boundary_id = load_model(tiny_model_dir, seed=1)
    with torch.no_grad():
        model.boundary_embedding.add_(1.0)  # as if trained: must survive the round trip
        model.query.weight.mul_(3.0)
    config = RewardModelConfig(kind="sentence", attn_dim=16, splitter="pysbd")
    save_reward_model(model, tokenizer, str(tmp_path / "rm"), config)
    loaded, loaded_tokenizer, loaded_config = load_reward_model(str(tmp_path / "rm"))
    assert loaded_config == config and loaded_tokenizer.convert_tokens_to_ids(BOUNDARY_TOKEN) == boundary_id
    _, batch = sentence_batch(tokenizer, boundary_id)
    _, loaded_batch = sentence_batch(loaded_tokenizer, boundary_id)
    assert torch.equal(batch["input_ids"], loaded_batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).score, model(batch).score)


def test_bradley_terry_loss_known_value():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2  # -log sigmoid(1), -log sigmoid(0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_unknown_kind_and_odd_attn_dim(sentence_rm):
    model, _, boundary_id = sentence_rm
    with pytest.raises(ValueError, match="response"):
        build_reward_model("pairwise", model.backbone)
    with pytest.raises(ValueError, match="even"):
        build_reward_model("sentence", model.backbone, boundary_id, attn_dim=7)

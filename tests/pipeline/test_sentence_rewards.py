"""Dense sentence-RM rewards in the policy's token coordinates, on a tiny random sentence RM."""
import numpy as np
import pytest
import torch

from pipeline.chat import encode_prompt, encode_response
from pipeline.models import load_tokenizer
from pipeline.segment import split_sentences
from pipeline.sentence_rewards import dense_sentence_rewards, policy_token_spans, sentence_end_tokens
from pipeline.sentence_rm import add_boundary_token, build_reward_model, build_sentence_rm_input, collate_rm_inputs

TEXTS = ["Paris is the capital. It is in France. Dr. Smith agrees.",
         "No.",
         "Here:\n- one\n- two\n\nThat's 3.5 items. Really",
         "Il dit 你好. Café time."]


@pytest.fixture(scope="module")
def rm(tiny_model_dir):
    from transformers import AutoModel

    tokenizer = load_tokenizer(tiny_model_dir)
    backbone = AutoModel.from_pretrained(tiny_model_dir)
    boundary_id = add_boundary_token(tokenizer, backbone)
    torch.manual_seed(0)
    model = build_reward_model("sentence", backbone, boundary_id, attn_dim=16).eval()
    with torch.no_grad():  # a random head gives tiny values; scale it so rewards are clearly non-zero
        model.value_head.weight.mul_(50.0)
    return model, tokenizer, boundary_id


def prompt(tokenizer):
    return encode_prompt(tokenizer, [{"role": "user", "content": "Tell me something."}])


def score(rm, responses, finished=None):
    model, tokenizer, boundary_id = rm
    return dense_sentence_rewards(model, tokenizer, boundary_id, [prompt(tokenizer)] * len(responses), responses,
                                  "pysbd", finished, batch_size=3)


def rm_own_dense(rm, text):
    """The RM's dense rewards in ITS tokenization of `text` (response tokens, then EOS)."""
    model, tokenizer, boundary_id = rm
    example = build_sentence_rm_input(prompt(tokenizer), text, tokenizer, boundary_id)
    batch = collate_rm_inputs([example], tokenizer.pad_token_id)
    with torch.no_grad():
        dense = model.dense_rewards(model(batch), batch["sentence_ends"], len(example["response_ids"]) + 1)
    return example, dense[0].numpy()


def sentence_texts(text):
    return [text[s:e].strip() for s, e in split_sentences(text)]


def test_rewards_land_on_sentence_ends_and_sum_to_r(rm):
    _, tokenizer, _ = rm
    responses = [encode_response(tokenizer, t) for t in TEXTS]  # finished: ends with EOS
    dense, scores = score(rm, responses)
    assert scores.dtype == np.float32 and all(d.dtype == np.float32 for d in dense)
    for text, ids, d, r in zip(TEXTS, responses, dense, scores):
        assert len(d) == len(ids)
        np.testing.assert_allclose(d.sum(), r, rtol=1e-5, atol=1e-5)
        where = np.flatnonzero(d).tolist()
        sentences = sentence_texts(text)
        assert len(where) == len(sentences) and where[-1] == len(ids) - 1  # the last sentence's reward is on EOS
        for end, sentence in zip(where[:-1], sentences):
            assert tokenizer.decode(ids[:end + 1]).rstrip().endswith(sentence)
        # policy tokens == RM tokens: the RM's own dense rewards, the last sentence's moved onto the EOS
        example, own = rm_own_dense(rm, text)
        assert ids[:-1] == example["response_ids"]
        last = example["sentence_ends"][-1]
        own[-1], own[last] = own[last], 0.0
        np.testing.assert_allclose(d, own, atol=1e-5)
    assert sentence_texts(TEXTS[3]) == ["Il dit 你好.", "Café time."]  # multi-byte characters before an end


def test_unfinished_response_puts_the_last_sentence_on_its_last_token(rm):
    _, tokenizer, _ = rm
    text = TEXTS[0]
    finished_ids = encode_response(tokenizer, text)
    (done, cut), scores = score(rm, [finished_ids, finished_ids[:-1]], finished=[True, False])
    assert len(cut) == len(done) - 1
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)  # same text: the RM reads the same input
    np.testing.assert_allclose(cut.sum(), scores[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cut[:-1], done[:-2], atol=1e-6)
    assert cut[-1] == pytest.approx(done[-1], abs=1e-6)  # sentence K: on the EOS, or on the last token when cut
    # finished inferred from a trailing EOS when not given
    dense, _ = score(rm, [finished_ids, finished_ids[:-1]])
    np.testing.assert_allclose(dense[0], done, atol=1e-6)
    np.testing.assert_allclose(dense[1], cut, atol=1e-6)


def test_policy_tokenization_that_differs_from_the_rm_maps_by_characters(rm):
    _, tokenizer, _ = rm
    text = "Say Hello. It is fine. Bye."
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    assert ids(" Hello") != ids(" H") + ids("ello")
    policy = ids("Say") + ids(" H") + ids("ello") + ids(". It is fine. Bye.") + [tokenizer.eos_token_id]
    assert tokenizer.decode(policy[:-1]) == text
    example, own = rm_own_dense(rm, text)
    assert policy[:-1] != example["response_ids"]  # the RM re-tokenizes " Hello" as one token

    (dense,), (r,) = score(rm, [policy])
    np.testing.assert_allclose(dense.sum(), r, rtol=1e-5, atol=1e-5)
    where = np.flatnonzero(dense).tolist()
    assert example["sentence_ends"][:2] == [2, 6]  # the RM's indices: one token off in the policy's coordinates
    assert where == [3, 7, len(policy) - 1] and policy[3] == ids(".")[0]
    for end, sentence in zip(where, ["Say Hello.", "It is fine."]):
        assert tokenizer.decode(policy[:end + 1]).rstrip().endswith(sentence)
    np.testing.assert_allclose(dense[where], own[np.flatnonzero(own)], atol=1e-5)  # same rewards, moved


def test_empty_and_whitespace_responses(rm):
    _, tokenizer, _ = rm
    eos = tokenizer.eos_token_id
    blank = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    responses = [[eos], blank, blank + [eos]]
    dense, scores = score(rm, responses, finished=[True, False, True])
    for d, r, resp in zip(dense, scores, responses):
        assert len(d) == len(resp) and np.flatnonzero(d).tolist() == [len(resp) - 1]
        np.testing.assert_allclose(d.sum(), r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no response token"):
        score(rm, [[]], finished=[False])


def test_split_characters_and_straddling_tokens():
    class ByteSplit:  # decodes like a byte-level tokenizer: an unfinished character shows as U+FFFD
        def decode(self, ids, **_):
            raw = b"".join({0: b"Done", 1: b"!", 2: b"\xe4\xbd", 3: b"\xa0", 4: b" way."}[i] for i in ids)
            return raw.decode("utf-8", errors="replace")

        def batch_decode(self, sequences, **kw):
            return [self.decode(s) for s in sequences]

    text, offsets = policy_token_spans(ByteSplit(), [0, 1, 2, 3, 4])
    assert text == "Done!你 way." and offsets == [(0, 4), (4, 5), (5, 5), (5, 6), (6, 11)]
    # one token ("ne!N") holds the end of sentence 1 and the start of sentence 2: sentence 1's reward goes there
    text = "Done!No way."
    assert sentence_end_tokens(text, [(0, 5), (5, 12)], [(0, 2), (2, 6), (6, 7), (7, 11), (11, 12)]) == [1, 4]
    # trailing whitespace tokens stay with their sentence, as in pipeline.segment.align_sentences
    text = "Hi.\n\nYo."
    assert sentence_end_tokens(text, [(0, 5), (5, 8)], [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8)]) == [2, 4]

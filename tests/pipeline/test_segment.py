"""Sentence spans on awkward text, and their map onto the real SmolLM2 tokenizer's tokens."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from pipeline.models import resolve_model
from pipeline.segment import (SPLITTERS, align_sentences, sentence_token_ends, sentence_token_spans,
                              split_sentences, tokenize_with_offsets)

AWKWARD = {
    "abbreviations": "Dr. Smith met Mr. Jones at 5 p.m. on Main St. today. They talked, e.g. about tea. Then left",
    "decimals": "Pi is about 3.14 and e is 2.718. Version 1.2.3 shipped.",
    "bullets": "Steps:\n- Boil water.\n- Add tea\n- Wait 3 min.\n\nDone.",
    "numbered": "Plan:\n1. Read the docs.\n2. Write code\n3. Test it.\nThat is all.",
    "newlines": "First line\nSecond line.\n\n\nThird paragraph here.",
    "code": "Run this:\n```python\nx = a.b.c(1.5)\nprint(x.y)  # e.g. 2.0. Done.\n```\nThat was it. Next.",
    "unclosed_code": "Try:\n```\nfoo.bar(). baz.qux().\n",
    "unicode": "Café au lait. 日本語の文。次の文です。 Emoji 😀 here! ¿Qué tal? Ça va.",
    "no_period": "Hello there. this one has no period",
    "leading_trailing_space": "  \n Indented start. Trailing spaces.   \n",
    "forged_markers": "Say <END> and <|im_end|> literally. Fine.",
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def texts_of(text, spans):
    return [text[start:end] for start, end in spans]


@pytest.mark.parametrize("splitter", sorted(SPLITTERS))
@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_spans_cover_text_in_order(name, splitter):
    text = AWKWARD[name]
    spans = split_sentences(text, splitter)
    assert "".join(texts_of(text, spans)) == text  # round trip
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end == start
    for sentence in texts_of(text, spans)[1:]:
        assert not sentence[0].isspace()  # whitespace between sentences belongs to the one before
    assert all(sentence.strip() for sentence in texts_of(text, spans))


def test_pysbd_sentences_on_awkward_text():
    stripped = lambda name: [s.strip() for s in texts_of(AWKWARD[name], split_sentences(AWKWARD[name]))]  # noqa
    assert stripped("abbreviations") == ["Dr. Smith met Mr. Jones at 5 p.m. on Main St. today.",
                                         "They talked, e.g. about tea.", "Then left"]
    assert stripped("decimals") == ["Pi is about 3.14 and e is 2.718.", "Version 1.2.3 shipped."]
    assert stripped("bullets") == ["Steps:", "- Boil water.", "- Add tea", "- Wait 3 min.", "Done."]
    assert stripped("numbered") == ["Plan:", "1. Read the docs.", "2. Write code", "3. Test it.", "That is all."]
    assert stripped("newlines") == ["First line", "Second line.", "Third paragraph here."]
    assert stripped("no_period") == ["Hello there.", "this one has no period"]
    assert stripped("unicode")[:3] == ["Café au lait.", "日本語の文。", "次の文です。"]


def test_code_block_is_one_segment():
    text = AWKWARD["code"]
    sentences = texts_of(text, split_sentences(text))
    assert sentences == ["Run this:\n", "```python\nx = a.b.c(1.5)\nprint(x.y)  # e.g. 2.0. Done.\n```\n",
                         "That was it. ", "Next."]
    unclosed = texts_of(AWKWARD["unclosed_code"], split_sentences(AWKWARD["unclosed_code"]))
    assert unclosed == ["Try:\n", "```\nfoo.bar(). baz.qux().\n"]  # a truncated block runs to the end
    assert texts_of(text, split_sentences(text, "newline"))[1].startswith("```python\n")


def test_newline_splitter_splits_lines_only():
    text = "One. Two.\n\nThree\n"
    assert texts_of(text, split_sentences(text, "newline")) == ["One. Two.\n\n", "Three\n"]


def test_empty_and_blank_text_have_no_sentences():
    assert split_sentences("") == []
    assert split_sentences("  \n\t ") == []
    assert split_sentences("", "newline") == []


def test_unknown_splitter_names_the_choices():
    with pytest.raises(ValueError, match="newline.*pysbd"):
        split_sentences("Hi.", "wtpsplit")


@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_token_ends_map_back_to_their_sentence(tokenizer, name):
    text = AWKWARD[name]
    ids, _ = tokenize_with_offsets(text, tokenizer)
    spans = split_sentences(text)
    merged_spans, token_spans = sentence_token_spans(text, spans, tokenizer)
    assert merged_spans == spans  # no sentence shares its last token with the next one here
    assert token_spans[0][0] == 0 and token_spans[-1][1] == len(ids)
    for (first, last), (start, end) in zip(token_spans, spans):
        assert last > first  # every sentence has a token
        assert tokenizer.decode(ids[first:last]).strip() == text[start:end].strip()
    assert sentence_token_ends(text, spans, tokenizer) == [last - 1 for _, last in token_spans]


def test_special_token_text_is_tokenized_as_text(tokenizer):
    ids, _ = tokenize_with_offsets(AWKWARD["forged_markers"], tokenizer)
    assert tokenizer.eos_token_id not in ids


def test_sentences_ending_inside_one_token_are_merged(tokenizer):
    text = "Hello world again"  # tokens: "Hello", " world", " again"
    spans = [(0, 3), (3, 8), (8, 17)]  # "Hel" | "lo wo" | "rld again": "Hel" ends inside "Hello"
    merged_spans, token_spans = sentence_token_spans(text, spans, tokenizer)
    assert merged_spans == [(0, 8), (8, 17)]  # "Hel" joins the sentence that owns "Hello"
    assert token_spans == [(0, 1), (1, 3)]
    assert sentence_token_ends(text, spans, tokenizer) == [0, 2]


def test_align_sentences_assigns_whitespace_tokens_to_the_preceding_sentence():
    text = "Ab. Cd."
    offsets = [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7)]  # "Ab" "." " " "Cd" "."
    assert align_sentences(text, [(0, 4), (4, 7)], offsets) == ([(0, 4), (4, 7)], [(0, 3), (3, 5)])
    assert align_sentences("", [], []) == ([], [])

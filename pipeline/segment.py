"""Sentence segmentation for the sentence-level reward model (DESIGN.md section 3), and its map onto tokens.

    spans = split_sentences(text)                          # [(start, end), ...] character spans
    spans, token_spans = sentence_token_spans(text, spans, tokenizer)   # [(first, last + 1), ...] tokens

Span rule (every splitter): the spans cover the text exactly, in order, with no gaps, so
"".join(text[s:e] for s, e in spans) == text. A sentence starts at its first non-space character and runs up
to the next sentence's start, so whitespace between two sentences belongs to the preceding one; the first
sentence also takes the text's leading whitespace. A text with no non-space character has no sentences: [].

Fenced code blocks (``` or ~~~ at the start of a line, up to the matching closing fence or the end of the
text) are one segment each, whatever the splitter; only the prose between them goes to the splitter.

Splitters are pluggable: SPLITTERS maps a name to a function text -> [(start, end)] giving the sentences of a
piece of prose; only their start offsets are used, the span rule above does the rest.
"""
from __future__ import annotations

import bisect
import re
from typing import Callable

import pysbd

Span = tuple[int, int]

# ``` or ~~~ at the start of a line, then anything up to the same fence alone on a line, or the end of the text
CODE_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?(?:^[ \t]*\1[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
NON_SPACE = re.compile(r"\S")


def pysbd_sentences(text: str) -> list[Span]:
    """Rule-based English splitter (pysbd): knows abbreviations (Dr., e.g.), decimals, URLs, list markers."""
    segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)  # holds per-call state: one per call
    return [(s.start, s.end) for s in segmenter.segment(text)]


def newline_sentences(text: str) -> list[Span]:
    """Trivial splitter: every line with text on it is a sentence."""
    return [m.span() for m in re.finditer(r"[^\n]*\S[^\n]*", text)]


SPLITTERS: dict[str, Callable[[str], list[Span]]] = {"pysbd": pysbd_sentences, "newline": newline_sentences}


def split_sentences(text: str, splitter: str = "pysbd") -> list[Span]:
    """Character spans (start, end) of the sentences of `text`, covering it exactly (see the module docstring)."""
    if splitter not in SPLITTERS:
        raise ValueError(f"unknown sentence splitter {splitter!r}; choose one of {sorted(SPLITTERS)}.")
    split = SPLITTERS[splitter]
    starts = []
    prose_start = 0
    for block in CODE_FENCE.finditer(text):
        starts += [prose_start + s for s, _ in split(text[prose_start:block.start()])]
        starts.append(block.start())  # a code block is one segment
        prose_start = block.end()
    starts += [prose_start + s for s, _ in split(text[prose_start:])]
    return spans_from_starts(text, starts)


def spans_from_starts(text: str, starts: list[int]) -> list[Span]:
    """The span rule: each sentence starts at a non-space char and runs to the next one's start."""
    cuts = []
    for start in starts:
        first_char = NON_SPACE.search(text, start)
        if first_char and (not cuts or first_char.start() > cuts[-1]):
            cuts.append(first_char.start())
    if not cuts:
        return []
    cuts[0] = 0  # leading whitespace joins the first sentence
    return list(zip(cuts, cuts[1:] + [len(text)]))


def tokenize_with_offsets(text: str, tokenizer) -> tuple[list[int], list[Span]]:
    """Token ids of `text` (no special tokens added) and each token's character span in `text`.

    split_special_tokens=True: text that spells a special token ("<END>", "<|im_end|>") is tokenized as plain
    text, so a response can never forge a boundary marker or an EOS.
    """
    encoding = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def align_sentences(text: str, spans: list[Span], offsets: list[Span]) -> tuple[list[Span], list[Span]]:
    """(character spans, token spans (first, last + 1)) per sentence, given each token's character span.

    A token belongs to the sentence holding its last non-space character (a whitespace-only token: its first
    character). A sentence that no token ends in (its last characters share a token with the next sentence's
    first ones) is merged into the next sentence, so the two lists may be shorter than `spans`; every sentence
    returned has at least one token.
    """
    if not spans or not offsets:
        return [], []
    starts = [start for start, _ in spans]
    owners = []  # sentence index of each token
    for start, end in offsets:
        visible = len(text[start:end].rstrip())
        anchor = min(start + visible - 1 if visible else start, len(text) - 1)
        owner = min(max(bisect.bisect_right(starts, anchor) - 1, 0), len(spans) - 1)
        owners.append(max(owner, owners[-1]) if owners else owner)  # keep token order = sentence order
    char_spans, token_spans = [], []
    group_start = 0  # first sentence of the group being merged
    token = 0
    for k in range(len(spans)):
        first = token
        while token < len(owners) and owners[token] == k:
            token += 1
        if token == first:
            continue  # no token ends in sentence k: it joins the next sentence
        char_spans.append((spans[group_start][0], spans[k][1]))
        token_spans.append((first, token))
        group_start = k + 1
    if group_start < len(spans):  # trailing sentences without tokens join the last one
        char_spans[-1] = (char_spans[-1][0], spans[-1][1])
    return char_spans, token_spans


def sentence_token_spans(text: str, spans: list[Span], tokenizer) -> tuple[list[Span], list[Span]]:
    """(merged character spans, token spans (first, last + 1)) of `spans` in the tokenization of `text`."""
    _, offsets = tokenize_with_offsets(text, tokenizer)
    return align_sentences(text, spans, offsets)


def sentence_token_ends(text: str, spans: list[Span], tokenizer) -> list[int]:
    """Index of the last token of each sentence in the tokenization of `text` (one per merged sentence)."""
    _, token_spans = sentence_token_spans(text, spans, tokenizer)
    return [last - 1 for _, last in token_spans]

"""Dense sentence-RM rewards on the policy's own response tokens (DESIGN.md section 3). Pure, no Ray.

    dense, R = dense_sentence_rewards(model, tokenizer, boundary_id, prompt_ids, response_ids, splitter)

The policy sampled token ids; the sentence RM reads text, split into sentences and tokenized again. The two
tokenizations of the same text can differ (a policy may spell " Hello" as " H" + "ello"), so the RM's
sentence ends cannot index the policy's tokens directly. The bridge is character offsets:

1. Decode the policy's response (without a final stop token) to `text`, and the character span of every
   policy token: token t ends where the decoding of tokens 0..t ends. A token that leaves a character
   unfinished (the first byte of a multi-byte UTF-8 character) covers no characters yet; the token that
   completes the character covers it.
2. Build the RM input from `text` (pipeline.sentence_rm.build_sentence_rm_input) and run the RM once.
3. Sentence k's dense reward a_k r_k (the prompt term a_0 r_0 folded into sentence 1, so a row sums to R)
   goes on policy token end_k, where, with the ownership rule of pipeline.segment.align_sentences (a token
   belongs to the sentence holding its last non-space character; a whitespace-only token to the one holding
   its first character):

       end_k = the last policy token owned by sentences 1..k, and at least the token that holds sentence k's
               last non-space character (when one policy token spans the end of sentence k and the start of
               k + 1, the reward lands on that token: the first one at which sentence k is complete).

   When the policy's tokens are the RM's tokens this is exactly the RM's own `sentence_ends`.
4. EOS: the RM always reads "... s_K E EOS E", and r_K covers s_K and the EOS. For a finished response the
   stop token (EOS, or another stop id the engine stopped on) is the last policy token, so sentence K's reward
   lands on it. An unfinished response (cut by the length limit, no EOS) is scored as if it ended where it
   was cut, and sentence K's reward lands on its last token. Every token that ends no sentence gets 0.
"""
from __future__ import annotations

import bisect

import numpy as np
import torch

from pipeline.sentence_rm import SentenceRewardModel, build_sentence_rm_input, collate_rm_inputs


def policy_token_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """(decoded text, character span (start, end) of each token in it), by decoding every prefix once.

    Cost: one batched decode of len(ids) prefixes, quadratic in length (about 0.1 s for 750 tokens).
    """
    decode = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    text = tokenizer.decode(ids, **decode)
    ends, end = [], 0
    for prefix in tokenizer.batch_decode([ids[:t + 1] for t in range(len(ids))], **decode):
        if text.startswith(prefix):  # otherwise the prefix ends in an unfinished character: no progress yet
            end = max(end, len(prefix))
        ends.append(end)
    if ends:
        ends[-1] = len(text)
    return text, list(zip([0] + ends[:-1], ends))


def sentence_end_tokens(text: str, sentence_spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[int]:
    """end_k (see the module docstring) for each sentence span, given each policy token's character span."""
    starts = [start for start, _ in sentence_spans]
    owners = []  # sentence index of each token: the rule of pipeline.segment.align_sentences
    for start, end in offsets:
        visible = len(text[start:end].rstrip())
        anchor = min(start + visible - 1 if visible else start, max(len(text) - 1, 0))
        owner = min(max(bisect.bisect_right(starts, anchor) - 1, 0), len(sentence_spans) - 1)
        owners.append(max(owner, owners[-1]) if owners else owner)
    token_ends = [end for _, end in offsets]
    ends = []
    for k, (start, end) in enumerate(sentence_spans):
        visible = len(text[start:end].rstrip())
        last_char = start + visible - 1 if visible else start
        last_owned = bisect.bisect_right(owners, k) - 1            # last token owned by sentences <= k
        holding = bisect.bisect_right(token_ends, last_char)        # first token whose span passes last_char
        ends.append(min(max(last_owned, holding, 0), len(offsets) - 1))
    return ends


@torch.no_grad()
def dense_sentence_rewards(model: SentenceRewardModel, tokenizer, boundary_id: int, prompt_ids: list,
                           response_ids: list, splitter: str = "pysbd", finished: list[bool] | None = None,
                           batch_size: int = 16) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-token dense rewards (float32, one per policy response token, each row summing to R) and R [B].

    prompt_ids / response_ids: one sequence per row (lists or numpy arrays, as read from a rollout table).
    finished: whether each response ends with the stop token it stopped on; None = it ends with EOS.
    The RM runs in float32 on its own device, batch_size rows per forward pass.
    """
    if not isinstance(model, SentenceRewardModel):
        raise ValueError(f"dense rewards need a sentence-level reward model, got {type(model).__name__}. "
                         f"Fix: train one with kind 'sentence'.")
    prompt_ids = [np.asarray(p).tolist() for p in prompt_ids]
    response_ids = [np.asarray(r).tolist() for r in response_ids]
    if finished is None:
        finished = [bool(r) and r[-1] == tokenizer.eos_token_id for r in response_ids]
    if not response_ids:
        return [], np.zeros(0, np.float32)
    empty = [i for i, r in enumerate(response_ids) if not r]
    if empty:
        raise ValueError(f"rows {empty[:5]} have no response token to carry a reward (not even an EOS).")

    examples, ends = [], []
    for prompt, response, done in zip(prompt_ids, response_ids, finished):
        body = response[:-1] if done else response  # the stop token is not text: the RM adds its own EOS
        text, offsets = policy_token_spans(tokenizer, body)
        example = build_sentence_rm_input(prompt, text, tokenizer, boundary_id, splitter)
        row_ends = sentence_end_tokens(text, example["sentence_spans"], offsets) if offsets else [0]
        row_ends[-1] = len(response) - 1  # the last sentence owns the rest of the response, EOS included
        examples.append(example)
        ends.append(row_ends)

    device = next(model.parameters()).device
    dense, scores = [], []
    for first in range(0, len(examples), batch_size):
        rows = range(first, min(first + batch_size, len(examples)))
        batch = collate_rm_inputs([examples[i] for i in rows], tokenizer.pad_token_id)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        output = model(batch)
        width = max(len(response_ids[i]) for i in rows)
        sentence_ends = torch.tensor([ends[i] + [0] * (batch["sentence_ends"].shape[1] - len(ends[i])) for i in rows],
                                     device=device)
        padded = model.dense_rewards(output, sentence_ends, width).float().cpu().numpy()
        dense += [padded[j, :len(response_ids[i])] for j, i in enumerate(rows)]
        scores.append(output.score.float().cpu().numpy())
    return dense, np.concatenate(scores).astype(np.float32)

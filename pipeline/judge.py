"""LLM-as-a-judge baseline: the same model is asked which of two responses is better.

The verdict is read from the next-token log-probabilities of the answers "A" and "B" after the judge prompt.
Each pair is judged in both orders (chosen shown first, then second) and the two margins are averaged, which
cancels the model's position bias.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.chat import encode_prompt
from pipeline.endogenous import pack_by_budget, packed_hidden_states

JUDGE_INSTRUCTION = (
    "Which response answers the user's request better? Consider helpfulness, correctness and harmlessness.\n\n"
    "[Conversation]\n{conversation}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Answer with a single letter: A or B."
)


def render_conversation(messages: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_prompt_ids(tokenizer, messages: list[dict], first: str, second: str, max_chars: int = 6000) -> list[int]:
    """Chat-templated judge prompt that shows `first` as A and `second` as B."""
    text = JUDGE_INSTRUCTION.format(conversation=render_conversation(messages)[-max_chars:],
                                    a=first[:max_chars], b=second[:max_chars])
    return encode_prompt(tokenizer, [{"role": "user", "content": text}])


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the answers "A" and "B" (each must be a single token)."""
    ids = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in ("A", "B")]
    if any(len(i) != 1 for i in ids):
        raise ValueError("the judge needs 'A' and 'B' to be single tokens in this tokenizer")
    return ids[0][0], ids[1][0]


@torch.no_grad()
def judge_margins(model, prompt_ids: list, a_id: int, b_id: int, pack_tokens: int = 8192) -> np.ndarray:
    """log p(A) - log p(B) at the end of each judge prompt."""
    margins = np.zeros(len(prompt_ids), dtype=np.float32)
    lm_head = model.get_output_embeddings()
    for pack in pack_by_budget([len(p) for p in prompt_ids], pack_tokens):
        hidden = packed_hidden_states(model, [(np.asarray(prompt_ids[i]), []) for i in pack])
        last_rows = torch.as_tensor(np.cumsum([len(prompt_ids[i]) for i in pack]) - 1, device=hidden.device)
        logprobs = torch.log_softmax(lm_head(hidden[last_rows]).float(), dim=-1)
        margins[pack] = (logprobs[:, a_id] - logprobs[:, b_id]).cpu().numpy()
    return margins

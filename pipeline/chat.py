"""Turning chat messages and responses into token ids, and fitting them into the model's window.

A prompt goes through the model's chat template with the generation prompt appended; a finished response is
its text tokens followed by the end-of-turn token (EOS). An optional system prompt conditions everything that
is scored on a domain or a principle (the endogenous-reward paper's domain-specific rewards).
"""
from __future__ import annotations

from typing import Literal


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """Prepend (or replace) the system message when a system prompt is configured."""
    if not system_prompt:
        return list(messages)
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system_prompt}] + rest


def encode_prompt(tokenizer, messages: list[dict], system_prompt: str = "") -> list[int]:
    """Chat-template token ids of `messages`, ending with the assistant generation prompt."""
    ids = tokenizer.apply_chat_template(with_system_prompt(messages, system_prompt), add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids)


def encode_response(tokenizer, text: str, finished: bool = True) -> list[int]:
    """Token ids of a response; a finished response ends with the end-of-turn token (EOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if finished else ids


def fit_to_window(prompt_ids: list[int], response_ids: list[int], window: int,
                  policy: Literal["left", "error"] = "left", where: str = "row") -> tuple[list[int], list[int], int, bool]:
    """Make prompt + response fit in `window` tokens.

    Policy "left" (the default, documented in the README): drop the oldest prompt tokens, keeping at least one;
    if the response alone still does not fit, cut the response at the right (it then counts as truncated, not
    finished). Policy "error": raise instead. Returns (prompt_ids, response_ids, prompt_tokens_dropped,
    response_was_cut).
    """
    overflow = len(prompt_ids) + len(response_ids) - window
    if overflow <= 0:
        return prompt_ids, response_ids, 0, False
    if policy == "error":
        raise ValueError(f"{where}: prompt ({len(prompt_ids)} tokens) + response ({len(response_ids)} tokens) is longer "
                         f"than the model's window of {window} tokens. Fix: shorten it, or set the truncation policy "
                         f"to 'left' to drop the oldest prompt tokens.")
    dropped = min(overflow, len(prompt_ids) - 1)
    prompt_ids = prompt_ids[dropped:]
    response_cut = len(prompt_ids) + len(response_ids) > window
    if response_cut:
        response_ids = response_ids[: window - len(prompt_ids)]
    return prompt_ids, response_ids, dropped, response_cut


def encode_row(tokenizer, messages: list[dict], response: str, window: int, system_prompt: str = "",
               policy: Literal["left", "error"] = "left", where: str = "row") -> tuple[list[int], list[int], bool, int, int]:
    """One (prompt messages, response text) row as the endogenous reward scores it: the chat-templated prompt, the
    response with its EOS, fitted to the window. The one encoding of `jobs.score` and `jobs.serve`.

    Returns (prompt_ids, response_ids, finished, prompt_tokens_dropped, response_tokens_dropped); a response cut at
    the right to fit is not finished (it lost its EOS). Raises ValueError naming `where` under policy "error".
    """
    full_response = encode_response(tokenizer, response)
    prompt_ids, response_ids, dropped, cut = fit_to_window(encode_prompt(tokenizer, messages, system_prompt),
                                                           full_response, window, policy, where)
    return prompt_ids, response_ids, not cut, dropped, len(full_response) - len(response_ids)


def context_prompts(tokenizer, messages: list[dict] | None, cfg) -> list[list[int]]:
    """The extra prompts reward form `cfg.form` (an EndoRewardConfig) scores a response after, in the order
    pipeline.endogenous.score_endogenous reads them: pmi [x0], contrastive [x+principle, x+anti], else [].

    x0 (pmi) is the chat template around one user turn holding cfg.pmi_prompt (default empty), under the same
    cfg.system_prompt as x: only the user's messages differ, so the sum of pmi token rewards is the response's
    pointwise mutual information with them. contrastive restates `messages` with cfg.principle, then
    cfg.anti_principle, as the system prompt (replacing any system message, cfg.system_prompt included)."""
    if cfg.form == "pmi":
        return [encode_prompt(tokenizer, [{"role": "user", "content": cfg.pmi_prompt}], cfg.system_prompt)]
    if cfg.form == "contrastive":
        if messages is None:
            raise ValueError("reward.form contrastive restates the prompt's chat messages under the principle, and this "
                             "prompt came as template text. Fix: send chat messages, or use another reward.form.")
        return [encode_prompt(tokenizer, messages, cfg.principle), encode_prompt(tokenizer, messages, cfg.anti_principle)]
    return []


def encode_contexts(tokenizer, messages: list[dict] | None, response_ids: list[int], window: int, cfg,
                    where: str = "row") -> list[list[int]]:
    """context_prompts fitted to the window in front of `response_ids` (already fitted behind its own prompt, so
    it is never cut again): policy "left" drops a context's oldest tokens, "error" refuses, naming `where`."""
    return [fit_to_window(c, response_ids, window, cfg.truncation, f"{where} ({cfg.form} context)")[0]
            for c in context_prompts(tokenizer, messages, cfg)]

import dataclasses

import pytest

from pipeline.chat import encode_prompt, encode_response, encode_row, fit_to_window, with_system_prompt
from pipeline.models import load_tokenizer


def test_fit_to_window_drops_oldest_prompt_tokens_first():
    prompt, response = list(range(10)), [100, 101, 102]
    assert fit_to_window(prompt, response, 20) == (prompt, response, 0, False)
    p, r, dropped, cut = fit_to_window(prompt, response, 8)
    assert (p, r, dropped, cut) == (list(range(5, 10)), response, 5, False)


def test_fit_to_window_cuts_response_when_it_alone_overflows():
    p, r, dropped, cut = fit_to_window([1, 2, 3], list(range(10)), 5)
    assert p == [3] and r == [0, 1, 2, 3] and dropped == 2 and cut


def test_fit_to_window_error_policy_names_the_row():
    with pytest.raises(ValueError, match="row 7.*window of 4 tokens"):
        fit_to_window([1, 2, 3], [4, 5], 4, policy="error", where="row 7")


def test_system_prompt_replaces_existing_one():
    msgs = [{"role": "system", "content": "old"}, {"role": "user", "content": "hi"}]
    assert with_system_prompt(msgs, "") == msgs
    assert with_system_prompt(msgs, "new")[0] == {"role": "system", "content": "new"} and len(with_system_prompt(msgs, "new")) == 2


def test_prompt_uses_chat_template_and_response_ends_with_eos(real_model_dir):
    tokenizer = load_tokenizer(real_model_dir)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "hi"}], system_prompt="Be a chemist.")
    text = tokenizer.decode(ids)
    assert "Be a chemist." in text and text.endswith("<|im_start|>assistant\n")
    response = encode_response(tokenizer, "Hello there.")
    assert response[-1] == tokenizer.eos_token_id and tokenizer.decode(response[:-1]) == "Hello there."
    assert encode_response(tokenizer, "Hello there.", finished=False) == response[:-1]


def test_encode_row_marks_a_response_cut_to_the_window_unfinished(real_model_dir):
    tokenizer = load_tokenizer(real_model_dir)
    messages = [{"role": "user", "content": "hi"}]
    prompt, response, finished, dropped, cut = encode_row(tokenizer, messages, "word " * 50, 20)
    assert not finished and cut > 0 and len(prompt) == 1 and len(prompt) + len(response) == 20
    assert response[-1] != tokenizer.eos_token_id
    prompt, response, finished, dropped, cut = encode_row(tokenizer, messages, "Hello.", 200, system_prompt="Be brief.")
    assert finished and (dropped, cut) == (0, 0) and response == encode_response(tokenizer, "Hello.")
    assert prompt == encode_prompt(tokenizer, messages, "Be brief.")


def test_context_prompts_of_each_form(real_model_dir):
    from pipeline.chat import context_prompts, encode_contexts
    from pipeline.endogenous import EndoRewardConfig

    tokenizer = load_tokenizer(real_model_dir)
    messages = [{"role": "user", "content": "Hi?"}]
    assert context_prompts(tokenizer, messages, EndoRewardConfig()) == []
    assert context_prompts(tokenizer, messages, EndoRewardConfig(form="centered")) == []
    (x0,) = context_prompts(tokenizer, messages, EndoRewardConfig(form="pmi", system_prompt="Be brief."))
    assert x0 == encode_prompt(tokenizer, [{"role": "user", "content": ""}], "Be brief.")  # same template, no question
    assert context_prompts(tokenizer, None, EndoRewardConfig(form="pmi", system_prompt="Be brief.")) == [x0]
    cfg = EndoRewardConfig(form="contrastive", principle="Be good.", anti_principle="Be bad.", system_prompt="Be brief.")
    assert context_prompts(tokenizer, messages, cfg) == [encode_prompt(tokenizer, messages, "Be good."),
                                                         encode_prompt(tokenizer, messages, "Be bad.")]
    with pytest.raises(ValueError, match="reward.form contrastive .* Fix: send chat messages"):
        context_prompts(tokenizer, None, cfg)
    # fitted in front of the response like the prompt: the oldest tokens go first, the response stays whole
    cfg = EndoRewardConfig(form="pmi", system_prompt="Be brief.")
    (fitted,) = encode_contexts(tokenizer, messages, [1, 2, 3], len(x0) + 1, cfg)
    assert fitted == x0[-(len(x0) + 1 - 3):]
    with pytest.raises(ValueError, match=r"row 4 \(pmi context\)"):
        encode_contexts(tokenizer, messages, [1, 2, 3], len(x0), dataclasses.replace(cfg, truncation="error"), "row 4")

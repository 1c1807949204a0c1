"""The reward service's parsing, limits and auth, without Ray or a model: every bad input names its field."""
import json

import pytest

from pipeline.chat import encode_row
from pipeline.endogenous import EndoRewardConfig
from pipeline.models import load_tokenizer
from pipeline.reward_api import (AuthConfig, LimitsConfig, RequestError, check_authorization, check_declared_length,
                                 encode_openrlhf_request, encode_reward_request, is_loopback, parse_json_body,
                                 read_token, token_digest)

LIMITS = LimitsConfig(max_body_bytes=2000, max_items=3, max_request_tokens=300)
WINDOW = 128


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def refused(status, field, call, *args, **kwargs):
    with pytest.raises(RequestError) as info:
        call(*args, **kwargs)
    assert (info.value.status, info.value.field) == (status, field), info.value.message
    return info.value.message


def encode(tokenizer, data, **kwargs):
    return encode_reward_request(data, tokenizer, kwargs.pop("window", WINDOW), kwargs.pop("reward", EndoRewardConfig()),
                                 kwargs.pop("limits", LIMITS), kwargs.pop("has_sentence_rm", False))


def test_bodies_over_the_limit_not_utf8_or_malformed_are_refused():
    assert parse_json_body(b'{"items": []}', LIMITS) == {"items": []}
    assert "over limits.max_body_bytes" in refused(413, "body", parse_json_body, b" " * 2001, LIMITS)
    assert "5000 bytes" in refused(413, "body", check_declared_length, "5000", LIMITS)
    check_declared_length("10", LIMITS)
    assert "byte 0xff at offset 10" in refused(400, "body", parse_json_body, b'{"items": \xff}', LIMITS)
    assert "line 1, column 12" in refused(400, "body", parse_json_body, b'{"items": [}', LIMITS)
    assert "nested too deeply" in refused(400, "body", parse_json_body, b"[" * 1500 + b"]" * 1500,
                                          LimitsConfig(max_body_bytes=10_000))
    assert "JSON object, got a list" in refused(422, "body", parse_json_body, b"[1, 2]", LIMITS)


def test_deep_nesting_is_refused_whatever_the_recursion_limit():
    """Bug: the depth check was Python's RecursionError, so where a library had raised the recursion limit (the full
    suite's order did) a 1500-deep body parsed and came back 422 'got a list' instead of 400."""
    import sys
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        deep = b'{"items": ' + b"[" * 1500 + b"]" * 1500 + b"}"
        assert "nested too deeply" in refused(400, "body", parse_json_body, deep, LimitsConfig(max_body_bytes=10_000))
    finally:
        sys.setrecursionlimit(limit)
    brackets_in_strings = b'{"items": [{"prompt": "' + b"[" * 1500 + b'", "response": "]]"}]}'
    assert parse_json_body(brackets_in_strings, LimitsConfig(max_body_bytes=10_000))["items"][0]["response"] == "]]"


@pytest.mark.parametrize("data, status, field", [
    ({}, 422, "items"),
    ({"items": "a row"}, 422, "items"),
    ({"items": []}, 422, "items"),
    ({"items": [{"prompt": "p", "response": "r"}] * 4}, 413, "items"),
    ({"items": [{"prompt": "p", "response": "r"}], "token_reward": True}, 422, "token_reward"),
    ({"items": [{"prompt": "p", "response": "r"}], "token_rewards": "yes"}, 422, "token_rewards"),
    ({"items": [{"prompt": "p", "response": "r"}], "sentence_rm": True}, 422, "sentence_rm"),
    ({"items": ["p r"]}, 422, "items[0]"),
    ({"items": [{"prompt": "p", "response": "r"}, {"prompt": "p"}]}, 422, "items[1].response"),
    ({"items": [{"response": "r"}]}, 422, "items[0].prompt"),
    ({"items": [{"prompt": "p", "response": "  "}]}, 422, "items[0].response"),
    ({"items": [{"prompt": "p", "response": 7}]}, 422, "items[0].response"),
    ({"items": [{"prompt": 7, "response": "r"}]}, 422, "items[0].prompt"),
    ({"items": [{"prompt": [{"role": "user"}], "response": "r"}]}, 422, "items[0].prompt"),
    ({"items": [{"prompt": "p", "response": "ok \ud800"}]}, 422, "items[0].response"),
    ({"items": [{"prompt": [{"role": "user", "content": "\udfff"}], "response": "r"}]}, 422, "items[0].prompt[0].content"),
    ({"items": [{"prompt": "p", "response": "r"}], "reward": {"normalize": "median"}}, 422, "reward.normalize"),
    ({"items": [{"prompt": "p", "response": "r"}], "reward": {"alpha": 0}}, 422, "reward.alpha"),
    ({"items": [{"prompt": "p", "response": "r"}], "reward": {"alpah": 2}}, 422, "reward.alpah"),
    ({"items": [{"prompt": "p", "response": "r"}], "reward": {"pack_tokens": 8}}, 422, "reward.pack_tokens"),
    ({"items": [{"prompt": "p", "response": "r"}], "reward": {"form": "pmx"}}, 422, "reward.form"),
    ({"items": [{"prompt": "p", "response": "r"}], "reward": {"form": "contrastive", "principle": ""}}, 422,
     "reward.principle"),
    ({"items": [{"prompt": "p", "response": "r"}], "reward": "mean"}, 422, "reward"),
    ({"items": [{"prompt": "p", "response": "r"}], "system_prompt": "a", "reward": {"system_prompt": "b"}}, 422,
     "system_prompt"),
    ({"items": [{"prompt": "word " * 150, "response": "r"}] * 3}, 413, "request"),
])
def test_bad_reward_requests_name_the_field(tokenizer, data, status, field):
    # the surrogates above are what json.loads makes of "\ud800" escapes: valid JSON, not encodable text
    refused(status, field, encode, tokenizer, data)


def test_items_are_encoded_as_jobs_score_encodes_rows(tokenizer):
    messages = [{"role": "user", "content": "Name a fruit."}]
    job = encode(tokenizer, {"items": [{"prompt": "What is 2+2?", "response": "4."},
                                       {"prompt": messages, "response": "An apple."}],
                             "token_rewards": True, "system_prompt": "Be brief.", "reward": {"normalize": "mean"}})
    assert job.token_rewards and not job.sentence_rm
    assert job.reward == EndoRewardConfig(system_prompt="Be brief.", normalize="mean")
    for i, (m, r) in enumerate([([{"role": "user", "content": "What is 2+2?"}], "4."), (messages, "An apple.")]):
        p, resp, finished, dropped, cut = encode_row(tokenizer, m, r, WINDOW, "Be brief.")
        assert (job.prompt_ids[i], job.response_ids[i], job.finished[i]) == (p, resp, finished)
        assert (job.prompt_tokens_dropped[i], job.response_tokens_dropped[i]) == (0, 0)
    assert job.tokens == sum(len(p) + len(r) for p, r in zip(job.prompt_ids, job.response_ids))
    assert encode(tokenizer, {"items": [{"prompt": "p", "response": "r"}]}).reward is not job.reward


def test_context_forms_carry_each_items_extra_contexts(tokenizer):
    from pipeline.chat import encode_contexts

    messages = [{"role": "user", "content": "Name a fruit."}]
    body = {"items": [{"prompt": messages, "response": "An apple."}, {"prompt": "What is 2+2?", "response": "4."}],
            "reward": {"form": "contrastive", "principle": "Be good.", "anti_principle": "Be bad."}}
    job = encode(tokenizer, body)
    assert job.reward.form == "contrastive" and job.reward.principle == "Be good."
    for i, m in enumerate([messages, [{"role": "user", "content": "What is 2+2?"}]]):
        assert job.context_prompt_ids[i] == encode_contexts(tokenizer, m, job.response_ids[i], WINDOW, job.reward)
        assert len(job.context_prompt_ids[i]) == 2
    assert job.tokens == sum(len(p) + 3 * len(r) + len(c[0]) + len(c[1]) for p, r, c in
                             zip(job.prompt_ids, job.response_ids, job.context_prompt_ids))  # the contexts cost tokens too
    assert encode(tokenizer, {"items": body["items"]}).context_prompt_ids == [[], []]  # raw: none
    # OpenRLHF's protocol gives template text: pmi's x0 is the server's own template, contrastive cannot be served
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    data = {"query": [prompt + "An apple."], "prompts": [prompt]}
    job = encode_openrlhf_request(data, tokenizer, WINDOW, EndoRewardConfig(form="pmi"), LIMITS)
    assert job.context_prompt_ids == [encode_contexts(tokenizer, None, job.response_ids[0], WINDOW, EndoRewardConfig(form="pmi"))]
    message = refused(422, "reward.form", encode_openrlhf_request, data, tokenizer, WINDOW,
                      EndoRewardConfig(form="contrastive"), LIMITS)
    assert "Fix: send chat messages" in message


def test_over_window_items_follow_the_truncation_policy(tokenizer):
    job = encode(tokenizer, {"items": [{"prompt": "word " * 100, "response": "ok"}, {"prompt": "p", "response": "r " * 90}]},
                 window=64)
    assert job.prompt_tokens_dropped[0] > 50 and len(job.prompt_ids[0]) + len(job.response_ids[0]) == 64
    assert job.finished[0] and job.response_tokens_dropped[0] == 0
    assert not job.finished[1] and job.response_tokens_dropped[1] > 0  # cut at the right: no EOS, scored as unfinished
    message = refused(413, "items[0]", encode, tokenizer, {"items": [{"prompt": "word " * 100, "response": "ok"}],
                                                           "reward": {"truncation": "error"}}, window=64)
    assert "window of 64 tokens" in message


def test_openrlhf_request_splits_query_at_the_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=False)
    finished_query = prompt + "Hi there!" + tokenizer.eos_token
    job = encode_openrlhf_request({"query": [finished_query, prompt + "Hi th"], "prompts": [prompt, prompt],
                                   "labels": ["", ""]}, tokenizer, WINDOW, EndoRewardConfig(), LIMITS)
    assert job.prompt_ids[0] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert job.response_ids[0] == tokenizer("Hi there!", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert job.finished == [True, False]  # no EOS: cut by a length limit
    refused(422, "query[0]", encode_openrlhf_request, {"query": ["other text"], "prompts": [prompt]}, tokenizer, WINDOW,
            EndoRewardConfig(), LIMITS)
    refused(422, "query[0]", encode_openrlhf_request, {"query": [prompt], "prompts": [prompt]}, tokenizer, WINDOW,
            EndoRewardConfig(), LIMITS)
    refused(422, "prompts", encode_openrlhf_request, {"query": [finished_query]}, tokenizer, WINDOW, EndoRewardConfig(), LIMITS)
    refused(413, "query", encode_openrlhf_request, {"query": [finished_query] * 4, "prompts": [prompt] * 4}, tokenizer,
            WINDOW, EndoRewardConfig(), LIMITS)


def test_openrlhf_token_id_extension_is_checked_against_the_text(tokenizer):
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    # sampled as " H" then "i": the text " Hi" re-tokenizes to other ids, so the ids must travel with it
    response_ids = tokenizer(" H", add_special_tokens=False)["input_ids"] + tokenizer("i", add_special_tokens=False)["input_ids"]
    assert tokenizer(" Hi", add_special_tokens=False)["input_ids"] != response_ids
    query = tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)
    body = {"query": [query], "prompts": [tokenizer.decode(prompt_ids)], "prompt_ids": [prompt_ids],
            "response_ids": [response_ids], "token_rewards": True}
    job = encode_openrlhf_request(body, tokenizer, WINDOW, EndoRewardConfig(), LIMITS)
    assert (job.prompt_ids, job.response_ids, job.finished, job.token_rewards) == ([prompt_ids], [response_ids], [False], True)
    refused(422, "prompt_ids[0]", encode_openrlhf_request, {**body, "query": [query + "!"]}, tokenizer, WINDOW,
            EndoRewardConfig(), LIMITS)
    refused(422, "response_ids[0]", encode_openrlhf_request, {**body, "response_ids": [[len(tokenizer)]]}, tokenizer,
            WINDOW, EndoRewardConfig(), LIMITS)
    refused(422, "response_ids", encode_openrlhf_request, {k: v for k, v in body.items() if k != "response_ids"},
            tokenizer, WINDOW, EndoRewardConfig(), LIMITS)


def test_bearer_token_from_a_file_or_a_named_variable(tmp_path):
    assert read_token(AuthConfig(), {}) == ""
    path = tmp_path / "token"
    path.write_text("s3cret\nignored\n")
    assert read_token(AuthConfig(token_file=str(path)), {}) == "s3cret"
    assert read_token(AuthConfig(token_env="MY_TOKEN"), {"MY_TOKEN": "abc"}) == "abc"
    for auth, environ, match in [(AuthConfig(token_env="MY_TOKEN"), {}, "MY_TOKEN is unset"),
                                 (AuthConfig(token_file=str(tmp_path / "none")), {}, "cannot read it"),
                                 (AuthConfig(token_file=str(path), token_env="X"), {"X": "y"}, "both set")]:
        with pytest.raises(ValueError, match=match):
            read_token(auth, environ)
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(AuthConfig(token_file=str(path)), {})


def test_authorization_header_is_checked_against_the_digest():
    check_authorization(None, "")  # no token configured: open (loopback only, enforced by jobs.serve)
    digest = token_digest("s3cret")
    assert "s3cret" not in digest
    check_authorization("Bearer s3cret", digest)
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer wrong"):
        refused(401, "Authorization", check_authorization, header, digest)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.com")


def test_error_body_names_status_field_and_message():
    error = RequestError(413, "items", "too many")
    assert json.loads(json.dumps(error.body())) == {"error": {"status": 413, "field": "items", "message": "too many"}}

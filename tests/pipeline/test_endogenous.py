"""The endogenous reward against an independent float64 recomputation of DESIGN.md section 2."""
import dataclasses

import numpy as np
import pytest
import torch

from pipeline.chat import encode_prompt, encode_response
from pipeline.endogenous import EndoRewardConfig, group_by_prompt, pack_by_budget, score_endogenous
from pipeline.models import load_causal_lm, load_tokenizer

PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "How do I boil an egg?"]
RESPONSES = ["The capital of France is Paris.", "The sea is vast, blue and full of life.",
             "Put the egg in boiling water for about eight minutes, then cool it in cold water."]


def reference_rewards(model, prompt, response, alpha, finished, truncated_terminal="zero"):
    """Written out independently: one unpacked forward pass, every formula in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    P, H = len(prompt), len(response)
    f = logits[P - 1:P + H]                                   # f(s_1) .. f(s_{H+1})
    actions = torch.tensor(response)
    Q = f[:H].gather(1, actions[:, None]).squeeze(1)          # Q(s_h, a_h) = f(s_h)[a_h]
    V = alpha * torch.logsumexp(f / alpha, dim=1)             # V(s) = alpha * logsumexp(Q / alpha)
    V_next = V[1:].clone()
    if finished or truncated_terminal == "zero":
        V_next[-1] = 0.0                                      # V(s_{H+1}) := 0
    r = Q - V_next                                            # r_h = Q(s_h, a_h) - V(s_{h+1})
    ref_logp = torch.log_softmax(f[:H], dim=1).gather(1, actions[:, None]).squeeze(1)
    return r.numpy(), ref_logp.numpy()


def encoded(tokenizer):
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    responses = [encode_response(tokenizer, r) for r in RESPONSES]
    return prompts, responses


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_real_model_matches_float64_reference_per_token(real_model_dir, alpha):
    model, tokenizer = load_causal_lm(real_model_dir), load_tokenizer(real_model_dir)
    prompts, responses = encoded(tokenizer)
    responses[2] = responses[2][:-6]  # a truncated response without EOS
    prompts.append(prompts[0])  # a second response to the first prompt: the two share the prompt when packed
    responses.append(encode_response(tokenizer, "Paris."))
    finished = [True, True, False, True]
    cfg = EndoRewardConfig(alpha=alpha, truncated_terminal="value", pack_tokens=128)  # several packs
    scores = score_endogenous(model, prompts, responses, finished, cfg)
    for i in range(4):
        r, ref_logp = reference_rewards(model, prompts[i], responses[i], alpha, finished[i], "value")
        assert np.abs(scores.token_rewards[i] - r).max() < 1e-4
        assert np.abs(scores.ref_logprobs[i] - ref_logp).max() < 1e-4
        assert abs(scores.rewards[i] - r.sum()) < 1e-3
    # R = alpha * log pi(y|x) + V(s_1): for alpha = 1, log pi = ref log-probs
    if alpha == 1.0:
        with torch.no_grad():
            v1 = torch.logsumexp(model(torch.tensor([prompts[0]])).logits[0, -1].double(), 0).item()
        assert abs(scores.rewards[0] - (scores.ref_logprobs[0].astype(np.float64).sum() + v1)) < 1e-3


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_tiny_model_matches_reference_and_packing_changes_nothing(tiny):
    model, tokenizer = tiny
    prompts, responses = encoded(tokenizer)
    # rows 3..5 reuse prompts (like a pair's chosen/rejected): they share one prompt in the packed pass
    prompts, responses = prompts + [prompts[0], prompts[2], prompts[0]], responses + [responses[1], responses[0], responses[2]]
    one_pack = score_endogenous(model, prompts, responses, [True] * 6, EndoRewardConfig(pack_tokens=4096))
    many_packs = score_endogenous(model, prompts, responses, [True] * 6, EndoRewardConfig(pack_tokens=1, logit_chunk=3))
    for i in range(6):
        r, ref_logp = reference_rewards(model, prompts[i], responses[i], 1.0, True)
        np.testing.assert_allclose(one_pack.token_rewards[i], r, atol=1e-4)
        np.testing.assert_allclose(one_pack.ref_logprobs[i], ref_logp, atol=1e-4)
        np.testing.assert_allclose(many_packs.token_rewards[i], one_pack.token_rewards[i], atol=1e-5)


def test_rows_are_grouped_by_identical_prompt():
    assert group_by_prompt([[1, 2], [3], [1, 2], [1], [3]]) == [[0, 2], [1, 4], [3]]


def test_terminal_value_option_only_affects_unfinished_responses(tiny):
    model, tokenizer = tiny
    prompts, responses = encoded(tokenizer)
    zero = score_endogenous(model, prompts, responses, [True, False, False], EndoRewardConfig(truncated_terminal="zero"))
    value = score_endogenous(model, prompts, responses, [True, False, False], EndoRewardConfig(truncated_terminal="value"))
    np.testing.assert_allclose(zero.token_rewards[0], value.token_rewards[0])  # finished: always 0
    for i in (1, 2):
        np.testing.assert_allclose(zero.token_rewards[i][:-1], value.token_rewards[i][:-1])
        assert zero.token_rewards[i][-1] != value.token_rewards[i][-1]
        r, _ = reference_rewards(model, prompts[i], responses[i], 1.0, False, "value")
        np.testing.assert_allclose(value.token_rewards[i], r, atol=1e-4)


def test_mean_normalisation_divides_by_length(tiny):
    model, tokenizer = tiny
    prompts, responses = encoded(tokenizer)
    total = score_endogenous(model, prompts, responses, [True] * 3, EndoRewardConfig())
    mean = score_endogenous(model, prompts, responses, [True] * 3, EndoRewardConfig(normalize="mean"))
    np.testing.assert_allclose(mean.rewards, total.rewards / np.array([len(r) for r in responses]), rtol=1e-5)


def test_bf16_model_keeps_float32_statistics(tiny_model_dir, tiny):
    model_fp32, tokenizer = tiny
    model_bf16 = load_causal_lm(tiny_model_dir, dtype="bfloat16")
    prompts, responses = encoded(tokenizer)
    a = score_endogenous(model_fp32, prompts, responses, [True] * 3, EndoRewardConfig())
    b = score_endogenous(model_bf16, prompts, responses, [True] * 3, EndoRewardConfig())
    assert all(t.dtype == np.float32 for t in b.token_rewards)
    np.testing.assert_allclose(b.rewards, a.rewards, rtol=0.05, atol=0.5)


def test_pack_by_budget_keeps_order_and_budget():
    assert pack_by_budget([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert pack_by_budget([], 6) == []


def test_alpha_must_be_positive():
    with pytest.raises(ValueError, match="reward.alpha must be > 0"):
        EndoRewardConfig(alpha=0)
    assert dataclasses.replace(EndoRewardConfig(), alpha=2.0).alpha == 2.0


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_centered_form_matches_float64_reference_per_token(tiny, alpha):
    model, tokenizer = tiny
    prompts, responses = encoded(tokenizer)
    prompts.append(prompts[0])  # shares the first prompt when packed
    responses.append(responses[1])
    cfg = EndoRewardConfig(alpha=alpha, form="centered", pack_tokens=64, logit_chunk=5)
    scores = score_endogenous(model, prompts, responses, [True] * 4, cfg)
    raw = score_endogenous(model, prompts, responses, [True] * 4, EndoRewardConfig(alpha=alpha))
    for i in range(4):
        with torch.no_grad():
            logits = model(torch.tensor([prompts[i] + responses[i]])).logits[0].double()
        P, H = len(prompts[i]), len(responses[i])
        logpi = torch.log_softmax(logits[P - 1:P + H - 1] / alpha, dim=1)    # log pi(.|s_h), h = 1..H
        log_pi_a = logpi.gather(1, torch.tensor(responses[i])[:, None]).squeeze(1)
        entropy = -(logpi.exp() * logpi).sum(1)                              # H(pi(.|s_h))
        c = alpha * (log_pi_a + entropy)
        assert np.abs(scores.token_rewards[i] - c.numpy()).max() < 1e-4
        assert abs(scores.rewards[i] - c.sum().item()) < 1e-3
        np.testing.assert_allclose(scores.ref_logprobs[i], raw.ref_logprobs[i], atol=1e-6)  # KL term unchanged
        assert np.abs(scores.token_rewards[i] - raw.token_rewards[i]).max() > 1e-2  # a different reward


def test_form_reaches_the_rl_scorer_and_the_reward_api(tiny_model_dir, tiny):
    """The RL/score/eval actor and the reward server pass --reward.form through to score_endogenous."""
    from actors.base_model import EndogenousScorer
    from pipeline.arrow import request_table
    from pipeline.models import ModelConfig
    from pipeline.reward_api import RequestError, request_reward_config

    model, tokenizer = tiny
    prompts, responses = encoded(tokenizer)
    # float32 as the `tiny` fixture; auto would be bf16 on an avx512_bf16 CPU
    scorer = EndogenousScorer(ModelConfig(name=tiny_model_dir, dtype="float32"), EndoRewardConfig(form="centered"))
    batch = scorer(request_table(prompts, responses, [True] * 3))
    direct = score_endogenous(model, prompts, responses, [True] * 3, EndoRewardConfig(form="centered"))
    np.testing.assert_allclose(batch["reward"].to_numpy(), direct.rewards, atol=1e-4)
    raw = score_endogenous(model, prompts, responses, [True] * 3, EndoRewardConfig())
    assert np.abs(batch["reward"].to_numpy() - raw.rewards).max() > 1e-2
    assert request_reward_config(EndoRewardConfig(), {"form": "centered"}, None).form == "centered"
    with pytest.raises(RequestError, match="reward.form"):
        request_reward_config(EndoRewardConfig(), {"form": "median"}, None)


def log_pi(model, prompt, response, alpha):
    """log pi(a_h | prompt, y_<h), pi = softmax(f / alpha), h = 1..H: one plain forward pass, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    P, H = len(prompt), len(response)
    logpi = torch.log_softmax(logits[P - 1:P + H - 1] / alpha, dim=1)
    return logpi.gather(1, torch.tensor(response)[:, None]).squeeze(1)


def with_contexts(tokenizer, cfg):
    """encoded() plus a row sharing the first prompt, the rows' messages and their extra contexts for cfg.form."""
    from pipeline.chat import context_prompts

    messages = [[{"role": "user", "content": p}] for p in PROMPTS + PROMPTS[:1]]
    prompts, responses = encoded(tokenizer)
    prompts.append(prompts[0])
    responses.append(responses[1])
    return prompts, responses, [context_prompts(tokenizer, m, cfg) for m in messages]


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_pmi_form_matches_float64_reference_per_token(tiny, alpha):
    model, tokenizer = tiny  # float32
    cfg = EndoRewardConfig(alpha=alpha, form="pmi", pack_tokens=64, logit_chunk=5)
    prompts, responses, contexts = with_contexts(tokenizer, cfg)
    x0 = contexts[0][0]
    assert all(c == [x0] for c in contexts) and x0 != prompts[0]  # one weaker context x0, the same for every row
    scores = score_endogenous(model, prompts, responses, [True, True, False, True], cfg, contexts)
    raw = score_endogenous(model, prompts, responses, [True] * 4, EndoRewardConfig(alpha=alpha))
    for i in range(4):
        p = alpha * (log_pi(model, prompts[i], responses[i], alpha) - log_pi(model, x0, responses[i], alpha))
        assert np.abs(scores.token_rewards[i] - p.numpy()).max() < 1e-4  # alpha*(log pi(a|x,y<h) - log pi(a|x0,y<h))
        assert abs(scores.rewards[i] - p.sum().item()) < 1e-3
        np.testing.assert_allclose(scores.ref_logprobs[i], raw.ref_logprobs[i], atol=1e-6)  # KL term: x itself


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_contrastive_form_matches_float64_reference_per_token(tiny, alpha):
    model, tokenizer = tiny
    cfg = EndoRewardConfig(alpha=alpha, form="contrastive", pack_tokens=64, logit_chunk=5, normalize="mean")
    prompts, responses, contexts = with_contexts(tokenizer, cfg)
    scores = score_endogenous(model, prompts, responses, [True] * 4, cfg, contexts)
    raw = score_endogenous(model, prompts, responses, [True] * 4, EndoRewardConfig(alpha=alpha))
    for i in range(4):
        principle, anti = contexts[i]
        assert principle == encode_prompt(tokenizer, [{"role": "user", "content": (PROMPTS + PROMPTS[:1])[i]}], cfg.principle)
        k = alpha * (log_pi(model, principle, responses[i], alpha) - log_pi(model, anti, responses[i], alpha))
        assert np.abs(scores.token_rewards[i] - k.numpy()).max() < 1e-4
        assert abs(scores.rewards[i] - k.mean().item()) < 1e-4  # normalize mean: / H
        np.testing.assert_allclose(scores.ref_logprobs[i], raw.ref_logprobs[i], atol=1e-6)


@pytest.mark.parametrize("form, extra", [("pmi", 1), ("contrastive", 2)])
def test_context_rows_are_packed_into_the_same_forward_pass(tiny, monkeypatch, form, extra):
    """The extra contexts are more rows of the same packed pass: one forward call holding every row once per
    context, identical prompts (x0; a shared prompt's contexts) once."""
    model, tokenizer = tiny
    cfg = EndoRewardConfig(form=form, pack_tokens=4096)
    prompts, responses, contexts = with_contexts(tokenizer, cfg)
    calls, forward = [], model.base_model.forward
    monkeypatch.setattr(model.base_model, "forward", lambda input_ids, **kw: calls.append(input_ids.shape[1]) or forward(input_ids, **kw))
    score_endogenous(model, prompts, responses, [True] * 4, cfg, contexts)
    distinct = {tuple(p) for p in prompts} | {tuple(c) for row in contexts for c in row}
    assert calls == [sum(map(len, distinct)) + (1 + extra) * sum(map(len, responses))]
    assert len(distinct) == 3 + (1 if form == "pmi" else 6)


def test_a_group_over_the_pack_budget_is_split_into_packs_that_fit(tiny):
    """pmi's x0 is every row's prompt: its group is cut into parts that fit the budget, the rewards unchanged."""
    from pipeline.endogenous import prompt_shared_packs

    packs = list(prompt_shared_packs([[1, 2]] * 5, [[3] * 4] * 5, budget=10))
    assert [groups for groups, _ in packs] == [[[0, 1]], [[2, 3]], [[4]]]
    # a long prompt (over a quarter of the budget) is computed once: its group goes alone, whole
    assert [groups for groups, _ in prompt_shared_packs([[1, 2, 3]] * 3, [[3] * 4] * 3, budget=10)] == [[[0, 1, 2]]]
    model, tokenizer = tiny
    cfg = EndoRewardConfig(form="pmi")
    prompts, responses, _ = with_contexts(tokenizer, cfg)
    contexts = [[prompts[0][-3:]]] * 4  # a 3-token x0: split at a 20-token budget
    big = score_endogenous(model, prompts, responses, [True] * 4, cfg, contexts)
    small = score_endogenous(model, prompts, responses, [True] * 4, dataclasses.replace(cfg, pack_tokens=20), contexts)
    for a, b in zip(big.token_rewards, small.token_rewards):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_context_forms_without_contexts_and_bad_forms_are_clear_errors(tiny):
    model, tokenizer = tiny
    prompts, responses = encoded(tokenizer)
    with pytest.raises(ValueError, match="reward.form pmi .* Fix: give each row `context_prompt_ids`"):
        score_endogenous(model, prompts, responses, [True] * 3, EndoRewardConfig(form="pmi"))
    with pytest.raises(ValueError, match="reward.form contrastive"):
        score_endogenous(model, prompts, responses, [True] * 3, EndoRewardConfig(form="contrastive"), [[p] for p in prompts])
    with pytest.raises(ValueError, match=r"reward.form 'median' is not one of .*Fix: --reward.form"):
        EndoRewardConfig(form="median")
    for field in ("principle", "anti_principle"):
        with pytest.raises(ValueError, match=rf"reward.{field} is empty.*Fix: --reward.{field}"):
            EndoRewardConfig(form="contrastive", **{field: " "})
    with pytest.raises(ValueError, match="reward.principle and reward.anti_principle are the same"):
        EndoRewardConfig(form="contrastive", principle="Be kind.", anti_principle="Be kind.")
    assert EndoRewardConfig(principle="").form == "raw"  # the principles only matter to form contrastive


def test_context_forms_reach_the_scorer_through_the_request_column(tiny_model_dir, tiny):
    """jobs.score, jobs.eval_rewards, the reward server and RL send the extra contexts in CONTEXT_COLUMN."""
    from actors.base_model import EndogenousScorer
    from pipeline.arrow import context_columns, request_table
    from pipeline.models import ModelConfig

    model, tokenizer = tiny
    for cfg in (EndoRewardConfig(form="pmi"), EndoRewardConfig(form="contrastive")):
        prompts, responses, contexts = with_contexts(tokenizer, cfg)
        scorer = EndogenousScorer(ModelConfig(name=tiny_model_dir, dtype="float32"), cfg)
        batch = scorer(request_table(prompts, responses, [True] * 4, **context_columns(contexts)).slice(1, 3))
        direct = score_endogenous(model, prompts[1:], responses[1:], [True] * 3, cfg, contexts[1:])
        np.testing.assert_allclose(batch["reward"].to_numpy(), direct.rewards, atol=1e-4)
        with pytest.raises(ValueError, match=f"reward.form {cfg.form}"):
            scorer(request_table(prompts, responses, [True] * 4))  # no contexts: refused, never scored as raw

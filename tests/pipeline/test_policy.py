"""Policy and critic forwards checked against a plain per-row transformers forward; the loss on known cases."""
import math

import numpy as np
import pytest
import torch

from pipeline.models import load_causal_lm
from pipeline.policy import (LearnerConfig, critic_forward, critic_loss, load_critic, lr_lambda, micro_batches,
                             policy_forward, policy_loss, split_to)
from pipeline.precision import autocast


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def ragged_rows(seed=0):
    """Prompts and responses of different lengths (one response is a single token)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 1000, n).astype(np.int32) for n in (5, 9, 3)]
    responses = [rng.integers(10, 1000, n).astype(np.int32) for n in (4, 1, 7)]
    return prompts, responses


def shared_prompt_rows():
    """GRPO-like rows: two prompts with two responses each (one of them empty: a padding row) and a lone prompt."""
    rng = np.random.default_rng(3)
    a, b, c = (rng.integers(10, 1000, n).astype(np.int32) for n in (6, 4, 8))
    prompts = [a, a, b, c, b]
    responses = [rng.integers(10, 1000, n).astype(np.int32) for n in (5, 3, 6, 2)] + [np.zeros(0, np.int32)]
    return prompts, responses


@torch.no_grad()
def manual_logprobs(model, prompt, response, temperature):
    """One unpadded row: log_softmax(logits / T) in float64, logits at t predicting token t+1."""
    ids = torch.as_tensor(np.concatenate([prompt, response]), dtype=torch.long)[None]
    logits = model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    p = len(prompt)
    return torch.stack([logp[p + j - 1, int(token)] for j, token in enumerate(response)])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_forward_matches_manual_forward(tiny_model, temperature):
    prompts, responses = ragged_rows()
    with torch.no_grad():
        logprobs, entropy, mask = policy_forward(tiny_model, prompts, responses, temperature)
    assert logprobs.shape == entropy.shape == mask.shape == (3, 7)
    assert logprobs.dtype == torch.float32
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        h = len(response)
        assert mask[i].tolist() == [1.0] * h + [0.0] * (7 - h)
        want = manual_logprobs(tiny_model, prompt, response, temperature)
        torch.testing.assert_close(logprobs[i, :h].double(), want, atol=2e-5, rtol=0)
        assert (logprobs[i, h:] == 0).all() and (entropy[i, h:] == 0).all()
    assert (entropy[mask > 0] > 0).all()


def plain_forward(model, prompt, response, temperature=1.0):
    """One unpadded row, float32 log_softmax over the full logits: (log-probs, entropies) of the response tokens."""
    ids = torch.as_tensor(np.concatenate([prompt, response]), dtype=torch.long)[None]
    p, h = len(prompt), len(response)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, p - 1:p + h - 1].float() / temperature, dim=-1)
    chosen = logp.gather(-1, torch.as_tensor(response, dtype=torch.long)[:, None])[:, 0]
    return chosen, -(logp.exp() * logp).sum(-1)


def test_packed_rows_sharing_prompts_match_plain_rows(tiny_model):
    """Rows that share a prompt share its tokens in the packed pass; each still sees only its own prompt and self."""
    prompts, responses = shared_prompt_rows()
    with torch.no_grad():
        logprobs, entropy, mask = policy_forward(tiny_model, prompts, responses, 0.8, logit_chunk=3)
        assert logprobs.shape == (5, 6) and mask.sum() == 16
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            h = len(response)
            want_logp, want_entropy = plain_forward(tiny_model, prompt, response, 0.8)
            torch.testing.assert_close(logprobs[i, :h], want_logp, atol=2e-5, rtol=0)
            torch.testing.assert_close(entropy[i, :h], want_entropy, atol=2e-5, rtol=0)
            assert mask[i].tolist() == [1.0] * h + [0.0] * (6 - h)


def test_packed_chunked_gradients_equal_plain_rows(tiny_model):
    """The gradient of a loss on packed log-probs and entropies equals the same loss summed over plain rows."""
    prompts, responses = shared_prompt_rows()
    weights = torch.linspace(-1.0, 1.0, 6)
    logprobs, entropy, mask = policy_forward(tiny_model, prompts, responses, logit_chunk=4)
    (((logprobs + 0.3 * entropy) * weights).sum()).backward()
    packed = {name: p.grad.clone() for name, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    for prompt, response in zip(prompts, responses):
        if len(response):
            logp, ent = plain_forward(tiny_model, prompt, response)
            ((logp + 0.3 * ent) * weights[:len(response)]).sum().backward()
    for name, p in tiny_model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    tiny_model.zero_grad()


def test_chunked_logprobs_entropy_gradcheck():
    """Chunks of 3 over 7 rows, float64: the hand-written backward equals the numerical gradient."""
    from pipeline.losses import chunked_logprobs_entropy

    logits = torch.randn(7, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(1))
    torch.autograd.gradcheck(lambda z: chunked_logprobs_entropy(z, targets, 0.7, 3), (logits,))
    logp, ent = chunked_logprobs_entropy(logits, targets, 0.7, 3)
    plain = torch.log_softmax(logits / 0.7, dim=-1)
    torch.testing.assert_close(logp.double(), plain.gather(-1, targets[:, None])[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.double(), -(plain.exp() * plain).sum(-1), atol=1e-6, rtol=0)


def test_micro_batches_by_rows_and_tokens_and_split_to_a_count():
    prompts = [[1, 2, 3]] * 4 + [[4] * 10]
    responses = [[5] * 4] * 4 + [[6] * 20]
    assert micro_batches(prompts, responses, 8, 0) == [[0, 1, 2, 3, 4]]
    assert micro_batches(prompts, responses, 2, 0) == [[0, 1], [2, 3], [4]]
    # the shared prompt counts once: 3 + 4 + 4 + 4 = 15 tokens fit a budget of 16, a fourth row does not
    assert micro_batches(prompts, responses, 8, 16) == [[0, 1, 2], [3], [4]]  # row 4 (30 tokens) goes alone
    assert split_to([[0, 1, 2], [3], [4]], 5) == [[0], [1, 2], [3], [4]] or \
        split_to([[0, 1, 2], [3], [4]], 5) == [[0], [1], [2], [3], [4]]
    assert split_to([[0, 1, 2, 3]], 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot split"):
        split_to([[0], [1]], 3)


def test_policy_forward_gradients_flow(tiny_model):
    prompts, responses = ragged_rows(1)
    logprobs, _, mask = policy_forward(tiny_model, prompts, responses)
    (logprobs.sum() / mask.sum()).backward()
    assert tiny_model.lm_head.weight.grad is not None and tiny_model.lm_head.weight.grad.abs().sum() > 0
    tiny_model.zero_grad()


def test_policy_loss_ratio_one_no_kl_is_minus_mean_advantage():
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logprobs = -torch.rand(2, 3)
    advantages = torch.tensor([[1.0, -2.0, 3.0], [0.5, 99.0, 99.0]])
    loss, metrics = policy_loss(logprobs, logprobs.clone(), logprobs.clone(), advantages, mask, LearnerConfig())
    expected = -(1.0 - 2.0 + 3.0 + 0.5) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["pg_loss"] == pytest.approx(expected, abs=1e-6)
    assert metrics["kl_k1"] == metrics["kl_k3"] == 0.0
    assert metrics["ratio"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0.0


def test_policy_loss_k3_term_is_non_negative_and_only_in_k3_mode():
    torch.manual_seed(1)
    mask = torch.ones(4, 6)
    logprobs, ref = -torch.rand(4, 6) * 3, -torch.rand(4, 6) * 3
    advantages = torch.randn(4, 6)
    k3_loss, k3_metrics = policy_loss(logprobs, logprobs, ref, advantages, mask, LearnerConfig(kl_coef=0.5))
    k1_loss, k1_metrics = policy_loss(logprobs, logprobs, ref, advantages, mask,
                                      LearnerConfig(kl_coef=0.5, kl_mode="k1_reward"))
    assert k3_metrics["kl_k3"] > 0
    assert k1_loss.item() == pytest.approx(k1_metrics["pg_loss"], abs=1e-6)  # no KL in the loss
    # loss = pg + 0.5 * k3
    assert k3_loss.item() == pytest.approx(k1_metrics["pg_loss"] + 0.5 * k3_metrics["kl_k3"], abs=1e-6)


def test_entropy_bonus_lowers_the_loss():
    mask = torch.ones(1, 2)
    logprobs, entropy = torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0, 4.0]])
    base, _ = policy_loss(logprobs, logprobs, logprobs, torch.zeros(1, 2), mask, LearnerConfig())
    bonus, metrics = policy_loss(logprobs, logprobs, logprobs, torch.zeros(1, 2), mask,
                                 LearnerConfig(entropy_coef=0.1), entropy=entropy)
    assert metrics["entropy"] == pytest.approx(3.0)
    assert bonus.item() == pytest.approx(base.item() - 0.3)


def test_critic_forward_shape_and_positions(tiny_model_dir):
    critic = load_critic(tiny_model_dir)
    prompts, responses = ragged_rows(2)
    with torch.no_grad():
        values, mask = critic_forward(critic, prompts, responses)
        assert values.shape == mask.shape == (3, 7)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            ids = torch.as_tensor(np.concatenate([prompt, response]), dtype=torch.long)[None]
            row = critic(input_ids=ids).logits[0, :, 0]
            p, h = len(prompt), len(response)
            torch.testing.assert_close(values[i, :h], row[p - 1:p + h - 1], atol=2e-5, rtol=0)  # V(s_j) before token j
            assert (values[i, h:] == 0).all()
    loss, metrics = critic_loss(values, values, values + 1.0, mask, LearnerConfig())
    assert loss.item() == pytest.approx(0.5 * 1.0 ** 2, abs=1e-5)  # L_V = 0.5 * mean (v - R)^2, v - R = -1
    assert metrics["value_error"] == pytest.approx(1.0, abs=1e-5)


def test_config_validation_and_schedule():
    with pytest.raises(ValueError, match=r"learner\.zero_stage.*0\.\.3"):
        LearnerConfig(zero_stage=4)
    with pytest.raises(ValueError, match="learner.total_steps"):
        lr_lambda(LearnerConfig(lr_schedule="cosine"))
    warm = lr_lambda(LearnerConfig(warmup_steps=2))
    assert [warm(k) for k in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = lr_lambda(LearnerConfig(lr_schedule="cosine", total_steps=4))
    assert [round(cosine(k), 6) for k in range(5)] == [1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6), 0.5,
                                                       round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6), 0.0]


def test_bf16_autocast_learner_keeps_float32_weights_and_small_updates(tiny_model_dir):
    """The learner's bf16 mode: forward + loss under autocast, float32 weights and AdamW state. One step at
    lr 1e-6 moves the float32 weights by ~1e-6, an update that bf16 weights (spacing ~1e-4 at |w| ~ 0.02)
    would round away, which is why a bf16-weight learner's KL stayed flat."""
    model = load_causal_lm(tiny_model_dir)  # float32
    prompts, responses = ragged_rows(2)
    with torch.no_grad():
        fp32_logprobs, _, mask = policy_forward(model, prompts, responses)
        with autocast("bfloat16", model.device):
            bf16_logprobs, _, _ = policy_forward(model, prompts, responses)
    assert bf16_logprobs.dtype == torch.float32  # log-softmax stays float32 under autocast
    diff = (bf16_logprobs - fp32_logprobs).abs()[mask > 0]
    assert 0 < diff.max() < 0.05, diff.max()  # bf16 matmuls did run, and stay close

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    weight = model.model.layers[0].mlp.down_proj.weight
    before = weight.detach().clone()
    advantages = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    with autocast("bfloat16", model.device):
        logprobs, entropy, mask = policy_forward(model, prompts, responses)
        loss, _ = policy_loss(logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, LearnerConfig(),
                              entropy=entropy)
    loss.backward()  # outside autocast, as torch recommends
    optimizer.step()
    assert weight.dtype == weight.grad.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in optimizer.state[weight].values() if s.is_floating_point())
    moved = weight.detach() - before
    touched = weight.grad != 0
    assert touched.float().mean() > 0.9
    assert (moved[touched] != 0).float().mean() > 0.99  # every float32 weight with a gradient moved
    rounded = (before.bfloat16().float() + moved).bfloat16() == before.bfloat16()
    assert rounded[touched].float().mean() > 0.9  # bf16 weights would have stayed where they were

"""DeepSpeed learner groups as Ray actors on CPU (gloo): training, weight sync, checkpoint resume, ZeRO-3.

Each group is 2 ranks x 1 CPU of the 2-CPU test Ray, so one group runs at a time (always shut down).
"""
import math

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from actors.learner import LearnerGroup
from pipeline.arrow import numpy_to_ragged, ragged_to_numpy
from pipeline.models import ModelConfig, load_causal_lm
from pipeline.policy import LearnerConfig, load_critic, policy_forward

pytestmark = pytest.mark.slow


def rows(seed: int, n: int = 5) -> pa.Table:
    """n (prompt, response) rows of random lengths; n odd so the 2 ranks need a padding row."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 1000, k).astype(np.int32) for k in rng.integers(3, 9, n)]
    responses = [rng.integers(10, 1000, k).astype(np.int32) for k in rng.integers(2, 7, n)]
    return pa.table({"prompt_ids": numpy_to_ragged(prompts, pa.int32()),
                     "response_ids": numpy_to_ragged(responses, pa.int32())})


def experience(group: LearnerGroup, table: pa.Table, seed: int) -> pa.Table:
    """Old log-probs from the group itself (ratio 1 at the start), a nearby reference, random advantages."""
    rng = np.random.default_rng(seed)
    old = group.logprobs(table)
    ref = [(x + 0.1 * rng.standard_normal(len(x))).astype(np.float32) for x in old]
    advantages = [rng.standard_normal(len(x)).astype(np.float32) for x in old]
    for name, column in (("sample_logprobs", old), ("ref_logprobs", ref), ("advantages", advantages)):
        table = table.append_column(name, numpy_to_ragged(column, pa.float32()))
    return table


def assert_same_weights(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_zero2_group_trains_syncs_and_resumes_exactly(tiny_model_dir, local_ray, tmp_path):
    model_cfg = ModelConfig(name=tiny_model_dir)
    cfg = LearnerConfig(ranks=2, zero_stage=2, micro_batch_size=2, lr=1e-3, dtype="float32")  # exact vs fp32 HF
    hf_model = load_causal_lm(tiny_model_dir)
    group = LearnerGroup(tiny_model_dir, model_cfg, cfg)
    try:
        batch1 = experience(group, rows(0), seed=0)
        before = local_ray.get(group.state_dict_ref())
        assert_same_weights(before, hf_model.state_dict())  # HF names, tied lm_head.weight included

        first = group.train_step(batch1)
        assert all(math.isfinite(v) for v in first.values()), first
        assert first["ratio"] == pytest.approx(1.0, abs=1e-5)  # old log-probs came from the same weights
        assert first["lr"] == 1e-3 and first["grad_norm"] > 0
        after = local_ray.get(group.state_dict_ref())
        assert any(not torch.equal(after[k], before[k]) for k in before), "one step must change the weights"

        # the synced dict loads into a fresh HF model that then scores exactly like the learners
        fresh = load_causal_lm(tiny_model_dir)
        fresh.load_state_dict(after, strict=True)
        with torch.no_grad():
            want, _, mask = policy_forward(fresh, ragged_to_numpy(batch1["prompt_ids"]),
                                           ragged_to_numpy(batch1["response_ids"]))
        for i, got in enumerate(group.logprobs(batch1)):
            np.testing.assert_allclose(got, want[i, : int(mask[i].sum())].numpy(), atol=1e-5)

        group.save_checkpoint(str(tmp_path), "ckpt", {"iteration": 1})
        batch2 = experience(group, rows(1), seed=1)
        second = group.train_step(batch2)
    finally:
        group.shutdown()

    resumed = LearnerGroup(tiny_model_dir, model_cfg, cfg)
    try:
        assert resumed.load_checkpoint(str(tmp_path), "ckpt") == {"iteration": 1}
        again = resumed.train_step(batch2)
    finally:
        resumed.shutdown()
    assert again.keys() == second.keys()
    for name in second:
        assert again[name] == pytest.approx(second[name], abs=1e-6), name


def test_zero3_state_dict_is_the_unsharded_model(tiny_model_dir, local_ray):
    # bf16 compute: autocast over float32 weights (DeepSpeed's bf16 mode, which makes bf16 params, stays off)
    cfg = LearnerConfig(ranks=2, zero_stage=3, micro_batch_size=2, lr=1e-3, dtype="bfloat16")
    group = LearnerGroup(tiny_model_dir, ModelConfig(name=tiny_model_dir), cfg)
    try:
        assert [r["dtype"] for r in local_ray.get([a.precision.remote() for a in group.actors])] == ["bfloat16"] * 2
        assert_same_weights(local_ray.get(group.state_dict_ref()), load_causal_lm(tiny_model_dir).state_dict())
        metrics = group.train_step(experience(group, rows(2), seed=2))
        assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        trained = local_ray.get(group.state_dict_ref())
        assert all(tensor.dtype == torch.float32 for tensor in trained.values())
        synced = local_ray.get(group.state_dict_ref("bfloat16"))
        assert synced["lm_head.weight"].dtype == torch.bfloat16
        assert synced["lm_head.weight"].shape == synced["model.embed_tokens.weight"].shape
        # the bucketed broadcast (gathering one ZeRO-3 parameter at a time) delivers the same weights
        plan = group.sync_plan("bfloat16", bucket_bytes=1 << 16)
        assert len(plan) > 3  # small buckets: several broadcasts
        address, port = group.rendezvous()
        receiver = Receiver.remote()
        local_ray.get([group.actors[0].join_sync_group.remote(address, port, 2, 60),
                       receiver.join.remote(address, port)])
        sends, receive = group.broadcast_weights_refs(plan, "bfloat16"), receiver.receive.remote(plan)  # at once
        seconds, received = local_ray.get(sends), local_ray.get(receive)
        assert all(s >= 0 for s in seconds)
        assert list(received) == [name for name in synced if name != "lm_head.weight"]  # a tied weight goes once
        for name, tensor in received.items():
            assert torch.equal(tensor, synced[name]), name
    finally:
        group.shutdown()


def test_token_budget_micro_batches_differ_per_rank_and_give_the_same_step(tiny_model_dir, local_ray):
    """ZeRO-3 gathers weights in every forward, collectively: with a token budget the two ranks plan different
    micro-batch counts and must still run as many as each other (a mismatch hangs); the step then equals
    the one with a single micro-batch per rank (the loss is a token mean, whatever the micro-batching)."""
    from actors.learner import shard
    from pipeline.policy import micro_batches

    table = rows(4, n=7)
    budget = 24
    plans = [micro_batches(ragged_to_numpy(t["prompt_ids"]), ragged_to_numpy(t["response_ids"]), 8, budget)
             for t, _ in (shard(table, rank, 2) for rank in range(2))]
    assert len(plans[0]) != len(plans[1]), plans  # the case under test
    steps = []
    for tokens in (budget, 0):
        cfg = LearnerConfig(ranks=2, zero_stage=3, micro_batch_size=8, micro_batch_tokens=tokens, lr=1e-3,
                            dtype="float32", logit_chunk=5)
        group = LearnerGroup(tiny_model_dir, ModelConfig(name=tiny_model_dir), cfg)
        try:
            steps.append(group.train_step(experience(group, table, seed=4)))
        finally:
            group.shutdown()
    # the global gradient norm (before clipping) and the losses: the same gradient, micro-batched or not
    # (not the weights: AdamW's first step moves each weight by ~lr * sign(g), so rounding flips near-zero ones)
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and steps[0]["grad_norm"] > 0
    for name in ("grad_norm", "loss", "pg_loss", "kl_k3", "entropy"):
        assert steps[0][name] == pytest.approx(steps[1][name], rel=1e-5, abs=1e-7), name


@ray.remote(num_cpus=0)
class Receiver:
    """Rank 1 of a weight-broadcast group in place of a vLLM engine: keeps what it receives."""

    def join(self, address, port):
        from pipeline.weight_sync import SyncGroup
        self.group = SyncGroup(address, port, 1, 2, "cpu", 60)

    def receive(self, plan):
        from pipeline.weight_sync import receive_buckets
        return {name: tensor.clone() for name, tensor in receive_buckets(self.group, plan, "bfloat16")}


def test_critic_group_values_and_value_loss(tiny_model_dir, local_ray):
    cfg = LearnerConfig(ranks=2, zero_stage=1, micro_batch_size=2, critic_lr=1e-3, dtype="float32")  # exact vs fp32
    table = rows(3)
    group = LearnerGroup(tiny_model_dir, ModelConfig(name=tiny_model_dir), cfg, role="critic")
    try:
        values = group.values(table)
        # the same seeded head on every rank: the group's values are a single in-process critic's
        critic = load_critic(tiny_model_dir, seed=cfg.seed)
        for got, prompt, response in zip(values, ragged_to_numpy(table["prompt_ids"]), ragged_to_numpy(table["response_ids"])):
            with torch.no_grad():
                ids = torch.as_tensor(np.concatenate([prompt, response]), dtype=torch.long)[None]
                want = critic(input_ids=ids).logits[0, len(prompt) - 1:-1, 0].numpy()
            np.testing.assert_allclose(got, want, atol=1e-5)
        returns = [v + 1.0 for v in values]
        metrics = group.train_step(table.append_column("returns", numpy_to_ragged(returns, pa.float32())))
        # old values = current values: error 1 everywhere, loss 0.5 * 1^2
        assert metrics["value_loss"] == pytest.approx(0.5, abs=1e-5) and metrics["value_error"] == pytest.approx(1.0)
        moved = group.values(table)
        assert np.mean([np.mean(m - v) for m, v in zip(moved, values)]) > 0  # values moved toward the returns
    finally:
        group.shutdown()


def test_out_of_range_zero_stage_fails_before_any_actor(tiny_model_dir, local_ray):
    with pytest.raises(ValueError, match=r"learner\.zero_stage must be in 0\.\.3"):
        LearnerConfig(zero_stage=4)
    cfg = LearnerConfig()
    cfg.zero_stage = -1  # set after construction, e.g. by a driver: the group checks again
    groups_before = len(local_ray.util.placement_group_table())
    with pytest.raises(ValueError, match=r"learner\.zero_stage"):
        LearnerGroup(tiny_model_dir, ModelConfig(name=tiny_model_dir), cfg)
    assert len(local_ray.util.placement_group_table()) == groups_before


def test_a_call_a_rank_never_answers_is_a_timeout_naming_it_and_a_rank_error_comes_at_once(local_ray):
    """_wait_all on stand-in rank calls (remote functions, not learners): all answer -> the results; one wedged ->
    a TimeoutError naming the call after the timeout; one failing -> its error, without waiting for the wedged one."""
    import time

    from actors.learner import _wait_all

    @ray.remote(num_cpus=0)
    def rank_call(seconds: float, fail: bool = False):
        if fail:
            raise ValueError("rank 1 broke")
        time.sleep(seconds)
        return seconds

    assert _wait_all([rank_call.remote(0), rank_call.remote(0.1)], "policy learners: train_step", 60) == [0, 0.1]
    wedged = [rank_call.remote(600), rank_call.remote(600)]
    try:
        with pytest.raises(TimeoutError, match=r"policy learners: train_step: 1 of 2 learner ranks gave no answer within 2 s"):
            _wait_all([rank_call.remote(0), wedged[0]], "policy learners: train_step", 2)
        with pytest.raises(ValueError, match="rank 1 broke"):
            _wait_all([wedged[1], rank_call.remote(0, fail=True)], "policy learners: train_step", 300)
    finally:
        for ref in wedged:
            ray.cancel(ref, force=True)

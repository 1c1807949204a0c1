"""The RL loop's control flow, with a fake `Workers` (no Ray, no models): it records which phases ran."""
import dataclasses

import pyarrow as pa
import pytest

from pipeline.data import builtin_prompts
from pipeline.driver import progress_postfix, prompt_batch, rl_loop, tokenize_prompts
from pipeline.endogenous import EndoRewardConfig
from pipeline.models import load_tokenizer


@dataclasses.dataclass
class LoopConfig:
    steps: int = 4
    prompts_per_step: int = 2
    seed: int = 0
    eval_every: int = 2
    checkpoint_every: int = 3
    sync_check_every: int = 2
    sync_tolerance: float = 0.0

    @dataclasses.dataclass
    class Rollout:
        n_samples: int = 2

    rollout: Rollout = dataclasses.field(default_factory=Rollout)


def records(dtype: str) -> list[dict]:
    return [{"requested": "auto", "dtype": dtype}]


class FakeWorkers:
    """Fake: returns fixed metrics and records the calls, so the test checks the loop's order and cadence."""

    def __init__(self, engine_dtype: str = "float32", learner_dtype: str = "float32"):
        self.calls = []
        self.precision = {"rollout_engines": records(engine_dtype), "policy_learners": records(learner_dtype) * 2}

    def generate(self, prompts, step, n_samples):
        self.calls.append(("generate", prompts.num_rows, n_samples))
        self.steps = getattr(self, "steps", []) + [step]
        return "rollouts"

    def score(self, refs):
        self.calls.append(("score",))
        return "scored"

    def values(self, ref):
        return None

    def make_experience(self, scored, values):
        self.calls.append(("experience",))
        return "experience", {"reward/total": 1.0}

    def train(self, ref):
        self.calls.append(("train",))
        return {"policy/loss": 0.5}

    def sync_weights(self):
        self.calls.append(("sync",))
        return 0.01

    def check_sync(self):
        self.calls.append(("check_sync",))
        return 0.0

    def heldout_reward(self, prompts, save_as):
        self.calls.append(("eval", save_as))
        return {"heldout/reward": 2.0}

    def save(self, path, state):
        self.calls.append(("save", state["step"]))

    def take_failures(self):
        failures, self.failures = getattr(self, "failures", []), []
        return failures


class Log:
    def __init__(self):
        self.rows = []

    def write(self, step, metrics):
        self.rows.append((step, metrics))

    def checkpoint_dir(self, step):
        return f"ckpt/{step}"

    def write_failures(self, failures):
        from pipeline.faults import failure_metrics
        self.failures = getattr(self, "failures", []) + failures
        return failure_metrics(failures)


def test_loop_order_cadence_and_timings():
    workers, log = FakeWorkers(), Log()
    prompts = pa.table({"prompt_id": [str(i) for i in range(6)], "prompt_ids": [[1, 2]] * 6})
    rl_loop(LoopConfig(), workers, prompts, prompts.slice(0, 2), log)
    names = [c[0] for c in workers.calls]
    assert names[:7] == ["eval", "generate", "score", "experience", "train", "sync", "generate"]
    assert names.count("train") == 4 and names.count("sync") == 4
    assert [c[1] for c in workers.calls if c[0] == "eval"] == [f"heldout/step_{s:06d}.parquet" for s in (0, 2, 4)]
    assert names.count("check_sync") == 2
    assert [c for c in workers.calls if c[0] == "save"] == [("save", 3), ("save", 4)]
    assert [step for step, _ in log.rows] == [0, 1, 2, 3, 4]
    last = log.rows[-1][1]
    assert last["policy/loss"] == 0.5 and last["time/step"] >= last["time/train"] >= 0 and "time/driver_overhead" in last


def test_resume_skips_done_steps_and_resyncs_first():
    workers, log = FakeWorkers(), Log()
    prompts = pa.table({"prompt_id": [str(i) for i in range(6)], "prompt_ids": [[1, 2]] * 6})
    rl_loop(LoopConfig(), workers, prompts, prompts, log, start_step=3)
    assert workers.calls[0] == ("sync",) and [s for s, _ in log.rows] == [4]


def test_prompt_batches_are_a_function_of_the_step():
    prompts = builtin_prompts()
    a, b = prompt_batch(prompts, 5, 8, seed=1), prompt_batch(prompts, 5, 8, seed=1)
    assert a.equals(b) and a.num_rows == 8
    epoch = [prompt_batch(prompts, s, 8, seed=1)["prompt_id"].to_pylist() for s in range(prompts.num_rows // 8)]
    assert len({pid for batch in epoch for pid in batch}) == 8 * len(epoch)  # no repeats within an epoch


def test_too_long_prompt_is_refused_by_name(real_model_dir):
    tokenizer = load_tokenizer(real_model_dir)
    prompts = pa.table({"prompt_id": ["short", "long"],
                        "prompt": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "word " * 400}]]})
    with pytest.raises(ValueError, match="prompt 'long' is .* tokens, over rollout.max_prompt_tokens=64"):
        tokenize_prompts(prompts, tokenizer, EndoRewardConfig(), 64)
    assert tokenize_prompts(prompts.slice(0, 1), tokenizer, EndoRewardConfig(), 64).num_rows == 1
    long_principle = EndoRewardConfig(form="contrastive", principle="word " * 100)
    with pytest.raises(ValueError, match="prompt 'short' is .* tokens under reward.form contrastive, over rollout.max_prompt_tokens"):
        tokenize_prompts(prompts.slice(0, 1), tokenizer, long_principle, 64)


@pytest.mark.parametrize("form, count", [("raw", 0), ("pmi", 1), ("contrastive", 2)])
def test_prompts_carry_the_extra_contexts_of_the_reward_form(real_model_dir, form, count):
    from pipeline.arrow import CONTEXT_COLUMN, arrow_to_contexts
    from pipeline.chat import context_prompts

    tokenizer, cfg = load_tokenizer(real_model_dir), EndoRewardConfig(form=form, system_prompt="Be brief.")
    messages = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "Name a fruit."}]]
    table = tokenize_prompts(pa.table({"prompt_id": ["a", "b"], "prompt": messages}), tokenizer, cfg, 128)
    if not count:
        assert CONTEXT_COLUMN not in table.column_names
        return
    got = arrow_to_contexts(table[CONTEXT_COLUMN])
    assert [[c.tolist() for c in row] for row in got] == [context_prompts(tokenizer, m, cfg) for m in messages]


def test_a_sync_that_did_not_arrive_stops_the_run():
    class Stale(FakeWorkers):
        def check_sync(self):
            return 0.8  # what a stale lm_head gave in tests/actors/test_rollout.py

    with pytest.raises(RuntimeError, match="weight sync check failed.*0.8.*tolerance 0.001"):
        rl_loop(LoopConfig(), Stale(), pa.table({"prompt_id": ["a", "b"], "prompt_ids": [[1], [2]]}),
                pa.table({"prompt_id": ["c"], "prompt_ids": [[3]]}), Log())
    # the tolerance follows the dtypes the actors resolved (dtype auto), not the requested ones
    for engine, learner in (("bfloat16", "float32"), ("float32", "bfloat16")):
        with pytest.raises(RuntimeError, match="tolerance 0.5"):
            rl_loop(LoopConfig(), Stale(engine, learner), pa.table({"prompt_id": ["a", "b"], "prompt_ids": [[1], [2]]}),
                    pa.table({"prompt_id": ["c"], "prompt_ids": [[3]]}), Log())


def test_prompt_order_seeds_do_not_shift_with_the_run_seed():
    """Old scheme: rng(seed + epoch), so run seed 1's epoch 0 was run seed 0's epoch 1."""
    prompts = builtin_prompts()
    per_epoch = prompts.num_rows // 8
    seed1_epoch0 = prompt_batch(prompts, 0, 8, seed=1)["prompt_id"].to_pylist()
    seed0_epoch1 = prompt_batch(prompts, per_epoch, 8, seed=0)["prompt_id"].to_pylist()
    assert seed1_epoch0 != seed0_epoch1


def test_loop_passes_the_step_as_the_seed_domain():
    workers, log = FakeWorkers(), Log()
    rl_loop(LoopConfig(), workers, builtin_prompts(), builtin_prompts(), log)
    assert workers.steps == list(range(LoopConfig().steps))


def test_the_progress_bar_shows_each_steps_reward_kl_and_seconds(capsys):
    class Rewarded(FakeWorkers):
        def make_experience(self, scored, values):
            return "experience", {"reward/endogenous": -85.123456, "kl/k1_rollout": 0.0912345}

    rl_loop(LoopConfig(steps=2), Rewarded(), pa.table({"prompt_id": ["a", "b"], "prompt_ids": [[1], [2]]}),
            pa.table({"prompt_id": ["c"], "prompt_ids": [[3]]}), Log())
    bar = capsys.readouterr().err.split("\r")[-1]  # tqdm redraws its one line on stderr
    assert bar.startswith("rl: 100%|") and "2/2" in bar and "reward=-85.12, kl=0.09123, s=" in bar
    assert progress_postfix({"reward/endogenous": 1.0, "time/step": 31.25}) == {"reward": "1", "s": "31.25"}


def test_a_recovered_failure_is_logged_with_its_step():
    """A failure the workers recovered from during a step goes to the run log and into that step's row only."""
    from pipeline.faults import Failure

    class Failing(FakeWorkers):
        def generate(self, prompts, step, n_samples):
            if step == 1:
                self.failures = [Failure("rollout_engines_0", 1, "rollout", "died", 2.5, 4)]
            return super().generate(prompts, step, n_samples)

    workers, log = Failing(), Log()
    prompts = pa.table({"prompt_id": [str(i) for i in range(6)], "prompt_ids": [[1, 2]] * 6})
    rl_loop(LoopConfig(steps=3, eval_every=0), workers, prompts, prompts, log)
    assert [f.actor for f in log.failures] == ["rollout_engines_0"]
    rows = dict(log.rows)
    assert rows[2]["faults/count"] == 1 and rows[2]["faults/recover_s"] == 2.5 and rows[2]["faults/rows_redone"] == 4
    assert "faults/count" not in rows[1] and "faults/count" not in rows[3]

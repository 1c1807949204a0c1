"""The whole RL loop on embedded Ray with the tiny model: 1 vLLM engine, 1 base-model scorer, 2 ZeRO-2 learners."""
import json
import os
import shutil

import numpy as np
import pytest
import ray

from jobs import rlhf
from pipeline.config import parse_config

pytestmark = pytest.mark.slow

TIME_KEYS = ("time/", "sync/seconds")


def tiny_args(model_dir, output, *extra):
    return ["--local", "--model.name", model_dir, "--rollout_dtype", "float32", "--steps", "2", "--prompts_per_step", "2",
            "--rollout.n_samples", "2", "--rollout.max_new_tokens", "8", "--rollout.max_prompt_tokens", "128",
            "--learner.ranks", "2", "--learner.zero_stage", "2", "--learner.lr", "1e-3", "--eval_every", "1",
            "--sync_check_every", "1", "--checkpoint_every", "1", "--storage", str(output), *extra]


def assert_same_metrics(expected_rows: list[dict], rows: list[dict]) -> None:
    """The same steps, and every metric of each step exactly equal, times aside."""
    assert [m["step"] for m in rows] == [m["step"] for m in expected_rows] == [1, 2, 3]
    for expected, row in zip(expected_rows, rows):
        for key, value in expected.items():
            if not key.startswith(TIME_KEYS):
                assert row[key] == value, (row["step"], key)


def read_metrics(path):
    from pipeline.runlog import metrics_history
    return metrics_history(open(path).read())  # the rows as a resumed run sees them (resume markers applied)


def test_one_step_changes_weights_and_reaches_the_engine(tmp_path, tiny_model_dir, local_ray):
    from actors.groups import RLWorkers
    from pipeline.driver import rl_loop, tokenize_prompts
    from pipeline.data import builtin_prompts
    from pipeline.models import load_tokenizer
    from pipeline.runlog import RunLog

    # float32 engine and learner (dtype auto is bf16 on an AMX CPU): the sync parity is then exact to 1e-3
    cfg = parse_config(rlhf.RLConfig, tiny_args(tiny_model_dir, tmp_path, "--steps", "1", "--learner.dtype", "float32"))
    workers = RLWorkers(cfg)
    try:
        before = ray.get(workers.learner.state_dict_ref())
        prompts = tokenize_prompts(builtin_prompts().slice(0, 6), load_tokenizer(tiny_model_dir), cfg.reward, 128)
        log = RunLog(str(tmp_path), "config: test")
        rl_loop(cfg, workers, prompts.slice(0, 4), prompts.slice(4, 2), log)
        after = ray.get(workers.learner.state_dict_ref())
        changed = [name for name in before if not np.allclose(before[name].numpy(), after[name].numpy())]
        assert len(changed) > len(before) // 2  # an lr of 1e-3 moves nearly every tensor
        # the engine holds the new weights: its log-probs equal the learners' (fp32 engine)
        assert workers.check_sync() < 1e-3
    finally:
        log.close()
        workers.shutdown()
    step = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert step["step"] == 1 and np.isfinite(step["policy/loss"]) and step["policy/grad_norm"] > 0
    assert step["sync/max_logprob_diff"] < 1e-3
    for phase in ("rollout", "score", "experience", "train", "sync"):
        assert step[f"time/{phase}"] > 0
    # the held-out samples of each evaluation are kept for judging the policy afterwards
    from pipeline.arrow import read_parquet_bytes
    for evaluated in (0, 1):
        samples = read_parquet_bytes((tmp_path / f"heldout/step_{evaluated:06d}.parquet").read_bytes())
        assert samples.num_rows == 2 * cfg.heldout_samples and samples.column_names[:3] == ["prompt_id", "prompt_ids", "response_ids"]
        assert np.mean(samples["reward"].to_numpy()) == pytest.approx(read_metrics(tmp_path / "metrics.jsonl")[evaluated]["heldout/reward"])


def test_resume_reproduces_the_next_step(tmp_path, tiny_model_dir, local_ray):
    first = tmp_path / "first"
    rlhf.main(tiny_args(tiny_model_dir, first))
    full = read_metrics(first / "metrics.jsonl")
    assert [m["step"] for m in full] == [0, 1, 2] and (first / "curves.png").exists()
    # Drop the step-2 checkpoint and resume from step 1: step 2 must come out the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000002")
    rlhf.main(tiny_args(tiny_model_dir, resumed, "--resume"))
    again = read_metrics(resumed / "metrics.jsonl")
    assert [m["step"] for m in again] == [0, 1, 2]
    raw = (resumed / "metrics.jsonl").read_text().splitlines()  # appended: the old rows, the marker, the redone step
    assert len(raw) == 5 and json.loads(raw[3]) == {"resumed_from": 1}
    expected, got = full[2], again[2]
    for key, value in expected.items():
        if not key.startswith(TIME_KEYS):
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert os.path.exists(resumed / "checkpoints" / "step_000002" / "driver_state.json")


def test_combined_endogenous_and_sentence_rm_reward_runs_and_logs_both(tmp_path, tiny_model_dir, tiny_sentence_rm_dir,
                                                                       local_ray):
    # also the weight sync's fallback path (the full state dict through the object store), float32 so its
    # parity check is exact
    rlhf.main(tiny_args(tiny_model_dir, tmp_path, "--steps", "1", "--checkpoint_every", "0",
                        "--advantage.sentence_rm_weight", "0.5", "--sentence_rm", tiny_sentence_rm_dir,
                        "--sync.mode", "object_store", "--learner.dtype", "float32"))
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    step = metrics[-1]
    assert step["sync/max_logprob_diff"] < 1e-3
    assert np.isfinite(step["reward/endogenous"]) and np.isfinite(step["reward/sentence_rm"])
    assert "heldout/sentence_rm" in metrics[0] and np.isfinite(step["policy/loss"])


def test_wait_times_out_naming_the_phase(local_ray):
    from actors.groups import get, wait

    @ray.remote(num_cpus=0)
    def nap(seconds):
        import time
        time.sleep(seconds)
        return seconds

    fast, slow = nap.remote(0), nap.remote(600)
    assert get(fast, "score", 120) == 0  # a finished call comes back
    with pytest.raises(TimeoutError, match=r"rollout \(2 engine calls\): 1 of 2 calls not done after 0.5 s"):
        wait([fast, slow], "rollout (2 engine calls)", 0.5)
    ray.cancel(slow, force=True)


# ------------------------------------------------------------------ failures (--faults.kill, pipeline/faults.py)

FAULT_RUN = ("--steps", "3", "--learner.dtype", "float32", "--eval_every", "0", "--checkpoint_every", "0",
             "--export", "false")  # float32 engine, scorer and learners: a redone step must come out exactly alike


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, local_ray, tmp_path_factory):
    """The metrics of a 3-step run without a fault, shared by the fault tests of this module."""
    output = tmp_path_factory.mktemp("uninterrupted")
    rlhf.main(tiny_args(tiny_model_dir, output, *FAULT_RUN))
    assert (output / "failures.jsonl").read_text() == ""
    return read_metrics(output / "metrics.jsonl")


def test_a_dead_engine_a_wedged_engine_and_a_dead_scorer_are_replaced_and_the_run_comes_out_the_same(
        tmp_path, tiny_model_dir, uninterrupted):
    """Engine 0 crashes in step 1's rollout, its replacement wedges in step 2's (--faults.hang: no answer within
    --faults.engine_timeout_s) and scorer 0 crashes in step 2's scoring: each engine is replaced (current weights,
    parity-checked) and regenerates its prompts with the same seeds, Ray restarts the scorer and retries its batch;
    every step's metrics equal the uninterrupted run's, and failures.jsonl records all three."""
    rlhf.main(tiny_args(tiny_model_dir, tmp_path, *FAULT_RUN, "--faults.kill", "rollout_engines:0@1,scorers:0@2",
                        "--faults.hang", "rollout_engines:0@2", "--faults.engine_timeout_s", "20"))
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert_same_metrics(uninterrupted, got)
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert [(f["actor"], f["step"], f["phase"], f["cause"], f["rows_redone"]) for f in failures] == [
        ("rollout_engines_0", 1, "rollout", "died", 4), ("rollout_engines_0", 2, "rollout", "no answer within 20 s", 4),
        ("scorers_0", 2, "score", "died", 4)]
    assert all(f["recover_s"] > 0 for f in failures)
    assert ":actor_name:RolloutEngine" in (tmp_path / "logs" / "replacement_engines_0.log").read_text()  # its output kept
    assert [m.get("faults/count") for m in got] == [None, 1.0, 2.0]  # the row of step s is logged as s + 1


def test_a_dead_engine_without_replacement_stops_the_run_naming_the_option(tmp_path, tiny_model_dir, local_ray):
    """With --faults.replace_engines false an engine crash is not recovered: the error names the option."""
    with pytest.raises(RuntimeError, match=r"engine\(s\) \{0: 'died'\} and --faults.replace_engines is false"):
        rlhf.main(tiny_args(tiny_model_dir, tmp_path, *FAULT_RUN, "--steps", "1", "--faults.kill", "rollout_engines:0@0",
                            "--faults.replace_engines", "false"))


def test_an_engine_call_is_lost_when_its_engine_died_or_gave_no_answer_in_time(local_ray):
    """lost_engines, on stand-in actors: a finished call is kept, a dead engine's is 'died', a wedged engine's is
    'no answer within --faults.engine_timeout_s'; with --faults.replace_engines false the error names the option."""
    import time
    from types import SimpleNamespace

    from actors.groups import RLWorkers, crash, get
    from pipeline.faults import FaultsConfig

    @ray.remote(num_cpus=0)
    class Engine:
        def generate(self, seconds):
            time.sleep(seconds)
            return seconds

    workers = RLWorkers.__new__(RLWorkers)  # only what lost_engines reads: the config and the engines (the pool's)
    workers.cfg = SimpleNamespace(wait_timeout_s=60, faults=FaultsConfig(engine_timeout_s=2))
    engines = [Engine.remote() for _ in range(3)]
    workers.pool = SimpleNamespace(actors=engines)
    try:
        get([engine.__ray_ready__.remote() for engine in engines], "stand-in engines", 120)
        crash(engines[1])
        calls = {i: engine.generate.remote(seconds) for i, (engine, seconds) in enumerate(zip(engines, (0, 0, 600)))}
        owner = dict(enumerate(engines))  # shard i on engine i
        assert workers.lost_engines(calls, owner, step=1) == {engines[1]: "died", engines[2]: "no answer within 2 s"}
        workers.cfg.faults = FaultsConfig(engine_timeout_s=2, replace_engines=False)
        with pytest.raises(RuntimeError, match=r"rollout at step 1: engine\(s\) \{1: 'died', 2: 'no answer within 2 s'\} "
                                               r"and --faults.replace_engines is false"):
            workers.lost_engines(calls, owner, step=1)
    finally:
        for engine in engines:
            ray.kill(engine)


def test_a_restarted_scorer_is_logged_and_one_without_restarts_left_stops_the_run(local_ray):
    """note_restarts, on stand-in scorers: a scorer Ray restarted (a new pid) is a Failure with the rows sent to it;
    a dead scorer with no restart left is an error naming --faults.scorer_restarts."""
    from types import SimpleNamespace

    from actors.groups import RLWorkers, crash, get, pid_of
    from pipeline.faults import FaultsConfig

    @ray.remote(num_cpus=0)
    class Scorer:
        pass

    workers = RLWorkers.__new__(RLWorkers)  # only what note_restarts reads
    workers.cfg = SimpleNamespace(wait_timeout_s=60, faults=FaultsConfig(scorer_restarts=1))
    workers.scorers, workers.sentence_rm, workers.failures = [Scorer.options(max_restarts=1, max_task_retries=1).remote(),
                                                                 Scorer.remote()], None, []
    workers.step, workers.shard_rows = 1, [4, 2, 6]  # three rollout shards: scorer 0 got the first and the third
    try:
        workers.scorer_pids = get([pid_of(s) for s in workers.scorers], "stand-in scorers", 120)
        crash(workers.scorers[0])
        workers.note_restarts(started=0.0)  # its pid call waits for the restart
        (failure,) = workers.take_failures()
        assert (failure.actor, failure.step, failure.phase, failure.rows_redone) == ("scorers_0", 1, "score", 10)
        crash(workers.scorers[1])  # max_restarts 0
        with pytest.raises(RuntimeError, match="a scorer died at step 1 .* --faults.scorer_restarts 1 restarts"):
            workers.note_restarts(started=0.0)
    finally:
        for scorer in workers.scorers:
            ray.kill(scorer)


def test_a_dead_learner_rank_restarts_every_actor_from_the_checkpoint_and_the_run_comes_out_the_same(
        tmp_path, tiny_model_dir, uninterrupted):
    """Learner rank 1 crashes in step 2's train: the DeepSpeed group cannot go on, so jobs.rlhf restarts every actor
    from the newest complete checkpoint (after step 2) and redoes step 2; every step's metrics equal the
    uninterrupted run's, and failures.jsonl and the terminal say what happened."""
    rlhf.main(tiny_args(tiny_model_dir, tmp_path, *FAULT_RUN, "--checkpoint_every", "1",
                        "--faults.kill", "policy_learners:1@2"))
    got = read_metrics(tmp_path / "metrics.jsonl")  # the resume marker drops nothing here: step 3 never finished
    assert_same_metrics(uninterrupted, got)
    assert '{"resumed_from": 2}' in (tmp_path / "metrics.jsonl").read_text()
    (failure,) = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert (failure["actor"], failure["step"], failure["phase"], failure["rows_redone"]) == ("policy_learners", 2, "train", 4)
    assert failure["recover_s"] > 0 and "from checkpoint step 2" in failure["replacement"]


def test_a_driver_killed_mid_step_resumes_and_the_run_comes_out_the_same(tmp_path, tiny_model_dir, uninterrupted):
    """kill -9 of the whole job (the driver's process group and every Ray process it started) about a second after
    the first checkpoint is complete, which is inside the next step; then --resume: every step's metrics, as the
    run log reads them back, equal the uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from pipeline.runlog import MARKER
    from tests.ray_processes import kill, processes_with

    args = tiny_args(tiny_model_dir, tmp_path, *FAULT_RUN, "--checkpoint_every", "1")
    tag = uuid.uuid4().hex  # in the environment of the driver and of every Ray process it starts
    log = open(tmp_path / "killed_driver.log", "w")
    # its own embedded Ray, with the logical CPUs the test Ray has (the actors ask for more than the 2 cores)
    driver = subprocess.Popen([sys.executable, "-m", "jobs.rlhf", *args, "--ray.num_cpus", "8"], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", "ENDORL_TEST_DRIVER": tag}, start_new_session=True)
    marker = tmp_path / "checkpoints" / "step_000001" / MARKER
    deadline = time.monotonic() + 600
    while not marker.exists():
        if driver.poll() is not None or time.monotonic() > deadline:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            kill(processes_with([tag]))
            raise AssertionError(f"no checkpoint: {(tmp_path / 'killed_driver.log').read_text()[-3000:]}")
        time.sleep(0.2)
    time.sleep(1.0)
    assert driver.poll() is None, "the run ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    kill(processes_with([tag]))  # its embedded Ray, as a killed job's node would lose it

    rlhf.main([*args, "--resume"])
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert_same_metrics(uninterrupted, got)
    assert '{"resumed_from": ' in (tmp_path / "metrics.jsonl").read_text()

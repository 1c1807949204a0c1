"""jobs.rlhf refuses bad input with a clear message before Ray or any actor starts; its restart loop (run()) on a
stand-in session."""
import json

import pytest

from jobs import rlhf


@pytest.fixture(autouse=True)
def no_ray_start(monkeypatch):
    """Every refusal here must come before Ray or any actor starts: starting Ray fails the test."""
    def started(*args, **kwargs):
        raise AssertionError("jobs.rlhf started Ray before refusing the input")
    monkeypatch.setattr(rlhf, "init_ray", started)


def refuse(tiny_model_dir, *args, match):
    with pytest.raises(SystemExit, match=match):
        rlhf.main(["--local", "--model.name", tiny_model_dir, *args])


def test_zero_prompts(tmp_path, tiny_model_dir):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    refuse(tiny_model_dir, "--prompts", str(empty), match="--prompts: .*no rows")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "only one"}) + "\n")
    refuse(tiny_model_dir, "--prompts", str(one), match="no held-out prompts")
    refuse(tiny_model_dir, "--prompts", str(one), "--eval_every", "0", match="prompts_per_step 8 is more than the 1")


def test_grpo_needs_two_samples(tiny_model_dir):
    refuse(tiny_model_dir, "--rollout.n_samples", "1", match="grpo needs at least 2 samples.*--rollout.n_samples 4")
    refuse(tiny_model_dir, "--rollout.n_samples", "1", "--advantage.estimator", "rloo", match="rloo needs at least 2")


def test_gpu_requested_without_gpu(tiny_model_dir):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    refuse(tiny_model_dir, "--model.device", "cuda", match="no CUDA GPU")


def test_a_fault_injection_the_run_cannot_hit_is_refused(tiny_model_dir):
    refuse(tiny_model_dir, "--faults.kill", "rollout_engines:1@0", match=r"--faults.kill 'rollout_engines:1@0': the run has 1 rollout_engines")
    refuse(tiny_model_dir, "--faults.kill", "scorers:0@20", match=r"step 20 is not run \(--steps 20")
    refuse(tiny_model_dir, "--faults.kill", "learners:0@1", match=r"role 'learners' is not one of rollout_engines, scorers")


def test_zero_stage_out_of_range(tiny_model_dir):
    refuse(tiny_model_dir, "--learner.zero_stage", "4", match=r"learner.zero_stage must be in 0..3.*--learner.zero_stage 2")


def test_prompt_longer_than_context(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hi", "hello", "hey", "word " * 300]))
    refuse(tiny_model_dir, "--prompts", str(prompts), "--heldout_fraction", "0", "--eval_every", "0", "--prompts_per_step", "2",
           "--rollout.max_prompt_tokens", "64", match="over rollout.max_prompt_tokens=64")
    refuse(tiny_model_dir, "--rollout.max_prompt_tokens", "1000", "--rollout.max_new_tokens", "100",
           match="over the model's window of 1024 tokens")


def test_resume_without_checkpoint(tmp_path, tiny_model_dir):
    refuse(tiny_model_dir, "--resume", "--storage", str(tmp_path / "run"), match="no complete checkpoint")


def test_sentence_rm_weight_needs_a_trained_rm(tmp_path, tiny_model_dir):
    refuse(tiny_model_dir, "--advantage.sentence_rm_weight", "1", "--sentence_rm", str(tmp_path),
           match="needs a trained sentence RM.*jobs.train_rm")


def test_unknown_model_is_a_clear_error(tmp_path):
    # regression: jobs.rlhf let ModelNotFoundError escape as a traceback
    with pytest.raises(SystemExit, match="--model.name: model path .* does not exist"):
        rlhf.main(["--local", "--model.name", str(tmp_path / "no_model")])


def test_resume_with_a_changed_config_is_refused_unless_forced(tmp_path, tiny_model_dir):
    from pipeline.config import parse_config, to_yaml
    run = tmp_path / "run"
    base = ["--local", "--model.name", tiny_model_dir, "--storage", str(run), "--steps", "4"]
    saved = parse_config(rlhf.RLConfig, base)
    saved.learner.total_steps = saved.steps * saved.learner.ppo_epochs  # as main() saves it
    checkpoint = run / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.yaml").write_text(to_yaml(saved))
    (checkpoint / "driver_state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(SystemExit, match=r"steps: 4 -> 6(.|\n)*rollout.engines: 1 -> 2(.|\n)*--resume_force"):
        rlhf.main([*base[:-1], "6", "--rollout.engines", "2", "--resume"])
    with pytest.raises(AssertionError, match="started Ray"):  # only a free field changed: past the check, to Ray
        rlhf.main([*base, "--resume", "--checkpoint_every", "1"])
    with pytest.raises(AssertionError, match="started Ray"):  # every difference named: the resume goes on
        rlhf.main([*base[:-1], "6", "--rollout.engines", "2", "--resume", "--resume_force", "steps,rollout.engines"])
    # learner.total_steps follows steps when left at 0, so naming steps was enough; set by hand, it is its own field
    with pytest.raises(SystemExit, match=r"learner.total_steps: 4 -> 9"):
        rlhf.main([*base[:-1], "6", "--learner.total_steps", "9", "--resume", "--resume_force", "steps"])


def test_an_unknown_or_missing_logger_is_refused_before_ray(tiny_model_dir, monkeypatch):
    refuse(tiny_model_dir, "--loggers", "tensorboard,mlflow", match="--loggers tensorboard,mlflow: mlflow is not a logger")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    refuse(tiny_model_dir, "--loggers", "wandb", match="--loggers wandb needs the wandb package.*pip install wandb")


def test_a_learner_group_failing_past_max_failures_stops_the_run_naming_the_option(tmp_path, tiny_model_dir, monkeypatch):
    """run()'s restart loop with session() replaced by a stand-in whose learner group fails every time (a real rank
    death and restart are tests/actors/test_groups.py's): the run restarts once (--max_failures 1) from the start,
    as no checkpoint exists, then stops with the error and the option."""
    from pipeline.faults import LearnerGroupFailed
    sessions = []

    def failing_session(cfg, train_ids, heldout_ids, checkpoint, restart=None):
        sessions.append((checkpoint, restart))
        raise LearnerGroupFailed("policy learner rank died at step 0 (train)", 0)

    monkeypatch.setattr(rlhf, "init_ray", lambda *args: None)
    monkeypatch.setattr(rlhf, "session", failing_session)
    with pytest.raises(SystemExit, match=r"rank died at step 0 \(train\)\. Stopped after 1 restart\(s\) \(--max_failures\)"):
        rlhf.main(["--local", "--model.name", tiny_model_dir, "--storage", str(tmp_path), "--max_failures", "1"])
    (first, no_restart), (second, (failure, _)) = sessions
    assert first is None and no_restart is None and second is None  # nothing to resume from: both from step 0
    assert (failure.actor, failure.step, failure.phase, failure.replacement) == (
        "policy_learners", 0, "train", "all actors, from the start (no complete checkpoint yet)")

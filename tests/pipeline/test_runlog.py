import json

from pipeline.runlog import RunLog, latest_checkpoint, plot_curves


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    log = RunLog(str(tmp_path), "a: 1\n")
    for step in range(4):
        log.write(step, {"reward/total": float(step)})
    log.close()
    resumed = RunLog(str(tmp_path), "a: 1\n", resume_step=2)  # regression: rows 3.. used to stay and repeat
    resumed.write(3, {"reward/total": 30.0})
    resumed.close()
    assert [(r["step"], r["reward/total"]) for r in resumed.history()] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    fresh = RunLog(str(tmp_path), "a: 1\n")
    assert fresh.history() == []


def test_latest_checkpoint_needs_the_driver_state_and_plot_writes_png(tmp_path):
    log = RunLog(str(tmp_path), "a: 1\n")
    for step in (1, 2):
        path = log.checkpoint_dir(step)
        assert open(f"{path}/config.yaml").read() == "a: 1\n"
    (tmp_path / "checkpoints" / "step_000001" / "driver_state.json").write_text(json.dumps({"step": 1}))
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoints" / "step_000001"), 1)  # step 2 incomplete
    log.write(1, {"heldout/reward": 1.0, "kl/k1_rollout": 0.1})
    assert plot_curves(log.history(), str(tmp_path / "curves.png")) == [
        "endogenous reward (per response)", "KL to the reference (per response / per token)"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    log.write(2, {"heldout/reward": 2.0, "reward/sentence_rm": 0.3})  # a second reward source gets its own panel
    assert "sentence-RM score R (per response)" in plot_curves(log.history(), str(tmp_path / "curves.png"))

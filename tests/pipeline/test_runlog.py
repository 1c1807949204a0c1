import json

import pytest

from pipeline.runlog import RunLog, latest_checkpoint, plot_curves


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    make_uri, _ = request.getfixturevalue("s3_server")
    return make_uri(f"runlog/{request.node.originalname}")


def test_resume_drops_metrics_logged_after_the_checkpoint(location):
    log = RunLog(location, "a: 1\n")
    for step in range(4):
        log.write(step, {"reward/total": float(step)})
    log.close()
    resumed = RunLog(location, "a: 1\n", resume_step=2)  # regression: rows 3.. used to stay and repeat
    resumed.write(3, {"reward/total": 30.0})
    resumed.close()
    assert [(r["step"], r["reward/total"]) for r in resumed.history()] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert any(name.startswith("events.out.tfevents") for name in resumed.storage.listdir("tensorboard"))
    fresh = RunLog(location, "a: 1\n")
    assert fresh.history() == []


def test_latest_checkpoint_needs_the_driver_state_and_plot_writes_png(location):
    log = RunLog(location, "a: 1\n")
    for step in (1, 2):
        path = log.checkpoint_dir(step)
        assert log.storage.read_text(f"{path}/config.yaml") == "a: 1\n"
    log.storage.write_text("checkpoints/step_000001/driver_state.json", json.dumps({"step": 1}))
    assert latest_checkpoint(location) == ("checkpoints/step_000001", 1)  # step 2 is incomplete
    log.write(1, {"heldout/reward": 1.0, "kl/k1_rollout": 0.1})
    assert plot_curves(log.history(), log.storage) == [
        "endogenous reward (per response)", "KL to the reference (per response / per token)"]
    with log.storage.readable_dir("") as folder:
        assert open(f"{folder}/curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    log.write(2, {"heldout/reward": 2.0, "reward/sentence_rm": 0.3})  # a second reward source gets its own panel
    assert "sentence-RM score R (per response)" in plot_curves(log.history(), log.storage)
    log.close()

import importlib.util
import json
from pathlib import Path

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


def test_local_metrics_are_appended_not_rewritten(tmp_path):
    log = RunLog(str(tmp_path / "run"), "a: 1\n")
    log.write(0, {"x": 0.0})
    path = log.storage.path("metrics.jsonl")
    inode = __import__("os").stat(path).st_ino
    log.write(1, {"x": 1.0})
    assert __import__("os").stat(path).st_ino == inode  # same file, appended (a rewrite renames a new file in)
    assert open(path).read().splitlines() == [json.dumps({"step": 0, "x": 0.0}), json.dumps({"step": 1, "x": 1.0})]
    log.close()


def test_resume_marker_and_torn_last_line(location):
    log = RunLog(location, "a: 1\n")
    for step in range(4):
        log.write(step, {"x": float(step)})
    log.close()
    text = log.storage.read_text("metrics.jsonl")
    log.storage.write_text("metrics.jsonl", text + '{"step": 4, "x": 4')  # kill -9 in the middle of a line
    resumed = RunLog(location, "a: 1\n", resume_step=2)
    resumed.write(3, {"x": 30.0})
    resumed.close()
    lines = resumed.storage.read_text("metrics.jsonl").splitlines()
    assert lines[:4] == text.splitlines()  # nothing written before the resume is lost
    assert lines[4] == '{"step": 4, "x": 4' and json.loads(lines[5]) == {"resumed_from": 2}  # marker on a new line
    assert [(r["step"], r["x"]) for r in resumed.history()] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_corrupt_line_in_the_middle_is_a_clear_error():
    from pipeline.runlog import metrics_history
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        metrics_history('garbage\n{"step": 0}\n')


@pytest.mark.parametrize("marker", ['{"step": 3', "", '{"step": "3"}', '{"step": 5}', "[3]"])
def test_a_torn_or_invalid_newest_marker_falls_back_to_the_previous_checkpoint(tmp_path, capsys, marker):
    log = RunLog(str(tmp_path / "run"), "a: 1\n")
    for step in (2, 3):
        log.checkpoint_dir(step)
    log.storage.write_text("checkpoints/step_000002/driver_state.json", json.dumps({"step": 2}))
    log.storage.write_text("checkpoints/step_000003/driver_state.json", marker)
    assert latest_checkpoint(log.dir) == ("checkpoints/step_000002", 2)
    assert "checkpoints/step_000003 skipped" in capsys.readouterr().out
    log.storage.write_text("checkpoints/step_000002/driver_state.json", marker)  # no complete one left
    assert latest_checkpoint(log.dir) is None
    log.close()


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file (W&B's record log: 32 KiB blocks of
    chunks with a 7-byte header: crc, length, type; protobuf Records) with W&B's own protobuf classes."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, chunk, rows = 7, b"", []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.HasField("history"):
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows.append({"step": items["_step"], **{k: v for k, v in items.items() if not k.startswith("_")}})
    return rows


def test_wandb_gets_the_metrics_that_metrics_jsonl_has(tmp_path):
    run = tmp_path / "run"
    log = RunLog(str(run), "steps: 3\nrollout:\n  n_samples: 4\n", loggers=["tensorboard", "wandb"])
    log.write(0, {"heldout/reward": -80.25, "heldout/response_length": 48.0})
    for step in (1, 2, 3):
        log.write(step, {"reward/endogenous": -90.0 + step / 3, "kl/k1_rollout": 0.01 * step, "time/step": 30.5})
    log.close()
    history = log.history()
    assert [row["step"] for row in history] == [0, 1, 2, 3]
    assert wandb_history(run) == history  # same keys, same values, same steps
    assert any(name.startswith("events.out.tfevents") for name in log.storage.listdir("tensorboard"))


def test_loggers_are_checked_before_any_work(monkeypatch):
    from pipeline.runlog import check_loggers
    check_loggers(["tensorboard", "wandb"])
    check_loggers([])  # metrics.jsonl only
    with pytest.raises(ValueError, match="--loggers tensorboard,neptune: neptune is not a logger.*tensorboard, wandb"):
        check_loggers(["tensorboard", "neptune"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"--loggers wandb needs the wandb package.*pip install wandb"):
        check_loggers(["wandb"])


def test_failures_go_to_failures_jsonl_and_a_fresh_run_starts_it_empty(tmp_path):
    """Each recovered failure is a line of failures.jsonl with its actor, step, phase, recovery time and rows."""
    import json as json_

    from pipeline.faults import Failure
    from pipeline.runlog import FAILURES, RunLog

    log = RunLog(str(tmp_path), "config: test", loggers=())
    metrics = log.write_failures([Failure("scorers_0", 1, "score", "died", 1.25, 4, "pid 7")])
    assert metrics == {"faults/count": 1.0, "faults/recover_s": 1.25, "faults/rows_redone": 4.0}
    assert json_.loads((tmp_path / FAILURES).read_text()) == {
        "actor": "scorers_0", "step": 1, "phase": "score", "cause": "died", "recover_s": 1.25, "rows_redone": 4,
        "replacement": "pid 7"}
    log.close()
    RunLog(str(tmp_path), "config: test", loggers=()).close()
    assert (tmp_path / FAILURES).read_text() == ""

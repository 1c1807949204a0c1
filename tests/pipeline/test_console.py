"""What a job leaves on the terminal (its own lines, errors) and what goes to STORAGE/logs/driver.log."""
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.console import summary
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parents[2]

# A driver-level script: real library output (DeepSpeed's import-time accelerator line on stdout, torch's loggers,
# a FutureWarning as torch raises them), the job's own line, an ERROR record, then an exception.
SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from pipeline.console import LogFile

    console = LogFile(sys.argv[1])
    console.preload("deepspeed")
    warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning)
    logging.getLogger("torch.distributed").warning("a torch logger's own line")
    logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
    print("the job's own line", flush=True)
    with console.capture():
        print("Processing zero checkpoint (a library's plain print)")
    logging.getLogger("endorl").error("an error record")
    console.close()
    raise RuntimeError("the run failed")
""")


def test_library_output_goes_to_the_log_file_and_errors_to_the_terminal(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(run)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    log = (run / "logs" / "driver.log").read_text()
    assert done.returncode == 1
    assert done.stdout == "the job's own line\n"  # DeepSpeed alone used to print its accelerator line here
    for line in ("Setting accelerator to CPU", "Processing zero checkpoint", "all_gather_into_tensor` is deprecated", "a torch logger's own line",
                 "a transformers warning"):
        assert line in log and line not in done.stderr, line
    assert "ERROR endorl: an error record" in done.stderr and "an error record" in log
    assert "RuntimeError: the run failed" in done.stderr


def test_the_summary_says_how_the_run_went_and_where_its_files_are(tmp_path):
    history = [{"step": 0, "heldout/reward": -80.0, "heldout/response_length": 48.0},
               {"step": 1, "reward/endogenous": -90.5, "kl/k1_rollout": 0.09, "rollout/response_length": 45.6},
               {"step": 2, "reward/endogenous": -85.25, "kl/k1_rollout": 0.12, "rollout/response_length": 44.0,
                "heldout/reward": -70.0, "heldout/response_length": 40.5}]
    storage = Storage(str(tmp_path / "run"))
    text = summary(history, 125.4, storage, exported=storage.location_of("final_policy"))
    assert text.splitlines()[0] == "done: 2 steps in 2 min 5 s"
    assert "last step (2):  reward -85.25, KL 0.12, response length 44.0 tokens" in text
    assert "held-out reward:  -80 (step 0) -> -70 (step 2), response length 48.0 -> 40.5 tokens" in text
    assert f"tensorboard --logdir {tmp_path}/run/tensorboard" in text
    assert f"{tmp_path}/run/final_policy" in text and f"{tmp_path}/run/logs" in text
    assert "trained policy" not in summary(history[:1], 3, storage)  # no --export: no policy line
    assert "W&B" not in text
    with_wandb = summary(history, 3, storage, loggers=["wandb"])
    assert f"wandb sync {tmp_path}/run/wandb/offline-run-*" in with_wandb and "TensorBoard" not in with_wandb


def test_on_object_storage_the_log_is_written_locally_and_uploaded_at_the_end(s3_server):
    import logging

    from pipeline.console import LogFile

    make_uri, _ = s3_server
    console = LogFile(make_uri("console/run"))
    logging.getLogger("ray.some_library").warning("a library warning")
    assert not console.storage.exists("logs/driver.log")  # object storage cannot append: one upload, by close()
    console.close()
    assert "WARNING ray.some_library: a library warning" in console.storage.read_text("logs/driver.log")

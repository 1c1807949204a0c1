"""Where a run writes: metrics.jsonl, the same metrics to TensorBoard (and W&B with --loggers), checkpoints, the
config, and the final PNG plot.

All of it goes to the run's storage (pipeline/storage.py): a local folder, a shared path, or s3:// / gs://.
On object storage TensorBoard writes into a local folder that is uploaded after every write (W&B's offline run:
at the end).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Literal

import yaml
from torch.utils.tensorboard import SummaryWriter

from pipeline.config import opt
from pipeline.faults import Failure, failure_metrics
from pipeline.storage import Storage

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
FAILURES = "failures.jsonl"  # one line per actor failure and its recovery (pipeline/faults.py: Failure)
MARKER = "driver_state.json"  # written last, by the driver: a checkpoint without it is incomplete
LOGGERS = ("tensorboard", "wandb")  # where the metrics go besides metrics.jsonl (--loggers)


@dataclasses.dataclass
class WandbConfig:
    project: str = opt("endorl", "W&B project of the run (with --loggers ...,wandb); the run is named after --storage")
    mode: Literal["offline", "online"] = opt("offline", "offline: the W&B run is written under STORAGE/wandb only "
                                                        "(upload it later with `wandb sync STORAGE/wandb/offline-run-*`); "
                                                        "online: streamed to W&B (needs `wandb login` or WANDB_API_KEY)")


def check_loggers(loggers: list[str]) -> None:
    """Before any work: every --loggers name is known and its package is installed."""
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ValueError(f"--loggers {','.join(loggers)}: {', '.join(unknown)} is not a logger. Fix: a comma-separated "
                         f"list of {', '.join(LOGGERS)} (e.g. --loggers tensorboard,wandb)")
    for name in loggers:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--loggers {name} needs the {name} package, which is not installed. Fix: "
                             f".venv/bin/pip install {name}, or drop {name} from --loggers")


class RunLog:
    def __init__(self, location: str, config_yaml: str, resume_step: int = 0, loggers: tuple | list = ("tensorboard",),
                 wandb: WandbConfig | None = None):
        check_loggers(list(loggers))
        self.storage = Storage(location)
        self.dir = self.storage.location
        self.config_yaml = config_yaml
        self.storage.write_text("config.yaml", config_yaml)
        self.local_dir = self.storage.path() if self.storage.is_local else tempfile.mkdtemp(prefix="endorl-runlog-")
        self.tensorboard = None
        if "tensorboard" in loggers:
            self.tensorboard = SummaryWriter(f"{self.local_dir}/tensorboard", purge_step=resume_step or None)
        self.wandb = None
        if "wandb" in loggers:  # a resume starts a new W&B run (named "... resumed from N"): its steps restart there
            import wandb as wandb_lib
            wandb = wandb or WandbConfig()
            name = os.path.basename(self.storage.root.rstrip("/")) + (f" resumed from {resume_step}" if resume_step else "")
            self.wandb = wandb_lib.init(project=wandb.project, mode=wandb.mode, dir=self.local_dir, name=name,
                                        config=yaml.safe_load(config_yaml), settings=wandb_lib.Settings(silent=True, console="off"))
        # metrics.jsonl is appended, never rewritten on local storage: a kill -9 can tear only the last line.
        # A resume appends {"resumed_from": step}; history() drops the rows past it (the resumed run redoes them).
        old = self.storage.read_text(METRICS) if resume_step and self.storage.exists(METRICS) else ""
        if old and not old.endswith("\n"):
            old += "\n"  # a torn last line (killed mid-write) ends here; the next record starts on its own line
        self.text = old + (json.dumps({"resumed_from": resume_step}) + "\n" if resume_step else "")
        self.storage.write_text(METRICS, self.text)
        self.failures_text = self.storage.read_text(FAILURES) if resume_step and self.storage.exists(FAILURES) else ""
        self.storage.write_text(FAILURES, self.failures_text)  # empty: no actor failed (a fresh run drops old ones)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.tensorboard:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.storage.is_local:  # append + fsync: the line is on disk before the next step starts
            with open(self.storage.path(METRICS), "a") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        else:  # object storage cannot append: an atomic rewrite of the whole file
            self.text += line
            self.storage.write_text(METRICS, self.text)
        if self.tensorboard and not self.storage.is_local:
            self.storage.upload(f"{self.local_dir}/tensorboard", "tensorboard")

    def write_failures(self, failures: list[Failure]) -> dict[str, float]:
        """Each failure as a line of failures.jsonl (and of driver.log); returns the faults/* metrics of the step."""
        for failure in failures:
            logger.warning("%s failed (%s) at step %d, phase %s: recovered in %.1f s, %d rows redone", failure.actor,
                           failure.cause, failure.step, failure.phase, failure.recover_s, failure.rows_redone)
            self.failures_text += json.dumps(dataclasses.asdict(failure)) + "\n"
        if failures:
            self.storage.write_text(FAILURES, self.failures_text)  # rare and small: rewritten whole, atomically
        return failure_metrics(failures)

    def write_json(self, name: str, value) -> None:
        self.storage.write_text(name, json.dumps(value, indent=2) + "\n")

    def checkpoint_dir(self, step: int) -> str:
        """The checkpoint folder of `step`, relative to the run's storage; it carries the config that made it."""
        relative = f"{CHECKPOINTS}/step_{step:06d}"
        self.storage.write_text(f"{relative}/config.yaml", self.config_yaml)
        return relative

    def history(self) -> list[dict]:
        """The metric rows as the (last) resumed run sees them."""
        return metrics_history(self.storage.read_text(METRICS)) if self.storage.exists(METRICS) else []

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            import wandb as wandb_lib
            self.wandb.finish()
            wandb_lib.teardown()  # waits for W&B's service process: after finish() alone the .wandb file was at times still empty
        if not self.storage.is_local:
            for name in ("tensorboard", "wandb"):
                if os.path.isdir(f"{self.local_dir}/{name}"):
                    self.storage.upload(f"{self.local_dir}/{name}", name)
            shutil.rmtree(self.local_dir, ignore_errors=True)


def metrics_history(text: str) -> list[dict]:
    """Rows of a metrics.jsonl: a {"resumed_from": s} record drops the rows of steps > s written before it; a torn
    line (a kill -9 mid-write: the last line, or the line before a resume marker) is skipped."""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            following = lines[number + 1] if number + 1 < len(lines) else None
            if following is None or following.startswith('{"resumed_from"'):
                continue  # torn by a kill; the resumed run redoes that step
            raise ValueError(f"{METRICS} line {number + 1} is not JSON ({line[:60]!r}); fix or delete that line")
        if "resumed_from" in record:
            rows = [row for row in rows if row["step"] <= record["resumed_from"]]
        else:
            rows.append(record)
    return rows


def latest_checkpoint(location: str) -> tuple[str, int] | None:
    """(path relative to the storage, step) of the newest complete checkpoint in the run at `location`, or None."""
    storage = Storage(location)
    found = []
    for name in storage.listdir(CHECKPOINTS):
        match = re.fullmatch(r"step_(\d+)", name)
        if match and storage.exists(f"{CHECKPOINTS}/{name}/{MARKER}"):
            found.append((int(match.group(1)), f"{CHECKPOINTS}/{name}"))
    for step, path in sorted(found, reverse=True):  # newest first; a torn or foreign marker is skipped, said so
        problem = marker_problem(storage, path, step)
        if problem is None:
            return path, step
        print(f"checkpoint {storage.location_of(path)} skipped: {problem}; falling back to the previous one", flush=True)
    return None


def marker_problem(storage: Storage, path: str, step: int) -> str | None:
    """Why `path`'s marker does not mark a complete checkpoint of `step` (None: it does)."""
    text = storage.read_text(f"{path}/{MARKER}")
    try:
        state = json.loads(text)
    except json.JSONDecodeError:
        return f"{MARKER} is not JSON ({text[:40]!r}: torn or corrupt)"
    if not isinstance(state, dict) or type(state.get("step")) is not int:
        return f"{MARKER} has no integer 'step' ({text[:40]!r})"
    if state["step"] != step:
        return f"{MARKER} says step {state['step']}, the folder step {step}"
    return None


PANELS = [  # (title, metrics): one panel each; a panel none of whose metrics were logged is left out
    ("endogenous reward (per response)", ("heldout/reward", "reward/endogenous")),
    ("sentence-RM score R (per response)", ("heldout/sentence_rm", "reward/sentence_rm")),
    ("KL to the reference (per response / per token)", ("kl/k1_rollout", "policy/kl_k3")),
]


def plot_curves(history: list[dict], storage: Storage, name: str = "curves.png") -> list[str]:
    """Each reward source's held-out and training curves, and the KL, against the step; returns the panel titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, keys) for title, keys in PANELS if any(key in row for row in history for key in keys)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(row["step"], row[key]) for row in history if key in row]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(name, png.getvalue())
    return [title for title, _ in panels]

"""Where a run writes: TensorBoard scalars, metrics.jsonl, checkpoints, the config, and the final PNG plot.

All of it goes to the run's storage (pipeline/storage.py): a local folder, a shared path, or s3:// / gs://.
On object storage TensorBoard writes into a local folder that is uploaded after every write.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import tempfile

from torch.utils.tensorboard import SummaryWriter

from pipeline.storage import Storage

CHECKPOINTS = "checkpoints"
MARKER = "driver_state.json"  # written last, by the driver: a checkpoint without it is incomplete


class RunLog:
    def __init__(self, location: str, config_yaml: str, resume_step: int = 0):
        self.storage = Storage(location)
        self.dir = self.storage.location
        self.config_yaml = config_yaml
        self.storage.write_text("config.yaml", config_yaml)
        self.local_dir = self.storage.path() if self.storage.is_local else tempfile.mkdtemp(prefix="endorl-runlog-")
        self.tensorboard = SummaryWriter(f"{self.local_dir}/tensorboard", purge_step=resume_step or None)
        kept = [row for row in self.history() if row["step"] <= resume_step] if resume_step else []
        self.lines = [json.dumps(row) + "\n" for row in kept]  # rows past the checkpoint are redone by the resumed run
        self.storage.write_text("metrics.jsonl", "".join(self.lines))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()
        self.lines.append(json.dumps({"step": step, **metrics}) + "\n")
        self.storage.write_text("metrics.jsonl", "".join(self.lines))
        if not self.storage.is_local:
            self.storage.upload(f"{self.local_dir}/tensorboard", "tensorboard")

    def write_json(self, name: str, value) -> None:
        self.storage.write_text(name, json.dumps(value, indent=2) + "\n")

    def checkpoint_dir(self, step: int) -> str:
        """The checkpoint folder of `step`, relative to the run's storage; it carries the config that made it."""
        relative = f"{CHECKPOINTS}/step_{step:06d}"
        self.storage.write_text(f"{relative}/config.yaml", self.config_yaml)
        return relative

    def history(self) -> list[dict]:
        if not self.storage.exists("metrics.jsonl"):
            return []
        return [json.loads(line) for line in self.storage.read_text("metrics.jsonl").splitlines() if line.strip()]

    def close(self) -> None:
        self.tensorboard.close()
        if not self.storage.is_local:
            self.storage.upload(f"{self.local_dir}/tensorboard", "tensorboard")
            shutil.rmtree(self.local_dir, ignore_errors=True)


def latest_checkpoint(location: str) -> tuple[str, int] | None:
    """(path relative to the storage, step) of the newest complete checkpoint in the run at `location`, or None."""
    storage = Storage(location)
    found = []
    for name in storage.listdir(CHECKPOINTS):
        match = re.fullmatch(r"step_(\d+)", name)
        if match and storage.exists(f"{CHECKPOINTS}/{name}/{MARKER}"):
            found.append((int(match.group(1)), f"{CHECKPOINTS}/{name}"))
    if not found:
        return None
    step, path = max(found)
    return path, step


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

"""Where a run writes: TensorBoard scalars, metrics.jsonl, checkpoints, the config, and the final PNG plot."""
from __future__ import annotations

import glob
import json
import os
import re

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, output_dir: str, config_yaml: str, resume_step: int = 0):
        self.dir = output_dir
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "config.yaml"), "w") as fh:
            fh.write(config_yaml)
        self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step or None)
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.config_yaml = config_yaml
        kept = [row for row in self.history() if row["step"] <= resume_step] if resume_step else []
        with open(self.metrics_path, "w") as fh:  # rows past the checkpoint are redone by the resumed run
            fh.writelines(json.dumps(row) + "\n" for row in kept)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def checkpoint_dir(self, step: int) -> str:
        path = os.path.join(self.dir, "checkpoints", f"step_{step:06d}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.yaml"), "w") as fh:
            fh.write(self.config_yaml)  # every checkpoint carries the config that made it
        return path

    def history(self) -> list[dict]:
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def close(self) -> None:
        self.tensorboard.close()


def latest_checkpoint(output_dir: str) -> tuple[str, int] | None:
    """(path, step) of the newest complete checkpoint under output_dir, or None."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoints", "step_*")):
        if os.path.exists(os.path.join(path, "driver_state.json")):  # written last: the checkpoint is complete
            found.append((int(re.search(r"step_(\d+)", path).group(1)), path))
    if not found:
        return None
    step, path = max(found)
    return path, step


PANELS = [  # (title, metrics): one panel each; a panel none of whose metrics were logged is left out
    ("endogenous reward (per response)", ("heldout/reward", "reward/endogenous")),
    ("sentence-RM score R (per response)", ("heldout/sentence_rm", "reward/sentence_rm")),
    ("KL to the reference (per response / per token)", ("kl/k1_rollout", "policy/kl_k3")),
]


def plot_curves(history: list[dict], png_path: str) -> list[str]:
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
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return [title for title, _ in panels]

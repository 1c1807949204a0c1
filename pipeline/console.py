"""What a job shows on the terminal, and what goes to its log file instead.

The terminal keeps what the job prints itself (its config, one progress bar, a summary) and every error. The
libraries' warnings and info lines (Python warnings, and the records of every logger: Ray, torch, transformers,
DeepSpeed, vLLM) go to the run's `logs/driver.log`. The actors' output is kept out of the terminal by Ray itself
(`ray.init(log_to_driver=False)`) and copied into `logs/` at the end (actors/cluster.py: save_actor_logs).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile

from pipeline.storage import Storage

LOGS = "logs"
DRIVER_LOG = f"{LOGS}/driver.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFile:
    """This process's library output -> STORAGE/logs/driver.log (appended: a resume adds to it). On object
    storage the file is written locally and uploaded by close(). Records at ERROR and above also reach stderr."""

    def __init__(self, location: str):
        self.storage = Storage(location)
        self.local_dir = None if self.storage.is_local else tempfile.mkdtemp(prefix="endorl-logs-")
        self.path = self.storage.path(DRIVER_LOG) if self.storage.is_local else f"{self.local_dir}/driver.log"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = logging.FileHandler(self.path)
        self.file.setFormatter(logging.Formatter(FORMAT))
        errors = logging.StreamHandler(sys.stderr)
        errors.setLevel(logging.ERROR)
        errors.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.previous = logging.root.handlers[:], logging.root.level
        logging.root.handlers = [self.file, errors]
        logging.root.setLevel(logging.INFO)
        logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_default_handler()  # its records propagate to the root instead
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()
        self.route()

    def route(self) -> None:
        """Libraries that print through a stream handler of their own (Ray, torch, DeepSpeed) propagate to the
        root instead, so their records reach the file."""
        for logger in list(logging.root.manager.loggerDict.values()):
            if isinstance(logger, logging.Logger):
                own = [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
                for handler in own:
                    logger.removeHandler(handler)
                logger.propagate = logger.propagate or bool(own)

    @contextlib.contextmanager
    def capture(self):
        """Plain prints and progress bars of library code run in the block (DeepSpeed's zero_to_fp32 prints, the
        loading bars of a model) go to the file; an exception still leaves the block and reaches the terminal."""
        with contextlib.redirect_stdout(self.file.stream), contextlib.redirect_stderr(self.file.stream):
            yield

    def preload(self, *modules: str) -> None:
        """Import libraries that print while they are imported (DeepSpeed names its accelerator) with that output
        in the file, then route the loggers they made."""
        with self.capture():
            for module in modules:
                importlib.import_module(module)
        self.route()

    def close(self) -> None:
        self.file.close()
        logging.root.handlers, level = self.previous
        logging.root.setLevel(level)
        logging.captureWarnings(False)
        if self.local_dir:
            self.storage.upload(self.local_dir, LOGS)
            shutil.rmtree(self.local_dir, ignore_errors=True)


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def summary(history: list[dict], seconds: float, storage: Storage, exported: str = "",
            loggers: tuple | list = ("tensorboard",)) -> str:
    """The lines a run ends with: its last step's reward, KL and length, the held-out reward and length from the
    first to the last evaluation, the time, and where its files are."""
    steps = [row for row in history if "reward/endogenous" in row]
    evals = [row for row in history if "heldout/reward" in row]
    lines = [f"done: {len(steps)} steps in {duration(seconds)}"]
    if steps:
        last = steps[-1]
        lines.append(f"  last step ({last['step']}):  reward {last['reward/endogenous']:.4g}, KL {last.get('kl/k1_rollout', float('nan')):.4g}, "
                     f"response length {last.get('rollout/response_length', float('nan')):.1f} tokens")
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"  held-out reward:  {first['heldout/reward']:.4g} (step {first['step']}) -> {last['heldout/reward']:.4g} "
                     f"(step {last['step']}), response length {first['heldout/response_length']:.1f} -> "
                     f"{last['heldout/response_length']:.1f} tokens")
    lines.append(f"  run folder:       {storage.location} (metrics.jsonl, curves.png, checkpoints/, heldout/)")
    if "tensorboard" in loggers:
        lines.append(f"  TensorBoard:      tensorboard --logdir {storage.location_of('tensorboard')}")
    if "wandb" in loggers:
        lines.append(f"  W&B:              {storage.location_of('wandb')} (offline runs: wandb sync {storage.location_of('wandb')}/offline-run-*)")
    if exported:
        lines.append(f"  trained policy:   {exported} (a Hugging Face folder: transformers from_pretrained, vllm serve)")
    lines.append(f"  logs:             {storage.location_of(LOGS)} (driver.log: library warnings and info; one file per actor)")
    return "\n".join(lines)

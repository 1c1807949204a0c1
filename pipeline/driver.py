"""The RL loop: prompts -> rollouts -> frozen-model scoring -> advantages -> learner update -> weight sync.

`rl_loop` is the whole algorithm. It talks to worker groups (actors/groups.py) whose methods take and return
references to Arrow tables in Ray's object store; the driver never pulls a batch through itself, only the small
metric dicts. Each group call returns when its work is done, so every phase is timed on its own.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.arrow import context_columns, numpy_to_ragged
from pipeline.chat import context_prompts, encode_prompt
from pipeline.seeds import epoch_seed
from pipeline.precision import sync_tolerance


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        step = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = step
        out["time/driver_overhead"] = step - sum(self.seconds.values())  # everything not inside a phase
        return out


def tokenize_prompts(prompts: pa.Table, tokenizer, reward_cfg, max_prompt_tokens: int) -> pa.Table:
    """(prompt_id, prompt messages) -> (prompt_id, prompt_ids), under reward_cfg.system_prompt, plus each prompt's
    extra contexts for reward forms pmi and contrastive (CONTEXT_COLUMN: the engines copy it onto every sample, for
    the scorer); a prompt or context over the limit is an error, before any work."""
    messages = prompts["prompt"].to_pylist()
    ids = [encode_prompt(tokenizer, m, reward_cfg.system_prompt) for m in messages]
    contexts = [context_prompts(tokenizer, m, reward_cfg) for m in messages]
    for prompt_id, p, c in zip(prompts["prompt_id"].to_pylist(), ids, contexts):
        longest = max([len(p)] + [len(x) for x in c])
        if longest > max_prompt_tokens:
            what = "" if longest == len(p) else f" under reward.form {reward_cfg.form}"
            raise ValueError(f"prompt {prompt_id!r} is {longest} tokens{what}, over rollout.max_prompt_tokens={max_prompt_tokens}. "
                             f"Fix: shorten or drop it, or raise --rollout.max_prompt_tokens (within the model's window).")
    return pa.table({"prompt_id": prompts["prompt_id"], "prompt_ids": numpy_to_ragged(ids, pa.int32()),
                     **context_columns(contexts)})


def prompt_batch(prompts: pa.Table, step: int, batch_size: int, seed: int) -> pa.Table:
    """The prompts of `step`: a fresh seeded shuffle each epoch, so the data position is just the step number."""
    per_epoch = prompts.num_rows // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(prompts.num_rows)
    return prompts.take(order[index * batch_size:(index + 1) * batch_size])


def sync_check_tolerance(cfg, precision: dict[str, list[dict]]) -> float:
    """--sync_tolerance, or the default for the dtypes the probed engine 0 and the learners resolved on their nodes."""
    return cfg.sync_tolerance or sync_tolerance(precision["rollout_engines"][0]["dtype"],
                                                *(r["dtype"] for r in precision["policy_learners"]))


def check_parity(diff: float, tolerance: float, which: str = "the engines") -> float:
    if not diff <= tolerance:
        raise RuntimeError(f"weight sync check failed: engine and learner log-probs differ by {diff:.4g} "
                           f"(tolerance {tolerance:g}); {which} are not sampling from the trained policy.")
    return diff


def check_sync(workers, cfg) -> float:
    """Engine vs learner log-probs on a probe after a sync; a difference over the tolerance stops the run."""
    return check_parity(workers.check_sync(), sync_check_tolerance(cfg, workers.precision))


POSTFIX = {"reward": "reward/endogenous", "kl": "kl/k1_rollout", "s": "time/step"}  # the progress bar's, per step


def progress_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows after a step: its mean reward, KL to the reference (per response) and seconds."""
    return {short: f"{metrics[key]:.4g}" for short, key in POSTFIX.items() if key in metrics}


def heldout_file(step: int) -> str:
    """Where the held-out samples of the evaluation after `step` go, in the run's storage."""
    return f"heldout/step_{step:06d}.parquet"


class Workers(Protocol):
    """What the loop needs from the cluster (implemented by actors.groups.RLWorkers)."""

    precision: dict[str, list[dict]]  # role -> each actor's resolved dtype record (pipeline/precision.py)
    def generate(self, prompts: pa.Table, step: int | str, n_samples: int): ...  # -> rollout refs; seeds from step
    def score(self, rollout_refs): ...                                          # -> scored refs (+ ref logprobs)
    def values(self, scored_refs): ...                                          # -> value refs or None (no critic)
    def make_experience(self, scored_refs, value_refs): ...                     # -> (experience ref, metrics)
    def train(self, experience_ref) -> dict: ...                                # policy (+ critic) update metrics
    def sync_weights(self) -> float: ...                                        # learners -> every rollout engine
    def check_sync(self) -> float: ...                                         # max |logp_engine - logp_learner|
    def heldout_reward(self, prompts: pa.Table, save_as: str) -> dict: ...  # mean reward of held-out samples
    def save(self, path: str, state: dict) -> None: ...
    def take_failures(self) -> list: ...  # pipeline.faults.Failure records since the last call (actors replaced)


def rl_loop(cfg, workers: Workers, train_prompts: pa.Table, heldout_prompts: pa.Table, log, start_step: int = 0) -> None:
    """On-policy RL with the endogenous reward: one iteration per step, every phase timed."""
    if start_step > 0:
        workers.sync_weights()  # resumed: the engines start from the checkpoint's policy
    elif cfg.eval_every:
        log.write(0, workers.heldout_reward(heldout_prompts, save_as=heldout_file(0)))  # before any update
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="rl", unit="step")
    for step in bar:
        timer, metrics = PhaseTimer(), {}
        batch = prompt_batch(train_prompts, step, cfg.prompts_per_step, cfg.seed)
        with timer("rollout"):
            rollouts = workers.generate(batch, step=step, n_samples=cfg.rollout.n_samples)
        metrics["rollout/engines"] = float(len(rollouts))  # the engines this batch was split over (elastic: changes)
        with timer("score"):
            scored = workers.score(rollouts)
        with timer("values"):
            values = workers.values(scored)
        with timer("experience"):
            experience, experience_metrics = workers.make_experience(scored, values)
        with timer("train"):
            metrics.update(workers.train(experience))
        with timer("sync"):
            metrics["sync/seconds"] = workers.sync_weights()
        if cfg.sync_check_every and (step + 1) % cfg.sync_check_every == 0:
            with timer("sync_check"):
                metrics["sync/max_logprob_diff"] = check_sync(workers, cfg)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            with timer("eval"):
                metrics.update(workers.heldout_reward(heldout_prompts, save_as=heldout_file(step + 1)))
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            with timer("checkpoint"):
                workers.save(log.checkpoint_dir(step + 1), {"step": step + 1})
        metrics.update(experience_metrics)
        metrics.update(log.write_failures(workers.take_failures()))  # failures.jsonl; faults/* when any
        metrics.update(timer.metrics())
        log.write(step + 1, metrics)
        bar.set_postfix(progress_postfix(metrics), refresh=False)  # drawn with the step count it belongs to

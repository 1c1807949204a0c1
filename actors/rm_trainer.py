"""The Ray Train workers of jobs.train_rm: one data-parallel DeepSpeed rank of a reward model each.

`train_worker` is the loop TorchTrainer runs on every worker; `RMWorker` is one rank's state (tokenizer, reward
model in a DeepSpeed engine) and what it does with it. The math lives in pipeline/rm_training.py:

  - process group: Ray Train's (gloo on cpu, nccl on cuda, from --model.device), adopted by DeepSpeed.
  - data: every worker reads the whole train / held-out / eval tables from the object store and encodes its own
    shard (shard_indices, deterministic in --seed); every rank runs the same number of steps.
  - each epoch: train, score the held-out pairs (after the last epoch also --eval_data), report the metrics
    with a checkpoint (every rank's DeepSpeed state + rank 0's reward model); a resumed run loads the newest.
  - the model: every worker resolves --model.name on its own node (a bundled model is converted there, once per
    node); nothing of the driver's disk is used. Checkpoints go to the run's storage through Ray Train, and
    rank 0 writes the run log (metrics.jsonl, TensorBoard) there (pipeline/runlog.py).

`cfg` is jobs.train_rm's RMTrainConfig (seed, storage, model, rm, train).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from tqdm import tqdm
from transformers import AutoModel

from actors.learner import BACKENDS, deepspeed_config
from pipeline.config import to_yaml
from pipeline.models import check_device, load_tokenizer, resolve_model
from pipeline.policy import LearnerConfig
from pipeline.precision import precision_record
from pipeline.rm_training import (HELDOUT, EncodedPairs, accuracy_by_subset, encode_pairs, epoch_steps, pair_loss,
                                  score_examples, shard_indices)
from pipeline.runlog import RunLog
from pipeline.sentence_rm import add_boundary_token, build_reward_model, save_reward_model

TRAIN_STATE = "train_state.json"  # in every epoch checkpoint: {epoch, step, world_size}


def train_worker(config: dict) -> None:
    """The Ray Train loop of one worker: resume, train epochs, evaluate, checkpoint and report each epoch."""
    cfg = config["cfg"]
    worker = RMWorker(cfg, config["max_length"])
    train_table, heldout, evals = ray.get([config["train"], config["heldout"], config["eval"]])
    train = worker.encode(train_table, shard_indices(train_table.num_rows, worker.world, worker.rank, cfg.seed))
    start_epoch, step = worker.resume(ray.train.get_checkpoint())
    log = RunLog(cfg.storage, to_yaml(cfg), resume_step=step) if worker.rank == 0 else None
    extras = {"trained_pairs": len(train) * worker.world, "worker_start_s": worker.start_s,
              "truncated_train": int(worker.sum_over_workers([train.truncated])[0])}
    for epoch in range(start_epoch, cfg.train.epochs):
        step, train_metrics = worker.train_epoch(train, epoch, step, log)
        # held-out pairs every epoch; after the last epoch also every --eval_data set (the weights that become
        # final/), reported with the last checkpoint: Ray Train hands the driver a checkpoint's metrics
        last = epoch == cfg.train.epochs - 1
        evaluation = worker.evaluate(pa.concat_tables([heldout, evals]) if last else heldout)
        metrics = {"epoch": epoch + 1, "step": step, **train_metrics}
        if HELDOUT in evaluation["accuracy"]:
            metrics["heldout/accuracy"] = evaluation["accuracy"][HELDOUT]
        if log:
            log.write(step, {name: value for name, value in metrics.items() if "/" in name})
            print(f"epoch {epoch + 1}/{cfg.train.epochs}, step {step}: "
                  + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if "/" in name))
        if last:
            metrics.update(evaluation, **extras)
        worker.save_and_report(metrics)
    if log:
        log.close()


class RMWorker:
    """One data-parallel rank: tokenizer, reward model in a DeepSpeed engine, and what it does with them."""

    def __init__(self, cfg, max_length: int):
        started = time.perf_counter()
        os.environ.setdefault("DS_ACCELERATOR", cfg.model.device)  # read when deepspeed is first imported
        import deepspeed

        check_device(cfg.model.device)
        self.cfg, self.max_length = cfg, max_length
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        deepspeed.init_distributed(dist_backend=BACKENDS[cfg.model.device])  # adopts Ray Train's process group

        # backbone (+ the <END> marker for the sentence RM) -> reward model -> DeepSpeed engine
        model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)  # on this node; bundled: converted once
        self.tokenizer = load_tokenizer(model_path)
        backbone = AutoModel.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
        self.boundary_id = add_boundary_token(self.tokenizer, backbone) if cfg.rm.kind == "sentence" else None
        torch.manual_seed(cfg.seed)  # the same fresh heads on every worker
        model = build_reward_model(cfg.rm.kind, backbone, self.boundary_id, cfg.rm.attn_dim, cfg.rm.freeze_layers)
        t = cfg.train
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)  # no FusedAdam JIT build
        ds_config = deepspeed_config(LearnerConfig(zero_stage=t.zero_stage, dtype=t.dtype,
                                                   max_grad_norm=t.max_grad_norm, micro_batch_size=t.batch_size))
        ds_config["gradient_accumulation_steps"] = t.grad_accum
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.device, self.pad_id = self.engine.device, self.tokenizer.pad_token_id
        # bf16: float32 weights, autocast runs the backbone and the heads in bf16 (dtype auto: resolved on this node)
        precision = precision_record(t.dtype, cfg.model.device, what="compute")
        print(f"[rank {self.rank}] {precision['line']}; weights and optimizer state float32", flush=True)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision["dtype"] == "bfloat16")
        self.start_s = time.perf_counter() - started

    def encode(self, table: pa.Table, rows: list[int]) -> EncodedPairs:
        return encode_pairs(table.take(pa.array(rows, pa.int64())), self.tokenizer, self.cfg.rm.kind,
                            self.boundary_id, self.cfg.rm.splitter, self.max_length)

    def sum_over_workers(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def resume(self, checkpoint) -> tuple[int, int]:
        """(epochs done, optimizer steps done): weights, optimizer and counters from a Ray Train checkpoint."""
        if checkpoint is None:
            return 0, 0
        with checkpoint.as_directory() as directory:
            self.engine.load_checkpoint(os.path.join(directory, "deepspeed"), load_optimizer_states=True)
            with open(os.path.join(directory, TRAIN_STATE)) as fh:
                state = json.load(fh)
        print(f"[rank {self.rank}] resumed from {checkpoint.path}: "
              f"{state['epoch']} epoch(s), {state['step']} steps done")
        return state["epoch"], state["step"]

    def train_epoch(self, train: EncodedPairs, epoch: int, step: int, log: RunLog | None) -> tuple[int, dict]:
        """One pass over this worker's pairs; returns (step, epoch means of the loss and the batch accuracy)."""
        t, engine = self.cfg.train, self.engine
        engine.train()
        steps = epoch_steps(len(train), t.batch_size, t.grad_accum, self.cfg.seed, epoch)
        totals = np.zeros(2)
        for micro_batches in tqdm(steps, desc=f"epoch {epoch + 1}/{t.epochs}", disable=self.rank != 0):
            pairs_in_step = sum(len(rows) for rows in micro_batches)
            metrics = np.zeros(3)  # loss, accuracy, margin: means over the step's pairs
            for i, rows in enumerate(micro_batches):
                engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
                with self.autocast:
                    loss, m = pair_loss(engine, [train.chosen[j] for j in rows], [train.rejected[j] for j in rows],
                                        self.pad_id, self.device)
                weight = len(rows) / pairs_in_step  # the step's loss is the mean over all its pairs
                engine.backward(loss * weight, scale_wrt_gas=False)
                engine.step()  # an optimizer step only at the boundary
                metrics += weight * np.array([m["loss"], m["accuracy"], m["margin"]])
            step += 1
            loss, accuracy, margin = np.array(self.sum_over_workers(metrics.tolist())) / self.world  # worker mean
            totals += [loss, accuracy]
            if log:
                grad_norm = engine.get_global_grad_norm()
                log.write(step, {"train/loss": loss, "train/accuracy": accuracy, "train/margin": margin,
                                 "train/lr": engine.get_lr()[0],
                                 "train/grad_norm": float("nan") if grad_norm is None else float(grad_norm)})
        return step, {"train/epoch_loss": totals[0] / len(steps), "train/epoch_accuracy": totals[1] / len(steps)}

    def score(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, int]:
        """(R chosen, R rejected, sides truncated) for every pair of `table`; rank r scores pairs r, r + world, ...
        Every rank runs the same number of forward passes (ZeRO-3 gathers weights in each): a short share is
        padded with its last pair, whose scores are dropped."""
        n = table.num_rows
        mine = list(range(self.rank, n, self.world))
        encoded = self.encode(table, mine or [0])
        padding = -(-n // self.world) - len(mine)
        self.engine.eval()
        with self.autocast:
            chosen, rejected = score_examples(self.engine, encoded.chosen + encoded.chosen[-1:] * padding,
                                              encoded.rejected + encoded.rejected[-1:] * padding,
                                              self.cfg.train.batch_size, self.pad_id, self.device)
        shares = [None] * self.world
        share = (mine, chosen[:len(mine)], rejected[:len(mine)], encoded.truncated if mine else 0)
        torch.distributed.all_gather_object(shares, share)
        all_chosen, all_rejected = np.zeros(n), np.zeros(n)
        for rows, c, r, _ in shares:
            all_chosen[rows], all_rejected[rows] = c, r
        return all_chosen, all_rejected, sum(s[3] for s in shares)

    def evaluate(self, table: pa.Table) -> dict:
        """{"accuracy": {subset: pairwise accuracy, "overall": ...}, "counts": {subset: pairs}, "truncated_eval"}."""
        if table.num_rows == 0:
            return {"accuracy": {}, "counts": {}, "truncated_eval": 0}
        chosen, rejected, truncated = self.score(table)
        subsets = table["subset"].to_pylist()
        return {"accuracy": accuracy_by_subset(subsets, chosen, rejected),
                "counts": {s: subsets.count(s) for s in sorted(set(subsets))}, "truncated_eval": truncated}

    def save_and_report(self, metrics: dict) -> None:
        """One epoch checkpoint: every rank's DeepSpeed state (weights, optimizer, counters) in deepspeed/, the
        full reward model in reward_model/ (save_reward_model format), train_state.json and config.yaml; Ray
        Train merges the ranks' folders into checkpoints/epoch_NNN and reports rank 0's metrics."""
        import deepspeed

        epoch, module = metrics["epoch"], self.engine.module
        with tempfile.TemporaryDirectory(prefix=f"rm-epoch{epoch}-rank{self.rank}-") as directory:
            self.engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag=f"epoch_{epoch}")  # collective
            with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.train.zero_stage == 3):
                if self.rank == 0:
                    save_reward_model(module, self.tokenizer, os.path.join(directory, "reward_model"), self.cfg.rm)
            if self.rank == 0:
                with open(os.path.join(directory, TRAIN_STATE), "w") as fh:
                    json.dump({"epoch": epoch, "step": metrics["step"], "world_size": self.world}, fh)
                with open(os.path.join(directory, "config.yaml"), "w") as fh:
                    fh.write(to_yaml(self.cfg))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"epoch_{epoch:03d}")

"""Train a reward model (sentence-level, or the response / token baselines) on preference pairs, on Ray Train.

    python -m jobs.train_rm --data ../shared/data/hh_harmless_base_test.jsonl --rm.kind sentence
    ray job submit --working-dir . -- python -m jobs.train_rm --data DATA --train.workers 4 --model.device cuda

The pairs are split into train and held-out (deterministic in --seed). Ray Train's TorchTrainer starts
--train.workers workers; each builds the backbone + reward model (pipeline/sentence_rm.py), wraps it in a DeepSpeed
engine (ZeRO --train.zero_stage, gloo on cpu / nccl on cuda, from --model.device), and trains its own shard of the
train pairs with the Bradley-Terry loss. After every epoch the workers score the held-out pairs and report the
accuracy with a checkpoint (DeepSpeed state + the reward model in save_reward_model format); --resume continues
from the newest one. After the last epoch they also score every --eval_data set; the driver copies the last
checkpoint's reward model to output/final and writes the accuracy table.

Writes under --output: final/ (load_reward_model(output/final)), results.json, results.md, heldout_pairs.jsonl
(the held-out pairs, for other evaluations), tensorboard/, metrics.jsonl, config.yaml, checkpoints/ (Ray Train).
On a multi-node cluster --output must be shared storage (Ray Train keeps its checkpoints there).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
import time
from typing import Literal

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm import tqdm
from transformers import AutoConfig, AutoModel

from actors.cluster import RayConfig, init_ray, worker_env
from actors.learner import BACKENDS, deepspeed_config
from pipeline.config import opt, parse_config, to_dict, to_yaml
from pipeline.data import load_preference_data, split_prompts
from pipeline.evaluation import markdown_table
from pipeline.models import ModelConfig, check_device, load_tokenizer, open_model
from pipeline.policy import LearnerConfig
from pipeline.rm_training import (EncodedPairs, accuracy_by_subset, encode_pairs, epoch_steps, pair_loss,
                                  score_examples, shard_indices)
from pipeline.runlog import RunLog
from pipeline.segment import SPLITTERS
from pipeline.sentence_rm import RewardModelConfig, add_boundary_token, build_reward_model, save_reward_model

KINDS = ("sentence", "response", "token")
RUN_NAME = "checkpoints"  # Ray Train run folder under --output
HELDOUT = "heldout"       # the subset name of the held-out pairs in every table


@dataclasses.dataclass
class TrainConfig:
    lr: float = opt(1e-5, "AdamW learning rate (constant)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    epochs: int = opt(1, "passes over the training pairs")
    batch_size: int = opt(4, "pairs per micro-batch per worker (2 x batch_size sequences per forward pass)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    max_length: int = opt(1024, "tokens per side, markers included: the prompt is cut from the left, then the "
                                "response at the right (counted in results.json); 0 = the model's window")
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage 0..3")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "training and evaluation precision (bf16: DeepSpeed keeps "
                                                           "float32 master weights); --model.dtype is not used here")
    workers: int = opt(2, "Ray Train workers (data-parallel DeepSpeed ranks)")
    cpus_per_worker: float = opt(1, "CPUs per worker (also its torch threads); a GPU each with --model.device cuda")


@dataclasses.dataclass
class RMTrainConfig:
    data: str = opt("", "preference pairs: a .jsonl/.json/.parquet file, an LLMBar folder, or a HF dataset")
    format: Literal["auto", "hh", "llmbar", "pairs", "hf"] = opt("auto", "how to read --data")
    heldout_fraction: float = opt(0.1, "share of the pairs held out for evaluation (split by --seed)")
    max_pairs: int = opt(0, "train on the first N training pairs only (0 = all)")
    eval_data: str = opt("", "extra evaluation sets, comma-separated (e.g. LLMBar .json files); one subset each")
    seed: int = opt(0, "seed of the split, the shards, the batch order and the head initialisation")
    output: str = opt("runs/train_rm", "run folder (see the module docstring)")
    resume: bool = opt(False, "continue from the newest checkpoint in --output")
    keep_checkpoints: int = opt(2, "epoch checkpoints kept (0 = all)")
    model: ModelConfig = opt(factory=ModelConfig)
    rm: RewardModelConfig = opt(factory=RewardModelConfig)
    train: TrainConfig = opt(factory=TrainConfig)
    ray: RayConfig = opt(factory=RayConfig)


# ================================================================ driver: checks, data, the trainer

def check_config(cfg: RMTrainConfig) -> None:
    """Every refusal that needs no data and no model, naming the flag and the fix."""
    t = cfg.train
    problems = [
        (not cfg.data, "--data is required: a preference-pairs file or folder (see --help)."),
        (cfg.rm.kind not in KINDS, f"--rm.kind {cfg.rm.kind!r} is unknown. Fix: one of {', '.join(KINDS)}."),
        (t.zero_stage not in (0, 1, 2, 3), f"--train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}. "
                                           f"Fix: --train.zero_stage 2"),
        (not 0.0 <= cfg.heldout_fraction < 1.0, f"--heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}."),
        (t.epochs < 1, f"--train.epochs must be >= 1, got {t.epochs}."),
        (t.batch_size < 1, f"--train.batch_size must be >= 1, got {t.batch_size}."),
        (t.grad_accum < 1, f"--train.grad_accum must be >= 1, got {t.grad_accum}."),
        (t.workers < 1, f"--train.workers must be >= 1, got {t.workers}."),
        (not t.cpus_per_worker > 0, f"--train.cpus_per_worker must be > 0, got {t.cpus_per_worker}."),
        (not t.lr > 0, f"--train.lr must be > 0, got {t.lr}."),
        (t.max_length < 0, f"--train.max_length must be >= 0 (0 = the model's window), got {t.max_length}."),
        (cfg.max_pairs < 0, f"--max_pairs must be >= 0 (0 = all), got {cfg.max_pairs}."),
        (cfg.rm.attn_dim <= 0 or cfg.rm.attn_dim % 2, f"--rm.attn_dim must be a positive even number, got "
                                                      f"{cfg.rm.attn_dim}. Fix: --rm.attn_dim 128"),
        (cfg.rm.splitter not in SPLITTERS, f"--rm.splitter {cfg.rm.splitter!r} is unknown. "
                                           f"Fix: one of {sorted(SPLITTERS)}."),
        (cfg.rm.freeze_layers < 0, f"--rm.freeze_layers must be >= 0, got {cfg.rm.freeze_layers}."),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(message)


def load_pairs(source: str, fmt: str, flag: str) -> pa.Table:
    """All pairs of one source; skipped pairs are printed, an unreadable or empty source is a clear error."""
    try:
        pairs, skipped = load_preference_data(source, fmt)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag}: {e}")
    for line in skipped:
        print(f"skipped: {line}")
    if pairs.num_rows == 0:
        raise SystemExit(f"{flag} {source!r} holds no usable pairs ({len(skipped)} skipped). "
                         f"Fix: check the file and --format.")
    return pairs


def with_subset(pairs: pa.Table, subset: str) -> pa.Table:
    return pairs.set_column(pairs.schema.get_field_index("subset"), "subset",
                            pa.array([subset] * pairs.num_rows, pa.string()))


def write_pairs_jsonl(pairs: pa.Table, path: str) -> None:
    """A pairs file that load_preference_data reads back (format pairs), e.g. for jobs.eval_rewards."""
    with open(path, "w") as fh:
        for row in pairs.to_pylist():
            fh.write(json.dumps(row) + "\n")


def existing_checkpoints(output: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output, RUN_NAME, "epoch_*", "train_state.json")))


def check_gpus(cfg: RMTrainConfig) -> None:
    """With --model.device cuda, the cluster must list a GPU per worker (checked before any worker starts)."""
    if cfg.model.device != "cuda":
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < cfg.train.workers:
        raise SystemExit(f"--model.device cuda needs {cfg.train.workers} GPUs (one per --train.workers), but the Ray "
                         f"cluster has {gpus:g}. Fix: --model.device cpu (local debug mode), fewer --train.workers, "
                         f"or a cluster with GPU nodes.")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(RMTrainConfig, argv, __doc__)
    check_config(cfg)
    print(to_yaml(cfg))
    output = cfg.output = os.path.abspath(cfg.output)  # workers and Ray Train's storage need an absolute path
    if cfg.resume:
        checkpoints = existing_checkpoints(output)
        if not checkpoints:
            raise SystemExit(f"--resume: no checkpoint under {output}/{RUN_NAME}. Fix: drop --resume or fix --output.")
        with open(checkpoints[-1]) as fh:
            done = json.load(fh)["epoch"]
        if done >= cfg.train.epochs:
            raise SystemExit(f"--resume: the run in {output} already trained {done} epoch(s) and --train.epochs is "
                             f"{cfg.train.epochs}: nothing to do. Fix: raise --train.epochs (its final model is in "
                             f"{output}/final).")
    if not cfg.resume and os.path.isdir(os.path.join(output, RUN_NAME)):
        raise SystemExit(f"{output}/{RUN_NAME} holds checkpoints of an earlier run. Fix: --resume to continue it, "
                         f"another --output, or delete that folder.")

    pairs = load_pairs(cfg.data, cfg.format, "--data")
    train, heldout = split_prompts(pairs, cfg.heldout_fraction, cfg.seed)
    if cfg.max_pairs:
        train = train.slice(0, cfg.max_pairs)
    if train.num_rows < cfg.train.workers:
        raise SystemExit(f"--data {cfg.data!r} leaves {train.num_rows} training pairs for {cfg.train.workers} workers. "
                         f"Fix: more data, a lower --heldout_fraction, or fewer --train.workers.")
    heldout = with_subset(heldout, HELDOUT)
    evals = [load_pairs(path, "auto", "--eval_data") for path in cfg.eval_data.split(",") if path]
    if heldout.num_rows == 0 and not evals:
        raise SystemExit("nothing to evaluate on: no held-out pairs and no --eval_data. "
                         "Fix: --heldout_fraction 0.1, or --eval_data FILE.")

    model_path, _, window = open_model(cfg.model)  # fails here, not in every worker, without a tokenizer
    layers = AutoConfig.from_pretrained(model_path).num_hidden_layers
    if cfg.rm.freeze_layers > layers:
        raise SystemExit(f"--rm.freeze_layers {cfg.rm.freeze_layers} is more than the {layers} "
                         f"layers of {cfg.model.name}. Fix: at most {layers}.")
    max_length = cfg.train.max_length or window

    init_ray(cfg.ray, cfg.model.device)
    check_gpus(cfg)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "config.yaml"), "w") as fh:
        fh.write(to_yaml(cfg))
    write_pairs_jsonl(heldout, os.path.join(output, "heldout_pairs.jsonl"))
    print(f"{pairs.num_rows} pairs: {train.num_rows} train, {heldout.num_rows} held out; "
          f"{sum(t.num_rows for t in evals)} in --eval_data; max_length {max_length}")

    started = time.perf_counter()
    result = fit(cfg, model_path, max_length, train, heldout, pa.concat_tables(evals) if evals else heldout.slice(0, 0))
    return finish(cfg, result, time.perf_counter() - started)


def fit(cfg: RMTrainConfig, model_path: str, max_length: int, train: pa.Table, heldout: pa.Table, evals: pa.Table):
    """Run train_worker on cfg.train.workers Ray Train workers; returns Ray Train's Result."""
    device = cfg.model.device
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "model_path": model_path, "max_length": max_length,
                           "train": ray.put(train), "heldout": ray.put(heldout), "eval": ray.put(evals)},
        torch_config=TorchConfig(backend=BACKENDS[device]),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=device == "cuda",
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=cfg.output,
                             worker_runtime_env={"env_vars": worker_env(cfg.ray, device)},
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None)),
    )
    return trainer.fit()


def finish(cfg: RMTrainConfig, result, fit_s: float) -> dict:
    """output/final from the last checkpoint, results.json and results.md from the workers' final report."""
    final = os.path.join(cfg.output, "final")
    shutil.rmtree(final, ignore_errors=True)
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(os.path.join(directory, "reward_model"), final)
    metrics = result.metrics
    source = f"{cfg.rm.kind} RM"
    report = {"data": cfg.data, "eval_data": cfg.eval_data, "kind": cfg.rm.kind, "model": cfg.model.name,
              "counts": metrics["counts"], "accuracy": {source: metrics["accuracy"]},
              "truncated_sides": {"train": metrics["truncated_train"], "eval": metrics["truncated_eval"]},
              "trained_pairs": metrics["trained_pairs"], "epochs": metrics["epoch"], "steps": metrics["step"],
              "fit_s": fit_s, "worker_start_s": metrics["worker_start_s"], "final": final, "config": to_dict(cfg)}
    with open(os.path.join(cfg.output, "results.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    markdown = markdown_table(report["accuracy"], metrics["counts"])
    with open(os.path.join(cfg.output, "results.md"), "w") as fh:
        fh.write(f"Pairwise accuracy (%) of a {cfg.rm.kind}-level RM on `{cfg.model.name}` trained on "
                 f"{metrics['trained_pairs']} pairs of `{cfg.data}` for {metrics['epoch']} epoch(s); "
                 f"sides longer than {cfg.train.max_length or 'the window'} tokens were cut: "
                 f"{metrics['truncated_train']} training, {metrics['truncated_eval']} evaluation.\n\n"
                 f"{markdown}\n")
    print(markdown)
    print(f"wrote {final} (load_reward_model), {cfg.output}/results.json and results.md; "
          f"tensorboard --logdir {cfg.output}/tensorboard")
    return report


# ================================================================ one Ray Train worker

def train_worker(config: dict) -> None:
    """The Ray Train loop of one worker: resume, train epochs, evaluate, checkpoint and report each epoch."""
    cfg: RMTrainConfig = config["cfg"]
    worker = RMWorker(cfg, config["model_path"], config["max_length"])
    train_table, heldout, evals = ray.get([config["train"], config["heldout"], config["eval"]])
    train = worker.encode(train_table, shard_indices(train_table.num_rows, worker.world, worker.rank, cfg.seed))
    start_epoch, step = worker.resume(ray.train.get_checkpoint())
    log = RunLog(cfg.output, to_yaml(cfg), resume_step=step) if worker.rank == 0 else None
    extras = {"trained_pairs": len(train) * worker.world, "worker_start_s": worker.start_s,
              "truncated_train": int(worker.sum_over_workers([train.truncated])[0])}
    for epoch in range(start_epoch, cfg.train.epochs):
        step, train_metrics = worker.train_epoch(train, epoch, step, log)
        # held-out pairs every epoch; after the last epoch also every --eval_data set (the weights that become
        # output/final), reported with the last checkpoint: Ray Train hands the driver a checkpoint's metrics
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

    def __init__(self, cfg: RMTrainConfig, model_path: str, max_length: int):
        started = time.perf_counter()
        os.environ.setdefault("DS_ACCELERATOR", cfg.model.device)  # read when deepspeed is first imported
        import deepspeed

        check_device(cfg.model.device)
        self.cfg, self.max_length = cfg, max_length
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        deepspeed.init_distributed(dist_backend=BACKENDS[cfg.model.device])  # adopts Ray Train's process group

        # backbone (+ the <END> marker for the sentence RM) -> reward model -> DeepSpeed engine
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
        # bf16: the heads read float32 hidden states; autocast runs them (and the backbone) in bf16
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.dtype == "bfloat16")
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
            with open(os.path.join(directory, "train_state.json")) as fh:
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
                with open(os.path.join(directory, "train_state.json"), "w") as fh:
                    json.dump({"epoch": epoch, "step": metrics["step"], "world_size": self.world}, fh)
                with open(os.path.join(directory, "config.yaml"), "w") as fh:
                    fh.write(to_yaml(self.cfg))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"epoch_{epoch:03d}")


if __name__ == "__main__":
    main()

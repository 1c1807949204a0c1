"""Train a reward model (sentence-level, or the response / token baselines) on preference pairs, on Ray Train.

    python -m jobs.train_rm --data ../shared/data/hh_harmless_base_test.jsonl --rm.kind sentence
    ray job submit --working-dir . -- python -m jobs.train_rm --data DATA --model.device cuda --storage s3://BUCKET/rm

The pairs are read on the driver (--data and --eval_data are paths of the driver's machine) and shipped to the
workers through the object store, split into train and held-out (deterministic in --seed). Ray Train's
TorchTrainer starts --train.workers workers (actors/rm_trainer.py); each resolves the model on its own node,
builds the backbone + reward model (pipeline/sentence_rm.py), wraps it in a DeepSpeed engine (ZeRO
--train.zero_stage, gloo on cpu / nccl on cuda, from --model.device), and trains its own shard of the train pairs
with the Bradley-Terry loss. After every epoch the workers score the held-out pairs and report the accuracy with
a checkpoint (DeepSpeed state + the reward model in save_reward_model format); --resume continues from the newest
one. After the last epoch they also score every --eval_data set; the driver copies the last checkpoint's reward
model to final/ and writes the accuracy table.

Writes to --storage: final/ (load_reward_model; jobs.rlhf --sentence_rm STORAGE/final), results.json, results.md,
heldout_pairs.jsonl (the held-out pairs, for other evaluations), tensorboard/, metrics.jsonl, config.yaml,
checkpoints/ (Ray Train's). A local folder in local mode; on a cluster an absolute path that every node mounts,
or s3:// / gs:// (pipeline/storage.py): the workers write their checkpoints there and --resume reads them there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Literal

import pyarrow as pa
import ray
from ray.util.placement_group import remove_placement_group
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from transformers import AutoConfig

from actors.cluster import RayConfig, check_driver_device, init_ray, is_local, worker_env
from actors.learner import BACKENDS
from actors.placement import PlacementConfig, bundle, reserve
from actors.rm_trainer import TRAIN_STATE, train_worker
from pipeline.config import opt, parse_config, to_dict, to_yaml
from pipeline.data import load_preference_data, split_prompts
from pipeline.evaluation import markdown_table
from pipeline.models import ModelConfig, open_model
from pipeline.precision import DType
from pipeline.rm_training import HELDOUT
from pipeline.segment import SPLITTERS
from pipeline.sentence_rm import RewardModelConfig
from pipeline.storage import Storage, check_location

KINDS = ("sentence", "response", "token")
RUN_NAME = "checkpoints"  # Ray Train's run folder in --storage: its epoch checkpoints


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
    dtype: DType = opt("auto", "compute precision of training and evaluation; weights and AdamW state stay float32, "
                               "bfloat16 runs under autocast (auto: bf16 on a GPU or a CPU with avx512_bf16/amx_bf16, "
                               "else float32; resolved on each worker's node); --model.dtype is not used here")
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
    storage: str = opt("runs/train_rm", "the run's folder: final/, results.json, checkpoints/ (every worker writes "
                                        "its shard here) ... (see the module docstring). A local folder in local "
                                        "mode; on a cluster an absolute path every node mounts, or s3:// / gs://")
    resume: bool = opt(False, "continue from the newest checkpoint in --storage")
    keep_checkpoints: int = opt(2, "epoch checkpoints kept (0 = all)")
    model: ModelConfig = opt(factory=ModelConfig)
    rm: RewardModelConfig = opt(factory=RewardModelConfig)
    train: TrainConfig = opt(factory=TrainConfig)
    placement: PlacementConfig = opt(factory=PlacementConfig)
    ray: RayConfig = opt(factory=RayConfig)


# ================================================================ driver: checks, data, the trainer

def check_config(cfg: RMTrainConfig) -> None:
    """Every refusal that needs no data and no model, naming the flag and the fix. In local mode this machine is
    the cluster, so a cuda request without a GPU stops here; on a cluster Ray Train waits for GPU nodes instead."""
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
    try:
        check_location(cfg.storage, "--storage", cluster=not is_local(cfg.ray))
    except ValueError as e:
        raise SystemExit(str(e))
    check_driver_device(cfg.ray, cfg.model.device)


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


def pairs_jsonl(pairs: pa.Table) -> str:
    """A pairs file that load_preference_data reads back (format pairs), e.g. for jobs.eval_rewards."""
    return "".join(json.dumps(row) + "\n" for row in pairs.to_pylist())


def epochs_done(storage: Storage) -> int | None:
    """Epochs trained by the newest epoch checkpoint in the run's storage; None when it holds none."""
    found = {int(name[len("epoch_"):]): f"{RUN_NAME}/{name}/{TRAIN_STATE}" for name in storage.listdir(RUN_NAME)
             if re.fullmatch(r"epoch_\d+", name) and storage.exists(f"{RUN_NAME}/{name}/{TRAIN_STATE}")}
    if not found:
        return None
    return json.loads(storage.read_text(found[max(found)]))["epoch"]


def check_run_folder(cfg: RMTrainConfig, storage: Storage) -> None:
    """--resume needs a checkpoint with epochs left to train; a fresh run needs a folder without one."""
    where = storage.location_of(RUN_NAME)
    if cfg.resume:
        done = epochs_done(storage)
        if done is None:
            raise SystemExit(f"--resume: no checkpoint under {where}. Fix: drop --resume or fix --storage.")
        if done >= cfg.train.epochs:
            raise SystemExit(f"--resume: the run in {storage.location} already trained {done} epoch(s) and "
                             f"--train.epochs is {cfg.train.epochs}: nothing to do. Fix: raise --train.epochs (its "
                             f"final model is in {storage.location_of('final')}).")
    elif storage.exists(RUN_NAME):
        raise SystemExit(f"{where} holds checkpoints of an earlier run. Fix: --resume to continue it, "
                         f"another --storage, or delete that folder.")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(RMTrainConfig, argv, __doc__)
    check_config(cfg)
    print(to_yaml(cfg))
    storage = Storage(cfg.storage)
    cfg.storage = storage.location  # a local folder made absolute: the workers and Ray Train get the same one
    check_run_folder(cfg, storage)

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

    # the driver opens the model for its checks only; every worker resolves it again on its own node
    model_path, _, window = open_model(cfg.model)
    layers = AutoConfig.from_pretrained(model_path).num_hidden_layers
    if cfg.rm.freeze_layers > layers:
        raise SystemExit(f"--rm.freeze_layers {cfg.rm.freeze_layers} is more than the {layers} "
                         f"layers of {cfg.model.name}. Fix: at most {layers}.")
    max_length = cfg.train.max_length or window

    init_ray(cfg.ray, cfg.model.device)
    storage.write_text("config.yaml", to_yaml(cfg))
    storage.write_text("heldout_pairs.jsonl", pairs_jsonl(heldout))
    print(f"{pairs.num_rows} pairs: {train.num_rows} train, {heldout.num_rows} held out; "
          f"{sum(t.num_rows for t in evals)} in --eval_data; max_length {max_length}")

    started = time.perf_counter()
    result = fit(cfg, storage, max_length, train, heldout, pa.concat_tables(evals) if evals else heldout.slice(0, 0))
    return finish(cfg, storage, result, time.perf_counter() - started)


def fit(cfg: RMTrainConfig, storage: Storage, max_length: int, train: pa.Table, heldout: pa.Table,
        evals: pa.Table):
    """Run train_worker on cfg.train.workers Ray Train workers, checkpoints in the run's storage; returns Ray
    Train's Result. Ray Train itself would wait for room without end: the workers' room is reserved (and an
    autoscaler asked for it) first, for at most --placement.timeout_s."""
    device, t = cfg.model.device, cfg.train
    try:
        remove_placement_group(reserve("reward-model trainers", [bundle(t.cpus_per_worker, 1 if device == "cuda" else 0)]
                                       * t.workers, "PACK", cfg.placement))  # as Ray Train places them
    except RuntimeError as e:
        raise SystemExit(f"could not place the Ray Train workers: {e}")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "max_length": max_length,
                           "train": ray.put(train), "heldout": ray.put(heldout), "eval": ray.put(evals)},
        torch_config=TorchConfig(backend=BACKENDS[device]),
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=device == "cuda",
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage.root, storage_filesystem=storage.fs,
                             worker_runtime_env={"env_vars": worker_env(cfg.ray, device)},
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None)),
    )
    return trainer.fit()


def finish(cfg: RMTrainConfig, storage: Storage, result, fit_s: float) -> dict:
    """final/ from the last checkpoint, results.json and results.md from the workers' final report."""
    storage.delete_dir("final")
    with result.checkpoint.as_directory() as directory:  # a download when the checkpoint is on object storage
        storage.upload(os.path.join(directory, "reward_model"), "final")
    final = storage.location_of("final")
    metrics = result.metrics
    source = f"{cfg.rm.kind} RM"
    report = {"data": cfg.data, "eval_data": cfg.eval_data, "kind": cfg.rm.kind, "model": cfg.model.name,
              "counts": metrics["counts"], "accuracy": {source: metrics["accuracy"]},
              "truncated_sides": {"train": metrics["truncated_train"], "eval": metrics["truncated_eval"]},
              "trained_pairs": metrics["trained_pairs"], "epochs": metrics["epoch"], "steps": metrics["step"],
              "fit_s": fit_s, "worker_start_s": metrics["worker_start_s"], "final": final, "config": to_dict(cfg)}
    storage.write_text("results.json", json.dumps(report, indent=2))
    markdown = markdown_table(report["accuracy"], metrics["counts"])
    storage.write_text("results.md",
                       f"Pairwise accuracy (%) of a {cfg.rm.kind}-level RM on `{cfg.model.name}` trained on "
                       f"{metrics['trained_pairs']} pairs of `{cfg.data}` for {metrics['epoch']} epoch(s); "
                       f"sides longer than {cfg.train.max_length or 'the window'} tokens were cut: "
                       f"{metrics['truncated_train']} training, {metrics['truncated_eval']} evaluation.\n\n"
                       f"{markdown}\n")
    print(markdown)
    print(f"wrote {final} (load_reward_model, or jobs.rlhf --sentence_rm), results.json and results.md in "
          f"{storage.location}; tensorboard --logdir {storage.location_of('tensorboard')}")
    return report


if __name__ == "__main__":
    main()

"""Weight sync, old path vs new: seconds and peak extra memory of one learner -> engine sync.

    .venv/bin/python -m bench.weight_sync                  # the bundled model and a random ~1B one; ~10 min

The real workers (actors/groups.py: RLWorkers, one learner rank, one vLLM engine, local Ray), synced
--repeats times with --sync.mode object_store (rank 0's full state dict through Ray's object store) and with
--sync.mode broadcast (buckets over a gloo group). While a sync runs, this script samples the resident memory of
the learner's and the engine's processes every 5 ms: peak extra = the highest sample minus the one before the sync.
The ~1B model has SmolLM2-135M's architecture, widened and deepened (hidden 2048, 16 layers, MLP 8192: ~1.2B
parameters), randomly initialised and saved in bf16 at bench time; the learner uses ZeRO stage 0 so that its
memory is the model's, not DeepSpeed's optimizer copies.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import ray

from bench.machine import machine_line

LARGE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 32}


def build_large_model(folder: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models import load_tokenizer, resolve_model

    small = resolve_model("smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(small)
    for key, value in LARGE.items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer(small).save_pretrained(folder)
    print(f"random model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {folder}", flush=True)
    return folder


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra(pids: list[int], action) -> tuple[float, list[int], str]:
    """(seconds of action(), each pid's highest RSS during it minus its RSS before, the error if it failed: e.g.
    Ray's memory monitor killing an actor)."""
    before = [rss_bytes(pid) for pid in pids]
    peaks, done = list(before), threading.Event()

    def sample():
        while not done.is_set():
            for i, pid in enumerate(pids):
                try:
                    peaks[i] = max(peaks[i], rss_bytes(pid))
                except OSError:  # the process is gone
                    pass
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started, error = time.perf_counter(), ""
    try:
        action()
    except ray.exceptions.RayError as e:
        error = str(e).splitlines()[0][:200]
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return seconds, [peak - start for peak, start in zip(peaks, before)], error


def config(model: str, args):
    from jobs.rlhf import RLConfig
    from pipeline.config import parse_config

    return parse_config(RLConfig, ["--config", "configs/local.yaml", "--model.name", model, "--learner.ranks", "1",
                                   "--learner.zero_stage", "0", "--learner.cpus_per_rank", "1", "--sync.bucket_mb",
                                   str(args.bucket_mb)])


def measure(model: str, args) -> dict[str, dict]:
    from actors.groups import RLWorkers

    cfg = config(model, args)
    workers = RLWorkers(cfg)
    try:
        pids = [ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
                for actor in (workers.learner.actors[0], workers.engines[0])]
        out = {}
        for mode in args.modes.split(","):  # the new path first: the old one may not survive a large model
            cfg.sync.mode = mode
            runs = []
            for _ in range(args.repeats + 1):  # the first warms up
                runs.append(peak_extra(pids, workers.sync_weights))
                if runs[-1][2]:
                    break
            error = runs[-1][2]
            runs = runs[1:] if len(runs) > 1 and not error else runs
            out[mode] = {"seconds": statistics.median(r[0] for r in runs), "error": error,
                         "learner_mb": max(r[1][0] for r in runs) / 2 ** 20, "engine_mb": max(r[1][1] for r in runs) / 2 ** 20}
            print(f"  {mode:12s} {out[mode]['seconds']:6.2f} s  peak extra: learner {out[mode]['learner_mb']:7.0f} MiB, "
                  f"engine {out[mode]['engine_mb']:7.0f} MiB {'FAILED: ' + error if error else ''}", flush=True)
            if error:
                break
        return out
    finally:
        workers.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket_mb", type=float, default=512)
    ap.add_argument("--models", default="bundled,large")
    ap.add_argument("--modes", default="broadcast,object_store")
    args = ap.parse_args()
    print(machine_line(), f"bucket {args.bucket_mb:g} MiB", flush=True)
    from actors.cluster import init_ray

    init_ray(config("smollm2-135m-instruct", args).ray)  # local mode, with the job's worker environment
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            model = "smollm2-135m-instruct" if name == "bundled" else build_large_model(folder)
            print(f"{name}:", flush=True)
            result = measure(model, args)
            if len(result) < 2 or result["object_store"]["error"]:
                continue
            old, new = result["object_store"], result["broadcast"]
            print(f"  broadcast vs object_store: {old['seconds'] / new['seconds']:.2f}x faster; engine peak extra "
                  f"{new['engine_mb'] / args.bucket_mb:.2f}x the bucket (object store: "
                  f"{old['engine_mb'] / args.bucket_mb:.2f}x)", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()

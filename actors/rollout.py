"""vLLM rollout engines as Ray actors: sample responses with their log-probs, take new weights, probe parity.

`RolloutEngine` is a plain class (tests run it in-process); `RolloutActor` is the same class under ray.remote.
The vLLM engine runs inside the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, from worker_env): weight
sync hands it tensors in memory, which a multiprocess engine would lose in serialisation. Each engine resolves
the model on its own node (a bundled model is converted there, once) and, on CPU, binds its OpenMP threads to
cores of its own node. What the engine's outputs mean (log-probs mode, EOS, tied embeddings) is decided and
documented in pipeline/rollout.py.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util.placement_group import placement_group

from actors.cluster import RayConfig
from actors.placement import PlacementConfig, bundle, gpus_for, in_bundle, reserve
from pipeline.arrow import CONTEXT_COLUMN, arrow_to_contexts, ragged_to_numpy
from pipeline.models import check_device, resolve_model
from pipeline.precision import precision_record
from pipeline.rollout import (LOGPROBS_MODE, RolloutConfig, outputs_to_rollout_table, prompt_logprobs_to_numpy,
                              sampling_params_kwargs, tied_head_stream, weights_for_sync)
from pipeline.weight_sync import Bucket, SyncGroup, receive_buckets


class RolloutEngine:
    def __init__(self, model: str, dtype: str, device: str, cfg: RolloutConfig, engine_index: int = 0,
                 cache_dir: str = "~/.cache/endorl", cpu_threads: str = ""):
        """model: a folder, HF id or bundled name, resolved on this node. dtype: auto, float32 or bfloat16 (auto
        resolved on this node, pipeline/precision.py). cpu_threads: VLLM_CPU_OMP_THREADS_BIND for this engine (CPU
        only); empty = a block of cfg.cpus_per_engine cores of this node (cpu_threads_bind)."""
        check_device(device)  # a cuda request without a GPU fails here, before vLLM picks a platform
        if device == "cpu":  # read by vLLM when the engine starts, in this process
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads or cpu_threads_bind(cfg, engine_index)
        model_path = resolve_model(model, cache_dir)
        from vllm import LLM, SamplingParams  # lazy: the driver imports this module without loading vLLM
        from vllm.inputs import TokensPrompt

        self.cfg, self.device, self.sync_group = cfg, device, None
        self.precision_record = precision_record(dtype, device)  # vLLM's own "auto" is the checkpoint's dtype
        self.make_prompt, self.make_sampling = TokensPrompt, SamplingParams
        self.llm = LLM(model=model_path, dtype=self.precision_record["dtype"], seed=cfg.seed + engine_index, enforce_eager=cfg.enforce_eager,
                       max_model_len=cfg.max_model_len, gpu_memory_utilization=cfg.gpu_memory_utilization,
                       logprobs_mode=LOGPROBS_MODE)
        self.sampling = SamplingParams(**sampling_params_kwargs(cfg))
        # prompt_logprobs are computed from raw logits (temperature 1) whatever the logprobs mode
        self.scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_text_config, "tie_word_embeddings", False))

    def precision(self) -> dict[str, str]:
        """The dtype this engine resolved and runs in (pipeline/precision.py: precision_record)."""
        return self.precision_record

    def generate(self, prompts: pa.Table, n_samples: int | None = None, seed: int | None = None,
                 seeds: list[list[int]] | None = None) -> pa.Table:
        """Rows with prompt_id (string) and prompt_ids (list<int32>) -> ROLLOUT_SCHEMA, n_samples rows per prompt.

        With `seeds` (one list of n_samples seeds per prompt, pipeline.seeds.prompt_seeds), every sample is its own
        n=1 request with its own seed: a sample is then a function of the weights and its seed alone, whatever the
        other prompts of the shard. With `seed`, prompt i is sampled (n at once) with seed + i.
        """
        prompt_ids = [ids.tolist() for ids in ragged_to_numpy(prompts["prompt_ids"])]
        prompt_id_list = prompts["prompt_id"].to_pylist()
        bad = [pid for pid, ids in zip(prompt_id_list, prompt_ids) if not 1 <= len(ids) <= self.cfg.max_prompt_tokens]
        if bad:
            raise ValueError(f"prompts {bad[:5]} are empty or longer than rollout.max_prompt_tokens="
                             f"{self.cfg.max_prompt_tokens}. Fix: raise --rollout.max_prompt_tokens or filter them")
        # the reward forms pmi and contrastive: each prompt's extra contexts go with its samples to the scorer
        contexts = arrow_to_contexts(prompts[CONTEXT_COLUMN]) if CONTEXT_COLUMN in prompts.column_names else None
        if seeds is not None:
            return self.generate_per_sample(prompt_ids, prompt_id_list, seeds, contexts)
        sampling = self.sampling if n_samples is None and seed is None else [
            self.make_sampling(**sampling_params_kwargs(self.cfg, n_samples, None if seed is None else seed + i))
            for i in range(len(prompt_ids))]
        outputs = self.llm.generate([self.make_prompt(prompt_token_ids=ids) for ids in prompt_ids], sampling,
                                    use_tqdm=False)
        return outputs_to_rollout_table(prompt_ids, prompt_id_list, outputs, self.eos_token_id, contexts)

    def generate_per_sample(self, prompt_ids: list, prompt_id_list: list[str], seeds: list[list[int]],
                            contexts: list | None = None) -> pa.Table:
        """One n=1 request per (prompt, sample) with its own seed; rows prompt by prompt, samples in order."""
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"got {len(seeds)} seed lists for {len(prompt_ids)} prompts; pass one list per prompt")
        flat = [(ids, pid, s, p) for p, (ids, pid, per_prompt) in enumerate(zip(prompt_ids, prompt_id_list, seeds))
                for s in per_prompt]
        sampling = [self.make_sampling(**sampling_params_kwargs(self.cfg, 1, s)) for _, _, s, _ in flat]
        outputs = self.llm.generate([self.make_prompt(prompt_token_ids=ids) for ids, _, _, _ in flat], sampling,
                                    use_tqdm=False)
        return outputs_to_rollout_table([f[0] for f in flat], [f[1] for f in flat], outputs, self.eos_token_id,
                                        None if contexts is None else [contexts[f[3]] for f in flat])

    def load_weights(self, state: dict[str, torch.Tensor]) -> float:
        """Copy a full Hugging Face-named state dict into the running engine, in memory; returns seconds taken."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights_for_sync(state, self.tied)})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        return time.perf_counter() - start

    def join_sync_group(self, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        """Become rank `rank` of the weight-broadcast group hosted by learner rank 0 (pipeline/weight_sync.py)."""
        self.sync_group = SyncGroup(address, port, rank, world_size, self.device, timeout_s)

    def receive_weights(self, plan: list[Bucket], dtype: str) -> float:
        """Take the policy bucket by bucket from the broadcast group, straight into the engine; returns seconds."""
        start = time.perf_counter()
        stream = tied_head_stream(receive_buckets(self.sync_group, plan, dtype), self.tied)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def token_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[np.ndarray]:
        """log pi(response token | prefix) at temperature 1 under the engine's CURRENT weights (parity probe)."""
        sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        outputs = self.llm.generate([self.make_prompt(prompt_token_ids=s) for s in sequences], self.scoring,
                                    use_tqdm=False)
        return [prompt_logprobs_to_numpy(out.prompt_logprobs, seq, start=len(p))
                for out, seq, p in zip(outputs, sequences, prompt_ids)]


RolloutActor = ray.remote(RolloutEngine)


def cpu_threads_bind(cfg: RolloutConfig, engine_index: int) -> str:
    """Engine `engine_index`'s block of cfg.cpus_per_engine cores of the node this runs on, so engines on one node
    never share a core (more engines than cores: they share, round robin)."""
    cores = sorted(os.sched_getaffinity(0))  # the CPU ids this node lets us use
    width = min(len(cores), max(1, int(cfg.cpus_per_engine)))
    first = (engine_index * width) % len(cores)
    first = first if first + width <= len(cores) else 0
    return ",".join(str(core) for core in cores[first:first + width])


def engine_request(device: str, cfg: RolloutConfig) -> dict[str, float]:
    """One engine's resources (a placement-group bundle)."""
    return bundle(cfg.cpus_per_engine, gpus_for(device, cfg.gpus_per_engine), cfg.resources)


def start_engine(model: str, dtype: str, device: str, cfg: RolloutConfig, ray_cfg: RayConfig, slot: tuple, index: int,
                 cache_dir: str = "~/.cache/endorl"):
    """Engine `index` (its seed and cores) in `slot` = (placement group, bundle index): at the start, again for a
    replacement (same slot, same index), or for an elastic engine added later."""
    request = engine_request(device, cfg)
    parts = ray_cfg.vllm_cpu_threads.split("|") if ray_cfg.vllm_cpu_threads else [""]
    return (RolloutActor.options(num_cpus=request["CPU"], num_gpus=request.get("GPU", 0),
                                 resources={k: v for k, v in request.items() if k not in ("CPU", "GPU")},
                                 scheduling_strategy=in_bundle(*slot))
            .remote(model, dtype, device, cfg, index, cache_dir, parts[index % len(parts)]))


def reserve_engine_slots(device: str, cfg: RolloutConfig, placement: PlacementConfig) -> list[tuple]:
    """(placement group, bundle index) of each of the cfg.min_engines engines to start with, ready. Fixed engines
    share one SPREAD group. Elastic ones have a group each (Ray cannot grow or shrink a group, and an engine must be
    dropped or added alone), so Ray's default placement decides their nodes, not SPREAD."""
    if not cfg.elastic:
        group = reserve("rollout engines", [engine_request(device, cfg)] * cfg.min_engines, "SPREAD", placement)
        return [(group, i) for i in range(cfg.min_engines)]
    return [(reserve("rollout engine", [engine_request(device, cfg)], "PACK", placement), 0)
            for _ in range(cfg.min_engines)]


def request_engine_slot(device: str, cfg: RolloutConfig):
    """A placement group for one more elastic engine, not waited for: while it is pending it is demand that an
    autoscaler sees and adds a node for."""
    return placement_group([engine_request(device, cfg)], name="endorl-rollout-engine")


def start_rollout_engines(model: str, dtype: str, device: str, cfg: RolloutConfig, ray_cfg: RayConfig,
                          placement: PlacementConfig, cache_dir: str = "~/.cache/endorl") -> tuple[list, object]:
    """cfg.min_engines RolloutActors spread over the nodes, each with its own seed; returns (actors, placement
    group). On CPU, --ray.vllm_cpu_threads "0-1|2-3" gives engine i the i-th part; empty = per-node blocks of cores."""
    group = reserve("rollout engines", [engine_request(device, cfg)] * cfg.min_engines, "SPREAD", placement)
    return [start_engine(model, dtype, device, cfg, ray_cfg, (group, i), i, cache_dir)
            for i in range(cfg.min_engines)], group

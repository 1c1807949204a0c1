"""Joining or starting Ray, with the environment every worker of this project needs."""
from __future__ import annotations

import dataclasses
import os

import ray

from pipeline.config import opt


@dataclasses.dataclass
class RayConfig:
    address: str = opt("", "Ray address; empty = the cluster of `ray job submit`, else an embedded local Ray")
    num_cpus: int = opt(0, "CPUs of an embedded local Ray (0 = all of this machine)")
    vllm_cpu_kvcache_gib: int = opt(2, "VLLM_CPU_KVCACHE_SPACE for CPU vLLM engines, GiB")
    vllm_cpu_threads: str = opt("", "VLLM_CPU_OMP_THREADS_BIND for CPU vLLM engines (empty = 0-(num_cpus-1))")


def worker_env(cfg: RayConfig) -> dict[str, str]:
    """Environment variables set in every actor (passed explicitly, never read deep inside the code)."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.vllm_cpu_kvcache_gib),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",        # the default reserves a core: a third of the speed on 2 cores
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",      # in-process engine: weight sync needs the tensors in-process
        "DS_ACCELERATOR": "cpu",
    }
    if cfg.vllm_cpu_threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.vllm_cpu_threads
    for name in ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR"):  # pass the user's choices through
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def init_ray(cfg: RayConfig, device: str = "cpu") -> None:
    """Connect to the cluster (ray job submit sets RAY_ADDRESS) or start an embedded one for local mode."""
    if ray.is_initialized():
        return
    env = worker_env(cfg)
    if device != "cpu":
        env.pop("DS_ACCELERATOR")
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if cfg.address:
        kwargs["address"] = cfg.address
    elif "RAY_ADDRESS" not in os.environ:
        kwargs.update(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False)
    ray.init(**kwargs)

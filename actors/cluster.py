"""Joining or starting Ray, with the environment every worker of this project needs."""
from __future__ import annotations

import dataclasses
import os

import ray

from pipeline.config import opt


@dataclasses.dataclass
class RayConfig:
    address: str = opt("", "Ray address; empty = the cluster of `ray job submit` (RAY_ADDRESS) or else an embedded "
                           "local Ray; 'local' = always embedded")
    num_cpus: int = opt(0, "logical CPUs of an embedded local Ray (0 = this machine's cores); the RL phases run one "
                           "after another, so local mode may declare more than the cores it has")
    dashboard: bool = opt(True, "start Ray's dashboard with an embedded local Ray (http://127.0.0.1:8265); Ray "
                                "Train's placement-group cleaner needs its state API, and warns every few s without it")
    vllm_cpu_kvcache_gib: int = opt(2, "VLLM_CPU_KVCACHE_SPACE for CPU vLLM engines, GiB")
    vllm_cpu_threads: str = opt("", "VLLM_CPU_OMP_THREADS_BIND for CPU vLLM engines, '|' between engines (e.g. "
                                    "0-1|2-3); empty = each engine its own block of rollout.cpus_per_engine cores")


def worker_env(cfg: RayConfig, device: str = "cpu") -> dict[str, str]:
    """Environment variables set in every actor (passed explicitly, never read deep inside the code)."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.vllm_cpu_kvcache_gib),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",        # the default reserves a core: a third of the speed on 2 cores
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",      # in-process engine: weight sync needs the tensors in-process
        # DeepSpeed JIT-builds its CPU shared-memory comm op (~20 s) on first use; cache the build across runs
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                               os.path.expanduser("~/.cache/endorl/torch_extensions")),
    }
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # on GPU, DeepSpeed detects CUDA itself
    if cfg.vllm_cpu_threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.vllm_cpu_threads
    for name in ("HF_HUB_OFFLINE", "HF_HOME"):  # pass the user's choices through
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def init_ray(cfg: RayConfig, device: str = "cpu") -> None:
    """Connect to the cluster (ray job submit sets RAY_ADDRESS) or start an embedded one for local mode."""
    if ray.is_initialized():
        return
    kwargs = {"runtime_env": {"env_vars": worker_env(cfg, device)}, "log_to_driver": True}
    if cfg.address:
        kwargs["address"] = cfg.address  # "local" always starts an embedded Ray, even under RAY_ADDRESS
    if cfg.address == "local" or (not cfg.address and "RAY_ADDRESS" not in os.environ):
        kwargs.update(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=cfg.dashboard)
    ray.init(**kwargs)

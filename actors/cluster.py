"""Joining or starting Ray, with the environment every worker of this project needs.

Two modes:
  - local (`--local`, or no cluster address anywhere): an embedded single-node Ray that this process starts and
    owns, whatever other Ray runs on the machine (`ray.init(address="local")` never joins one).
  - cluster (`ray job submit`, which sets RAY_ADDRESS, or `--ray.address`): join it. Nothing about this machine
    is handed to the workers: no path of the driver's disk, no core binding; each actor prepares its own node.
"""
from __future__ import annotations

import dataclasses
import json
import os

import ray

from pipeline.config import opt

PACKAGES = ("pipeline", "actors", "jobs")  # the project's code, shipped to every node when no working_dir does it


@dataclasses.dataclass
class RayConfig:
    address: str = opt("", "Ray address; empty = the cluster of `ray job submit` (RAY_ADDRESS) or else an embedded "
                           "local Ray; 'local' = always embedded")
    num_cpus: int = opt(0, "logical CPUs of an embedded local Ray (0 = this machine's cores); the RL phases run one "
                           "after another, so local mode may declare more than the cores it has")
    dashboard: bool = opt(True, "start Ray's dashboard with an embedded local Ray (http://127.0.0.1:8265); Ray "
                                "Train's placement-group cleaner needs its state API, and warns every few s without it")
    vllm_cpu_kvcache_gib: int = opt(2, "VLLM_CPU_KVCACHE_SPACE for CPU vLLM engines, GiB")
    log_to_driver: bool = opt(True, "stream every actor's stdout/stderr to the driver's terminal (Ray's log_to_driver); "
                                    "jobs.rlhf turns it off and saves each actor's output to STORAGE/logs/ instead")
    vllm_cpu_threads: str = opt("", "VLLM_CPU_OMP_THREADS_BIND for CPU vLLM engines, '|' between engines (e.g. "
                                    "0-1|2-3); empty = each engine binds its own block of rollout.cpus_per_engine "
                                    "cores of the node it runs on")


def is_local(cfg: RayConfig, environ: dict | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return cfg.address == "local" or (not cfg.address and "RAY_ADDRESS" not in environ)


def check_driver_device(cfg: RayConfig, device: str, flag: str = "--model.device") -> None:
    """In local mode this machine is the cluster: a cuda request without a GPU stops before Ray starts. On a
    cluster the driver's own devices say nothing (it runs on a CPU head node); the placement of the actors waits
    for GPU nodes instead (actors/placement.py)."""
    from pipeline.models import check_device

    if is_local(cfg):
        try:
            check_device(device)
        except RuntimeError as e:
            raise SystemExit(f"{flag}: {e}") from None


def worker_env(cfg: RayConfig, device: str = "cpu") -> dict[str, str]:
    """Environment variables set in every actor: values only, never a path of the driver's node."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",      # in-process engine: weight sync needs the tensors in-process
    }
    if device == "cpu":  # on GPU, DeepSpeed and vLLM detect CUDA themselves
        env.update({
            "DS_ACCELERATOR": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(cfg.vllm_cpu_kvcache_gib),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",    # the default reserves a core: a third of the speed on 2 cores
        })
    if "HF_HUB_OFFLINE" in os.environ:  # the user's choice, a value; HF_HOME is a path and stays the node's own
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    return env


# Every worker's setup hook: torch imported whole before the worker runs anything. Ray loads an actor's class and
# unpickles its arguments in different threads; two threads importing torch at once can see it half-initialised
# ("partially initialized module 'torch' has no attribute 'library'"), which killed a scorer at start on the fake
# autoscaling cluster, whose new nodes start several workers at once on 2 cores. A lambda, so Ray ships it by value:
# the hook runs before a local-mode worker can import this project's packages.
IMPORT_TORCH_FIRST = lambda: __import__("torch")  # noqa: E731


def job_runtime_env(environ: dict | None = None) -> dict:
    """The runtime env `ray job submit` gave this driver ({} when it was not submitted as a job)."""
    environ = os.environ if environ is None else environ
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    config = json.loads(environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
    return config.get("runtime_env") or {}


def cluster_runtime_env(cfg: RayConfig, device: str, job_env: dict) -> dict:
    """What this driver adds to the job's runtime env. Ray merges the two and refuses a key set in both, so the
    job's own env_vars win; a driver not started by `ray job submit --working-dir` ships the project's code."""
    env_vars = {k: v for k, v in worker_env(cfg, device).items() if k not in (job_env.get("env_vars") or {})}
    runtime_env = {"env_vars": env_vars}
    if not job_env.get("worker_process_setup_hook"):
        runtime_env["worker_process_setup_hook"] = IMPORT_TORCH_FIRST
    if not job_env.get("working_dir") and not job_env.get("py_modules"):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        runtime_env["py_modules"] = [os.path.join(root, package) for package in PACKAGES]
    return runtime_env


def init_ray(cfg: RayConfig, device: str = "cpu") -> None:
    """Start an embedded Ray (local mode) or join the cluster (ray job submit sets RAY_ADDRESS)."""
    if ray.is_initialized():
        return
    if is_local(cfg):
        cpus = cfg.num_cpus or os.cpu_count()
        print(f"local mode: starting an embedded single-node Ray ({cpus} logical CPUs); any other Ray on this "
              f"machine is left alone", flush=True)
        ray.init(address="local", num_cpus=cpus, include_dashboard=cfg.dashboard, log_to_driver=cfg.log_to_driver,
                 runtime_env={"env_vars": worker_env(cfg, device), "worker_process_setup_hook": IMPORT_TORCH_FIRST})
        return
    ray.init(address=cfg.address or None, log_to_driver=cfg.log_to_driver,
             runtime_env=cluster_runtime_env(cfg, device, job_runtime_env()))
    nodes = [node for node in ray.nodes() if node["Alive"]]
    print(f"joined the Ray cluster at {ray.get_runtime_context().gcs_address}: {len(nodes)} node(s)", flush=True)


def save_actor_logs(nodes: dict[str, list[dict]], storage) -> list[str]:
    """Each actor's stdout and stderr, as Ray keeps them in its worker log files on the actor's node, read through
    Ray's State API (it needs the dashboard) into STORAGE/logs/ROLE_I.log; returns the files written. An actor
    whose log cannot be read gets a file saying why."""
    from ray.util.state import get_log

    from pipeline.console import LOGS

    address = ray.get_runtime_context().gcs_address  # this job's Ray: another one on the machine is not asked
    here = ray.get_runtime_context().get_node_id()
    written = []
    for role, records in nodes.items():
        for index, record in enumerate(records):
            parts = []
            for suffix in ("out", "err"):
                try:
                    parts.append(f"===== std{suffix} =====\n" + "".join(get_log(address, actor_id=record["actor_id"], suffix=suffix)))
                except Exception as e:  # no dashboard agent (its port taken by another Ray here), a node gone
                    own_file = record.get(f"std{suffix}_file", "")
                    if record["node_id"] == here and os.path.isfile(own_file):  # this node's disk: read it directly
                        parts.append(f"===== std{suffix} =====\n" + open(own_file, errors="replace").read())
                    else:  # say so instead of losing the run's other logs
                        parts.append(f"===== std{suffix}: not readable through Ray's State API ({e}); see Ray's "
                                     f"session logs on node {record['node_id'][:8]} ({record['ip']}) =====\n")
            written.append(f"{LOGS}/{role}_{index}.log")
            storage.write_text(written[-1], "\n".join(parts))
    return written


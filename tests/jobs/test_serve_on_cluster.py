"""jobs.serve submitted with `ray job submit --working-dir .` to the multi-node test cluster (tests/multinode.py).

The replica is pinned to worker0, whose disk holds neither the checkout nor the driver's caches: it loads the model
from the shared storage and answers over real HTTP through the head's proxy after the submitting job has ended
(`--detach`). The cluster is the one tests/jobs/test_on_cluster.py uses (same node specs, so one cluster serves both).
"""
import json
import time
import urllib.request

import pytest

from tests.jobs.test_on_cluster import HEAD, WORKERS
from tests.ray_processes import free_ports

pytestmark = pytest.mark.slow

APP = "endorl-reward-cluster-test"


def post(url: str, body: dict, timeout: float = 60.0) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_submitted_reward_server_serves_from_a_worker_node_after_the_job_ends(multinode_cluster_factory,
                                                                           tiny_model_dir):
    import shutil

    cluster = multinode_cluster_factory(workers=WORKERS, head=HEAD)
    model = cluster.shared_dir / "tiny_model"
    if not model.exists():
        shutil.copytree(tiny_model_dir, model)
    (port,) = free_ports(1)
    # HeadOnly: the test cluster's nodes share one IP, so proxies on every node would compete for one port
    result = cluster.submit_cli(["python", "-m", "jobs.serve", "--detach", "--model.name", str(model),
                                 "--http.port", str(port), "--http.proxy_location", "HeadOnly", "--app_name", APP,
                                 "--replicas.cpus_per_replica", "1", "--replicas.resources", "{endorl_engine: 1}"],
                                timeout_s=600)
    assert result.status == "SUCCEEDED", result.output[-6000:]
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:  # the job has ended; the application it deployed keeps serving
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "the detached reward server never answered /health"
                time.sleep(2)
        assert health["status"] == "ok"
        answer = post(f"{url}/v1/reward", {"items": [{"prompt": "What is 2+2?", "response": "4."},
                                                     {"prompt": "Name a colour.", "response": "Blue."}],
                                          "token_rewards": True})
        for item in answer["items"]:  # R = sum of the token rewards, one per response token (EOS included)
            assert len(item["token_rewards"]) >= 2
            assert item["reward"] == pytest.approx(sum(item["token_rewards"]), abs=1e-3)
        # the replica runs on worker0, the node the role was pinned to
        where = cluster.submit(
            "python -c \"import ray; ray.init(); from ray.util.state import list_actors; "
            f"print('NODES', sorted({{a.node_id for a in list_actors(filters=[('state', '=', 'ALIVE')]) "
            f"if 'RewardServer' in a.class_name}}))\"", timeout_s=120)
        assert where.status == "SUCCEEDED", where.logs[-3000:]
        assert f"NODES ['{cluster.node_ids['worker0']}']" in where.logs, where.logs[-3000:]
    finally:
        cluster.submit(f"python -c \"import ray; ray.init(); from ray import serve; serve.delete('{APP}')\"",
                       timeout_s=120)

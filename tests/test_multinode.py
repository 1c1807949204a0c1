"""The multi-node harness itself: real raylets, workers with their own disks, jobs through `ray job submit`.

tests/multinode_probe.py runs as the job: one task pinned to each node reports what that node sees.
"""
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.multinode import DEFAULT_EXCLUDES, REPO_ROOT, LocalCluster, NodeSpec

pytestmark = pytest.mark.slow

WORKERS = ("worker0", "worker1")


@pytest.fixture
def markers(multinode_cluster):
    """Files on the driver's disk (home cache, /tmp, the checkout) and one in the shared folder."""
    tag = secrets.token_hex(4)
    home_dir = Path.home() / ".cache" / f"endorl-probe-{tag}"
    tmp_dir = Path("/tmp") / f"endorl-probe-{tag}"
    for d in (home_dir, tmp_dir):
        d.mkdir()
        (d / "marker").write_text(tag)
    shared = multinode_cluster.shared_dir / f"probe-{tag}"
    shared.mkdir()
    (shared / "marker").write_text(tag)
    paths = {
        "home_cache": str(home_dir / "marker"),
        "tmp": str(tmp_dir / "marker"),
        "checkout": str(REPO_ROOT / "tests" / "multinode_probe.py"),
    }
    args = ["--shared", str(shared), "--expected", tag] + [a for k, v in paths.items() for a in ("--path", f"{k}={v}")]
    yield {"args": args, "paths": paths, "shared": shared}
    for d in (home_dir, tmp_dir, shared):
        shutil.rmtree(d, ignore_errors=True)


def check_probe(cluster: LocalCluster, logs: str, markers: dict) -> dict:
    lines = [line for line in logs.splitlines() if line.startswith("MULTINODE_PROBE ")]
    assert len(lines) == 1, logs
    result = json.loads(lines[0].split(" ", 1)[1])
    ids = cluster.node_ids
    tasks = result["tasks"]

    # One task on each of the three nodes, each where it was pinned; the driver runs on the head.
    assert set(tasks) == set(ids.values()) and len(tasks) == 3, (tasks.keys(), ids)
    assert all(t["node_id"] == node_id for node_id, t in tasks.items())
    assert result["driver"]["node_id"] == ids["head"]
    assert result["head_node_ids"] == [ids["head"]]

    # The driver's node sees the driver's files: so the worker checks below can fail.
    head = tasks[ids["head"]]
    assert head["exists"] == {name: True for name in markers["paths"]}, head
    assert result["driver"]["exists"] == head["exists"]
    # Each worker has its own disks: none of the driver's temp files, home cache or checkout.
    for name in WORKERS:
        t = tasks[ids[name]]
        assert t["exists"] == {name: False for name in markers["paths"]}, (name, t)
    assert len({t["mnt_ns"] for t in tasks.values()}) == 3  # three mount namespaces
    assert result["driver"]["mnt_ns"] == head["mnt_ns"]

    # The shared folder is shared both ways: every node read the marker and wrote a file the host sees.
    for t in [result["driver"], *tasks.values()]:
        assert t["shared_read"] and t["shared_write"], t
    assert {p.name for p in markers["shared"].glob("from-*")} == {f"from-{i}" for i in ids.values()}

    # The project's packages import on every node, from that node's own copy of the uploaded working_dir.
    for name, node_id in ids.items():
        t = tasks[node_id]
        copy = f"{cluster.temp_dirs[name]}/session_"  # .../session_<date>/runtime_resources/working_dir_files/
        for pkg, path in t["imports"].items():
            assert not path.startswith("ERROR"), (name, pkg, path)
            assert path.startswith(copy) and "/runtime_resources/working_dir_files/_ray_pkg_" in path, (name, path)
        assert t["cwd"].startswith(copy) and "/working_dir_files/_ray_pkg_" in t["cwd"], (name, t["cwd"])
    return result


def _cmdlines(procs) -> list[list[str]]:
    out = []
    for p in procs:
        try:
            out.append(p.cmdline())
        except psutil.Error:  # gone meanwhile
            out.append([])
    return out


def test_token_auth_is_on(multinode_cluster):
    url = multinode_cluster.dashboard_url + "/api/jobs/"

    def status(headers: dict) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status({}) == 401
    assert status({"Authorization": "Bearer " + "0" * 64}) == 403
    assert status({"Authorization": f"Bearer {multinode_cluster.token}"}) == 200
    env = multinode_cluster.client_env
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == multinode_cluster.token
    assert "RAY_ADDRESS" not in env


def test_cluster_stays_small(multinode_cluster):
    """Three raylets with the head's dashboard: about 1.3 GB (PSS) here; idle workers left by jobs add a bit."""
    pss = multinode_cluster.memory_pss()
    print("\n[multinode] memory (PSS): " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in pss.items()))
    assert set(pss) == {"head", *WORKERS} and all(v > 0 for v in pss.values())
    assert sum(pss.values()) < 2.5e9


def test_readme_cli_job_sees_own_disks_per_node(multinode_cluster, markers):
    """`ray job submit --working-dir . --runtime-env-json '{"excludes": ...}' -- python -m ...` from the repo."""
    t0 = time.monotonic()
    res = multinode_cluster.submit_cli(["python", "-m", "tests.multinode_probe", *markers["args"]], timeout_s=300)
    print(f"\n[multinode] CLI probe job: {time.monotonic() - t0:.1f} s")
    assert res.status == "SUCCEEDED", res.output
    assert res.returncode == 0, res.output
    check_probe(multinode_cluster, res.output, markers)


def test_sdk_job_sees_own_disks_per_node(multinode_cluster, markers):
    t0 = time.monotonic()
    status, logs = multinode_cluster.submit(
        "python tests/multinode_probe.py " + " ".join(markers["args"]),
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": list(DEFAULT_EXCLUDES)},
        timeout_s=300,
    )
    print(f"\n[multinode] SDK probe job: {time.monotonic() - t0:.1f} s")
    assert status == "SUCCEEDED", logs
    check_probe(multinode_cluster, logs, markers)


def test_job_past_its_timeout_is_stopped(multinode_cluster):
    t0 = time.monotonic()
    status, logs = multinode_cluster.submit(
        f"{sys.executable} -c \"import time; print('probe sleeping', flush=True); time.sleep(600)\"", timeout_s=8
    )
    assert status == "STOPPED", logs
    assert "ran past 8 s" in logs
    assert time.monotonic() - t0 < 60


def test_namespace_hides_paths_but_keeps_python(tmp_path):
    """A hidden folder that holds the Python installation (a .venv inside the checkout) keeps it visible."""
    venv_parent = Path(sys.prefix).resolve().parent
    cluster = LocalCluster(workers=[], hide_paths=[venv_parent])
    marker = Path("/tmp") / f"endorl-ns-{secrets.token_hex(4)}"
    marker.write_text("x")
    try:
        script = (
            f"test ! -e {marker} && test -d {Path.home() / '.cache'} && test -z \"$(ls -A {venv_parent} | "
            f"grep -v -x {Path(sys.prefix).resolve().name})\" && {sys.executable} -c 'import ray; print(\"ok\")'"
        )
        out = subprocess.run(cluster.namespace_argv(script), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (out.stdout, out.stderr)
        assert marker.exists()  # only the private namespace lost it
    finally:
        marker.unlink()
        cluster.stop()
    assert not cluster.base_dir.exists()


def test_stop_leaves_no_process():
    """A cluster stopped while a job runs tasks on every node leaves no process and no folder behind."""
    cluster = LocalCluster(workers=[NodeSpec(1, {"endorl_probe": 1})]).start()
    try:
        print(f"\n[multinode] small cluster up in {cluster.startup_s:.1f} s")
        client = cluster.job_client()
        code = (
            "import ray, time; ray.init(); "
            "f = ray.remote(num_cpus=0)(lambda: time.sleep(600)); "
            "g = ray.remote(num_cpus=0, resources={'endorl_probe': 1})(lambda: time.sleep(600)); "
            "refs = [f.remote(), g.remote()]; print('tasks started', flush=True); ray.get(refs)"
        )
        job = client.submit_job(entrypoint=f"{sys.executable} -c \"{code}\"")
        deadline = time.monotonic() + 120
        while "tasks started" not in client.get_job_logs(job):
            assert time.monotonic() < deadline, client.get_job_logs(job)
            time.sleep(1)
        time.sleep(2)
        before = cluster.surviving_processes()
        assert len(before) > 10  # raylets, GCS, dashboard, agents, workers, the driver
        # `ray start` daemons stay in the process group of the `ray start` that started them (the session
        # leader); Ray's worker processes make groups of their own, inside the same session.
        leaders = {n.name: n.proc.pid for n in cluster.nodes}
        daemons = [(p.pid, c) for p, c in zip(before, _cmdlines(before))
                   if any(d in " ".join(c[:2]) for d in ("/raylet", "/gcs_server", "dashboard/dashboard.py"))]
        assert len(daemons) == 4, daemons  # two raylets, one GCS, one dashboard
        assert {os.getpgid(pid) for pid, _ in daemons} == set(leaders.values()), (daemons, leaders)
        # The job driver is among them (it runs in a session of its own, below the head's job supervisor).
        assert any("tasks started" in " ".join(cmdline) for cmdline in _cmdlines(before))
    finally:
        cluster.stop()
    assert cluster.surviving_processes() == []
    assert [c for c in _cmdlines(psutil.process_iter()) if any(cluster.tag in arg for arg in c)] == []
    assert not cluster.base_dir.exists() and not Path(cluster.temp_root).exists()

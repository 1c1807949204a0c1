"""A real multi-node Ray cluster on this one machine, for tests (issue 8, item 5).

`LocalCluster` starts a Ray head and N worker nodes as separate raylets with `ray start` subprocesses. Each
WORKER node runs in its own mount namespace (`unshare --mount --propagation private`) with tmpfs mounted over
/tmp, over the home cache (~/.cache) and over any caller-given paths (the repo checkout, for example), so a
worker sees none of the driver's temp files, model caches or checkout: anything read from the driver's disk
fails there as it would on a real cluster. The head stays in the normal namespace: it is the driver's node
(`ray job submit` runs the job's driver on the head). The Python installation is re-exposed on workers when it
lies under a hidden path (a `.venv` inside the hidden repo), since every node needs it.

Shared storage is `cluster.shared_dir`, a folder under /var/tmp (never under a hidden path) that every node sees.

Token authentication is on: every node and every client gets RAY_AUTH_MODE=token and a generated
RAY_AUTH_TOKEN. `cluster.client_env` is the environment for client subprocesses (the `ray` CLI, `python -m
jobs...` connecting with ray.init); `submit()` sends the token itself as an `Authorization: Bearer` header, so
the calling process needs no Ray auth settings of its own.

Processes: each node's `ray start` runs with start_new_session=True; its daemons stay in that session, Ray's
worker processes too (they get their own process groups inside it), job drivers get sessions of their own but
are descendants of a node's processes. Every node process also carries ENDORL_LOCAL_CLUSTER=<tag> in its
environment and has its cwd under the cluster's folder. `stop()` signals all of them (SIGTERM, then SIGKILL after
a grace period) and finally kills, by pid, any process whose command line, cwd or environment still names the
cluster's tag. It never uses `ray stop` (which kills every Ray on the machine, teammates' included). After a
crashed test session: `python -m tests.multinode list`, then `python -m tests.multinode stop emn-...`.

    with LocalCluster(workers=[NodeSpec(1, {"endorl_engine": 10}), NodeSpec(1)]) as cluster:
        status, logs = cluster.submit("python -m jobs.score ...", {"working_dir": str(REPO_ROOT), "excludes": [...]})
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import psutil

from tests.ray_processes import free_ports, kill, processes_with

REPO_ROOT = Path(__file__).resolve().parents[1]
# The README's excludes for `ray job submit --working-dir .` (gitignore-style patterns).
DEFAULT_EXCLUDES = (".venv", "runs/", "outputs/", ".git", ".pytest_cache", "__pycache__")
TAG_ENV = "ENDORL_LOCAL_CLUSTER"
# Variables that would redirect Ray clients to another cluster, or give them another token.
_CLIENT_ENV_DROP = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", TAG_ENV)
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# Every flag below was checked against `ray start --help` (Ray 2.60). Every node gets them, the head too: a
# fixed default (the dashboard agent's 52365, ...) collides with any other Ray on the machine, a teammate's or
# a second LocalCluster, and the head's agent then fails ("No available agent to submit job").
_PORT_FLAGS = (
    "--node-manager-port", "0", "--object-manager-port", "0", "--min-worker-port", "0", "--max-worker-port", "0",
    "--dashboard-agent-listen-port", "0", "--metrics-export-port", "0", "--runtime-env-agent-port", "0",
    "--dashboard-agent-grpc-port", "0",
)


@dataclass(frozen=True)
class NodeSpec:
    """What one node offers: logical CPUs, custom resources (e.g. {"endorl_engine": 10}), object store bytes."""

    num_cpus: int = 1
    resources: Mapping[str, float] = field(default_factory=dict)
    object_store_memory: int = 200 * 1000 * 1000

    def key(self) -> tuple:
        return (self.num_cpus, tuple(sorted(self.resources.items())), self.object_store_memory)


class JobResult(NamedTuple):
    status: str  # a JobStatus value: SUCCEEDED, FAILED or STOPPED (STOPPED also after a timeout)
    logs: str  # the driver's output; after a timeout it ends with a line saying the harness stopped the job


class CliResult(NamedTuple):
    returncode: int  # of `ray job submit` (it exits 1 only for FAILED: check `status` too)
    output: str  # what the CLI printed: its own messages and the tailed driver logs
    status: str  # the job's final JobStatus value, asked from the Jobs API after the CLI returned


@dataclass
class _Node:
    name: str
    spec: NodeSpec
    temp_dir: str  # Ray's --temp-dir, as the node itself sees it
    cwd: Path  # the node's working folder (on the host, outside every hidden path)
    log_path: Path  # output of `ray start` (and the namespace set-up), readable from the host
    proc: subprocess.Popen | None = None
    node_id: str | None = None

    @property
    def session(self) -> int:
        return self.proc.pid  # start_new_session=True: the session id is the leader's pid


def _is_under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes of the LocalCluster `tag`: the tag in their command line, cwd or environment (every node
    process and job driver inherits ENDORL_LOCAL_CLUSTER, even those whose command line Ray rewrites)."""
    return processes_with([tag])


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(unreadable: {e})\n"


class LocalCluster:
    """A Ray head plus worker raylets on this machine; workers each in a private mount namespace.

    After `start()`: `gcs_address`, `dashboard_url`, `client_env`, `token`, `shared_dir`, `node_ids`
    ({"head": id, "worker0": id, ...}), `temp_dirs`, `startup_s`, `startup_phases`. Use as a context manager
    or call `stop()`. `start()` returns once every node is alive AND the Jobs API has run a first job.
    """

    def __init__(
        self,
        workers: Sequence[NodeSpec] = (NodeSpec(), NodeSpec()),
        head: NodeSpec = NodeSpec(),
        *,
        hide_paths: Sequence[str | os.PathLike] = (),
        base_dir: str | os.PathLike = "/var/tmp",
        start_timeout_s: float = 90.0,
        stop_grace_s: float = 2.0,  # the head's GCS and raylet ignore SIGTERM for 8 s+; nothing here needs them to
    ):
        self.tag = f"emn-{secrets.token_hex(6)}"  # names every folder and process of this cluster
        self.head_spec = head
        self.worker_specs = list(workers)
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.home_cache = Path.home() / ".cache"
        # What each worker node must not see. /tmp and ~/.cache always; the caller may add more.
        self.hidden_paths = [Path("/tmp"), self.home_cache] + [Path(p).resolve() for p in hide_paths]
        for p in self.hidden_paths:
            if p == Path("/"):
                raise ValueError("cannot hide / on worker nodes")
        self.base_dir = Path(base_dir).resolve() / f"endorl-{self.tag}"
        for p in self.hidden_paths:
            if _is_under(self.base_dir, p):
                raise ValueError(f"base_dir {self.base_dir} lies under {p}, which worker nodes do not see")
        self.shared_dir = self.base_dir / "shared"
        self.temp_root = f"/tmp/{self.tag}"  # each node's Ray temp dir is below it (workers: in their own /tmp)
        self.token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
        self.nodes: list[_Node] = []
        self.gcs_address: str | None = None
        self.dashboard_url: str | None = None
        self.startup_s: float | None = None
        self.startup_phases: dict[str, float] = {}  # seconds from start(): head, nodes_alive, jobs_ready
        self._ports: dict[str, int] = {}
        self._stopped = False
        bin_dir = Path(sys.executable).parent
        self._ray = str(bin_dir / "ray") if (bin_dir / "ray").exists() else shutil.which("ray")
        if self._ray is None:
            raise RuntimeError("the `ray` command is not installed next to this Python")
        # Nodes inherit this environment: the venv's bin first on PATH so job drivers run `python` from it.
        base = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP}
        base["PATH"] = f"{bin_dir}{os.pathsep}{base.get('PATH', '')}"
        base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        self.client_env: dict[str, str] = dict(base)
        self._node_env = dict(base, **{TAG_ENV: self.tag})

    # ---------------------------------------------------------------- start

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.startup_s is not None and not self._stopped

    @property
    def head_node_id(self) -> str:
        return self.node_ids["head"]

    @property
    def worker_node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes if n.name != "head"]

    @property
    def node_ids(self) -> dict[str, str]:
        return {n.name: n.node_id for n in self.nodes}

    @property
    def temp_dirs(self) -> dict[str, str]:
        """Each node's Ray temp dir as that node sees it (a worker's lies in its private /tmp)."""
        return {n.name: n.temp_dir for n in self.nodes}

    def start(self) -> "LocalCluster":
        if self.nodes:
            raise RuntimeError("a LocalCluster starts once; make a new one")
        t0 = self._t0 = time.monotonic()
        atexit.register(self.stop)  # a crashed test session still cleans up
        (self.base_dir / "logs").mkdir(parents=True)
        self.shared_dir.mkdir()
        try:
            self._start_head()
            self.startup_phases["head"] = time.monotonic() - t0
            for i, spec in enumerate(self.worker_specs):
                self._start_worker(f"worker{i}", spec)
            self._wait_until_up(t0 + self.start_timeout_s)
        except BaseException:
            self.stop()  # the error holds the log tails
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _new_node(self, name: str, spec: NodeSpec) -> _Node:
        cwd = self.base_dir / "nodes" / name
        cwd.mkdir(parents=True)
        node = _Node(name, spec, f"{self.temp_root}/{name}", cwd, self.base_dir / "logs" / f"{name}.log")
        self.nodes.append(node)
        return node

    def _common_flags(self, node: _Node) -> list[str]:
        return [
            "--node-ip-address", "127.0.0.1",  # Ray maps loopback to the machine's reachable IP itself
            "--num-cpus", str(node.spec.num_cpus),
            "--resources", json.dumps(dict(node.spec.resources)),
            "--object-store-memory", str(node.spec.object_store_memory),
            "--temp-dir", node.temp_dir,
            "--disable-usage-stats",
        ]

    def _popen(self, node: _Node, argv: list[str]) -> None:
        with open(node.log_path, "wb") as log:
            node.proc = subprocess.Popen(
                argv, cwd=node.cwd, env=self._node_env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    def _start_head(self) -> None:
        node = self._new_node("head", self.head_spec)
        gcs, dash, client = free_ports(3)
        self._ports = {"gcs": gcs, "dashboard": dash, "client": client}
        self._popen(node, [
            self._ray, "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash),
            "--ray-client-server-port", str(client), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", *self._common_flags(node), *_PORT_FLAGS,
        ])
        # `ray start` daemonizes and exits; its daemons stay in the session. Wait for the exit WITHOUT reaping
        # it (WNOWAIT): the zombie keeps its pid, so the session id cannot be reused by a stranger before stop().
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            res = os.waitid(os.P_PID, node.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if res is not None:
                if res.si_status != 0:
                    raise RuntimeError(f"`ray start --head` exited with {res.si_status}\n{self.log_tails()}")
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"`ray start --head` did not return in {self.start_timeout_s} s\n"
                                   f"{self.log_tails()}")
            time.sleep(0.2)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"

    def namespace_script(self, commands: str, keep: Sequence[Path] = ()) -> str:
        """The sh script a worker node runs under `unshare --mount --propagation private`.

        It mounts tmpfs over every hidden path, but first bind-mounts each `keep` path (the Python installation)
        to a staging folder and afterwards back to its own place, so it stays visible even under a hidden path.
        Then `commands` run."""
        hidden = sorted(self.hidden_paths, key=lambda p: len(p.parts))  # parents before children
        keep = [k for k in keep if any(_is_under(k, h) for h in hidden)]
        stage = self.base_dir / "keep"
        lines = ["set -e"]
        for i, k in enumerate(keep):
            (stage / str(i)).mkdir(parents=True, exist_ok=True)
            lines.append(f"mount --bind {shlex.quote(str(k))} {shlex.quote(str(stage / str(i)))}")
        for h in hidden:
            lines.append(f"mount -t tmpfs -o mode=1777 tmpfs {shlex.quote(str(h))}")
        for i, k in enumerate(keep):
            lines.append(f"mkdir -p {shlex.quote(str(k))}")
            lines.append(f"mount --bind {shlex.quote(str(stage / str(i)))} {shlex.quote(str(k))}")
        lines.append(commands)
        return "\n".join(lines)

    def namespace_argv(self, commands: str) -> list[str]:
        """argv that runs `commands` (sh) with a worker node's view of the disks."""
        self.home_cache.mkdir(parents=True, exist_ok=True)  # the mount point of the workers' private cache
        for h in self.hidden_paths:
            if not h.is_dir():
                raise ValueError(f"hidden path {h} is not an existing folder")
        keep = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
        script = self.namespace_script(commands, sorted(keep))
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def _start_worker(self, name: str, spec: NodeSpec) -> None:
        node = self._new_node(name, spec)
        start = shlex.join([
            self._ray, "start", "--address", self.gcs_address, *self._common_flags(node), *_PORT_FLAGS,
        ])
        # `ray start` returns once the raylet runs; `sleep` then holds the namespace and the session open.
        self._popen(node, self.namespace_argv(f"mkdir -p {shlex.quote(node.temp_dir)}\n{start}\nexec sleep infinity"))

    def _node_processes(self, node: _Node) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == node.session:
                    out.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return out

    def memory_pss(self) -> dict[str, int]:
        """Bytes of memory (PSS: shared pages split between their users) each node's processes hold now."""
        out = {}
        for node in self.nodes:
            total = 0
            for p in self._node_processes(node):
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            out[node.name] = total
        return out

    def _raylet_node_id(self, node: _Node) -> str | None:
        for p in self._node_processes(node):
            try:
                if p.name() == "raylet":
                    for arg in p.cmdline():
                        if arg.startswith("--node_id="):
                            return arg.split("=", 1)[1]
            except psutil.Error:
                pass
        return None

    def _http_get(self, path: str, token: bool = True, timeout: float = 5.0) -> tuple[int, str]:
        req = urllib.request.Request(self.dashboard_url + path)
        if token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def state_nodes(self) -> list[dict]:
        """The state API's node list (node_id, state, is_head_node, resources_total, ...)."""
        code, body = self._http_get("/api/v0/nodes?limit=1000")
        if code != 200:
            raise RuntimeError(f"GET /api/v0/nodes answered {code}: {body[:500]}")
        return json.loads(body)["data"]["result"]["result"]

    def _wait_until_up(self, deadline: float) -> None:
        last = "nothing asked yet"
        while True:
            for node in self.nodes[1:]:
                rc = node.proc.poll()
                if rc is not None:
                    raise RuntimeError(f"worker node {node.name} exited with {rc} while starting\n{self.log_tails()}")
            for node in self.nodes:
                node.node_id = node.node_id or self._raylet_node_id(node)
            try:
                alive = {n["node_id"] for n in self.state_nodes() if n["state"] == "ALIVE"}
                want = {n.node_id for n in self.nodes}
                if None not in want and want <= alive:
                    self.startup_phases["nodes_alive"] = time.monotonic() - self._t0
                    break
                else:
                    last = f"alive {sorted(alive)}, waiting for {self.node_ids}"
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster {self.tag} not up after {self.start_timeout_s} s ({last})\n"
                                   f"{self.log_tails()}")
            time.sleep(0.5)
        # Nodes alive is not enough: the Jobs API answers "No available agent to submit job" until the head's
        # dashboard agent is registered, seconds later. A first job that runs `true` proves it can run jobs.
        client = self.job_client()
        while True:
            try:
                job = client.submit_job(entrypoint="true", submission_id=f"{self.tag}-ready")
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise RuntimeError(f"cluster {self.tag}: the Jobs API cannot start a job ({e})\n"
                                       f"{self.log_tails()}") from e
                time.sleep(0.5)
        status, timed_out = self._wait_job(client, job, max(1.0, deadline - time.monotonic()))
        self.startup_phases["jobs_ready"] = time.monotonic() - self._t0
        if status != "SUCCEEDED":
            raise RuntimeError(f"cluster {self.tag}: the readiness job `true` ended {status} (timed out: "
                               f"{timed_out})\n{client.get_job_logs(job)}\n{self.log_tails()}")

    # ---------------------------------------------------------------- logs

    def _node_root(self, node: _Node) -> str | None:
        """Where the node's own files are readable from the host: / for the head, /proc/PID/root for a worker
        whose namespace still exists (its holder runs), None otherwise."""
        if node.name == "head":
            return ""
        if node.proc is None or node.proc.poll() is not None:
            return None
        return f"/proc/{node.proc.pid}/root"

    def log_tails(self, lines: int = 25) -> str:
        """The end of each node's `ray start` output and of its raylet/GCS/dashboard logs."""
        out = []
        for node in self.nodes:
            out.append(f"===== {node.name}: {node.log_path}\n{_tail(node.log_path, lines)}")
            root = self._node_root(node)
            if root is None:
                continue
            logs = Path(f"{root}{node.temp_dir}/session_latest/logs")
            for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err", "dashboard.log",
                         "dashboard_agent.log"):
                if (logs / name).exists():
                    out.append(f"----- {node.name}: {name}\n{_tail(logs / name, lines)}")
        return "\n".join(out)

    # ---------------------------------------------------------------- jobs

    def job_client(self):
        """A JobSubmissionClient for this cluster that sends the token itself (no env needed in this process)."""
        from ray.job_submission import JobSubmissionClient

        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(var):  # the SDK lets these override any address it is given
                raise RuntimeError(f"{var}={os.environ[var]} is set in this process; the Jobs SDK would use it "
                                   f"instead of {self.dashboard_url}: unset it")
        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})

    def _wait_job(self, client, submission_id: str, timeout_s: float) -> tuple[str, bool]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = client.get_job_status(submission_id).value
            if status in _TERMINAL:
                return status, False
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                end = time.monotonic() + 60
                while status not in _TERMINAL and time.monotonic() < end:
                    time.sleep(0.5)
                    status = client.get_job_status(submission_id).value
                return status, True
            time.sleep(1.0)

    def submit(self, entrypoint: str, runtime_env: dict | None = None, timeout_s: float = 600.0,
               submission_id: str | None = None) -> JobResult:
        """Submit a job through the Jobs API and wait for it; past `timeout_s` it is stopped (stop_job).

        A relative `working_dir` in `runtime_env` is relative to this process's cwd (the SDK packs it here)."""
        client = self.job_client()
        submission_id = submission_id or f"endorl-{secrets.token_hex(6)}"
        client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
        status, timed_out = self._wait_job(client, submission_id, timeout_s)
        logs = client.get_job_logs(submission_id)
        if timed_out:
            logs += f"\n[LocalCluster] job {submission_id} ran past {timeout_s} s: stopped, final status {status}\n"
        return JobResult(status, logs)

    def cli_submit_argv(self, args: Sequence[str], excludes: Sequence[str] = DEFAULT_EXCLUDES,
                        submission_id: str | None = None) -> list[str]:
        """The README's command: `ray job submit --address URL --working-dir . --runtime-env-json ... -- ARGS`."""
        argv = [self._ray, "job", "submit", "--address", self.dashboard_url]
        if submission_id:
            argv += ["--submission-id", submission_id]
        argv += ["--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": list(excludes)}), "--"]
        return argv + list(args)

    def submit_cli(self, args: Sequence[str], *, cwd: str | os.PathLike = REPO_ROOT,
                   excludes: Sequence[str] = DEFAULT_EXCLUDES, timeout_s: float = 600.0,
                   submission_id: str | None = None) -> CliResult:
        """Run the README-style `ray job submit` CLI from `cwd` (the repo root) with `client_env`.

        Past `timeout_s` the job is stopped through the Jobs API and the CLI killed."""
        submission_id = submission_id or f"endorl-{secrets.token_hex(6)}"
        proc = subprocess.Popen(
            self.cli_submit_argv(args, excludes, submission_id), cwd=cwd, env=self.client_env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                self.job_client().stop_job(submission_id)
            except Exception as e:  # the job may never have been created
                print(f"[LocalCluster] stop_job({submission_id}): {e!r}", file=sys.stderr)
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        try:
            client = self.job_client()
            status, _ = self._wait_job(client, submission_id, 60 if timed_out else 10)
        except Exception as e:
            status = f"UNKNOWN ({e!r})"
        if timed_out:
            output += f"\n[LocalCluster] `ray job submit` ran past {timeout_s} s: job stopped, status {status}\n"
        return CliResult(proc.returncode, output, status)

    # ---------------------------------------------------------------- stop

    def surviving_processes(self) -> list[psutil.Process]:
        """Live processes of this cluster: its tag in their command line, cwd or environment."""
        return tagged_processes(self.tag)

    def _all_processes(self) -> dict[int, psutil.Process]:
        procs = {p.pid: p for p in self.surviving_processes()}
        for node in self.nodes:
            if node.proc is not None:
                for p in self._node_processes(node):
                    procs[p.pid] = p
        for p in list(procs.values()):  # job drivers run in sessions of their own, below a node's workers
            try:
                for c in p.children(recursive=True):
                    procs[c.pid] = c
            except psutil.Error:
                pass
        return {pid: p for pid, p in procs.items() if _alive(p)}  # the head's `ray start` stays a zombie

    def _signal_all(self, sig: int) -> int:
        procs = self._all_processes()
        groups = set()
        for p in procs.values():
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgid(0))  # never this process's own group
        for g in groups:  # every group found is inside one of our sessions or led by one of our processes
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs.values():
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        return len(procs)

    def stop(self, remove_files: bool = True) -> None:
        """Stop every process of this cluster (never `ray stop`) and remove its folders. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._signal_all(signal.SIGTERM):
            deadline = time.monotonic() + self.stop_grace_s
            while time.monotonic() < deadline and self._all_processes():
                time.sleep(0.2)
            for _ in range(3):
                if not self._signal_all(signal.SIGKILL):
                    break
                time.sleep(0.3)
        for node in self.nodes:  # reap the session leaders
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        # Workers' temp dirs vanished with their namespaces (tmpfs); the head's is on the host's /tmp.
        if remove_files:
            shutil.rmtree(self.temp_root, ignore_errors=True)
            shutil.rmtree(self.base_dir, ignore_errors=True)
        atexit.unregister(self.stop)


def _main(argv: Sequence[str]) -> int:
    """`python -m tests.multinode list` shows LocalClusters with live processes on this machine;
    `python -m tests.multinode stop TAG` kills what a crashed test session left of one (by pid)."""
    if argv[:1] == ["list"]:
        tags: dict[str, int] = {}
        for p in psutil.process_iter():
            try:
                tag = p.environ().get(TAG_ENV)
            except psutil.Error:
                continue
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
        for tag, n in sorted(tags.items()):
            print(f"{tag}\t{n} processes")
        return 0
    if len(argv) == 2 and argv[0] == "stop" and argv[1].startswith("emn-"):
        tag = argv[1]
        kill(tagged_processes(tag), grace_s=5.0)
        shutil.rmtree(f"/tmp/{tag}", ignore_errors=True)  # the head's temp dir; workers' died with their tmpfs
        shutil.rmtree(f"/var/tmp/endorl-{tag}", ignore_errors=True)  # the default base_dir
        left = tagged_processes(tag)
        print(f"{tag}: {len(left)} processes left")
        return 1 if left else 0
    print(_main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""Finding and ending the Ray processes a test started, by pid, never by name (`ray stop` would end every Ray on
the machine, a teammate's included). Shared by the multi-node harness (tests/multinode.py) and the autoscaling test."""
from __future__ import annotations

import os
import socket

import psutil


def free_ports(n: int) -> list[int]:
    """n TCP ports free on every interface right now (Ray binds some of its ports on all of them)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def processes_with(markers: list[str]) -> list[psutil.Process]:
    """Live processes (not this one) whose command line, working directory or environment holds one of `markers`:
    a temp dir or a tag set in the environment of every node process (Ray rewrites many command lines)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            texts = [*p.cmdline(), p.cwd(), *p.environ().values()]
        except psutil.Error:  # gone, or not ours to read
            continue
        if any(marker in text for marker in markers for text in texts):
            found.append(p)
    return found


def kill(processes: list[psutil.Process], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `grace_s`."""
    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)

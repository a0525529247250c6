"""Run ``ctrkit serve`` as a child process on loopback and wait until /health answers (benchmarks, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(bundle: str | Path, port: int, events: str | Path | None = None, cpus: str | None = None,
                 timeout: float = 120.0, threads: int | None = None, workers: int = 1) -> subprocess.Popen[bytes]:
    """Start ``ctrkit serve BUNDLE`` on 127.0.0.1:``port`` (pinned to ``cpus`` with taskset when given)."""
    cmd = [sys.executable, "-m", "ctrkit", "serve", str(bundle), "--port", str(port), "--workers", str(workers),
           *(["--threads", str(threads)] if threads is not None else [])]
    if events is not None:
        cmd += ["--events", str(events)]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    # a session of its own: os.killpg reaches every worker process of ``--workers N``
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    raise RuntimeError(f"ctrkit serve {bundle} did not answer on port {port} within {timeout:.0f} s: {stderr}")

"""Start and stop a local Ray head (`ray start --head`) that only we own.

`ray stop` stops every Ray of the machine, including other users' and other jobs'. A head
started here gets its own short temp dir; stopping it ends its process group and then only the
processes whose command line names that temp dir.

Token authentication (on by default in Ray 2.60) stays on: the head starts with
``RAY_AUTH_MODE=token``; REST calls carry ``Authorization: Bearer <token>`` and CLI clients need
``RAY_AUTH_MODE=token`` in their environment (``client_env()``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgeray.errors import UserError


def auth_token() -> str:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.is_file() else "")


def client_env(**extra) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "token", **extra}


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start_daemon(cmd: list[str], log_path: Path, ready, what: str, timeout_s: float,
                 env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (so it can be ended as a group), its output in
    ``log_path``, and return once ``ready()`` is true. If it exits first, or is not ready within
    ``timeout_s``, it is ended and a UserError names ``what`` and the last line of its log."""
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text().strip().splitlines()[-1:]
            raise UserError(f"{what} exited with {proc.returncode}: {' '.join(tail)[:300]}")
        if ready():
            return proc
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    raise UserError(f"{what} was not ready within {timeout_s:.0f}s (its log: {log_path})")


class LocalHead:
    def __init__(self, *, gcs_port: int = 6390, dashboard_port: int = 8265, metrics_port: int = 8090,
                 client_port: int = 20201, agent_port: int = 52401, num_cpus: int | None = None,
                 dashboard_host: str = "127.0.0.1", extra_env: dict | None = None):
        self.gcs_port, self.dashboard_port, self.metrics_port = gcs_port, dashboard_port, metrics_port
        self.client_port, self.agent_port, self.num_cpus = client_port, agent_port, num_cpus
        self.dashboard_host = dashboard_host
        self.extra_env = extra_env or {}
        self.temp_dir = tempfile.mkdtemp(prefix="er-", dir="/tmp")  # short: Ray's socket paths are capped
        self.proc: subprocess.Popen | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 180.0) -> "LocalHead":
        ray = str(Path(sys.executable).with_name("ray"))
        if not auth_token():  # a fresh machine: create the shared token first (its output is the token: keep it)
            subprocess.run([ray, "get-auth-token", "--generate"], env=client_env(), capture_output=True, check=False)
        cmd = [ray, "start", "--head", "--block", f"--port={self.gcs_port}",
               f"--dashboard-host={self.dashboard_host}", f"--dashboard-port={self.dashboard_port}",
               f"--metrics-export-port={self.metrics_port}", f"--ray-client-server-port={self.client_port}",
               f"--dashboard-agent-listen-port={self.agent_port}", f"--temp-dir={self.temp_dir}",
               "--disable-usage-stats"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        try:
            self.proc = start_daemon(cmd, Path(self.temp_dir) / "ray-start.log", lambda: answers(self.dashboard_url),
                                     "ray start --head", timeout_s, client_env(**self.extra_env))
        except UserError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)   # then the sweep below ends what is left
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        # Ray's daemons may have left the process group: end whatever names our temp dir.
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)


class LocalNode:
    """A second Ray node on this machine (``ray start --address``), with its own resources, ports and
    temp dir: what a worker machine of a cluster is, for tests and for trying a cluster on a laptop.
    ``kill()`` ends its raylet with SIGKILL, as a lost machine would; ``stop()`` ends whatever is left.
    """

    def __init__(self, head: LocalHead, *, num_cpus: int, node_manager_port: int, object_manager_port: int,
                 metrics_port: int, agent_port: int, min_worker_port: int, max_worker_port: int,
                 resources: dict | None = None):
        self.head, self.num_cpus, self.resources = head, num_cpus, resources or {}
        self.ports = dict(node_manager_port=node_manager_port, object_manager_port=object_manager_port,
                          metrics_export_port=metrics_port, dashboard_agent_listen_port=agent_port,
                          min_worker_port=min_worker_port, max_worker_port=max_worker_port)
        self.temp_dir = tempfile.mkdtemp(prefix="ern-", dir="/tmp")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> "LocalNode":
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray, "start", "--block", f"--address=127.0.0.1:{self.head.gcs_port}", f"--num-cpus={self.num_cpus}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               *[f"--{name.replace('_', '-')}={port}" for name, port in self.ports.items()]]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        log_path = Path(self.temp_dir) / "ray-start.log"
        try:   # "Ray runtime started" is printed once the node has registered with the head
            self.proc = start_daemon(cmd, log_path, lambda: "Ray runtime started" in log_path.read_text(),
                                     "ray start --address", timeout_s, client_env())
        except UserError:
            self.stop()
            raise
        return self

    def raylet_pids(self) -> list[int]:
        found = subprocess.run(["pgrep", "-f", f"raylet.*{self.temp_dir}"], capture_output=True, text=True)
        return [int(p) for p in found.stdout.split()]

    def kill(self) -> None:
        """SIGKILL the raylet: the node is gone for the cluster, its workers die with it."""
        for pid in self.raylet_pids():
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)

"""Start daemons as separate processes on loopback (the demo and the e2e tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DaemonProcess:
    """``kvbridge ROLE ...`` in a child process, its log in ``log_dir``."""

    def __init__(
        self, role: str, args: list[str], log_dir: str | Path | None = None, name: str = ""
    ) -> None:
        self.role = role
        self.name = name or role
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kvbridge-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.log_dir / f"{self.name}.ready.json"
        self.log_path = self.log_dir / f"{self.name}.log"
        self.ready_file.unlink(missing_ok=True)
        self.cmd = [
            sys.executable,
            "-m",
            "kvbridge.connector.cli",
            role,
            "--host",
            "127.0.0.1",
            "--engine-name",
            self.name,
            "--ready-file",
            str(self.ready_file),
            *args,
        ]
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVBRIDGE_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Wait for the ready file and a SERVING health check; returns the bound ports."""
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during startup:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.info = json.loads(self.ready_file.read_text())
        with grpc.insecure_channel(self.target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=max(1.0, deadline - time.monotonic()),
            )
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{self.name} health is {resp.status}")
        return self.info

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.info['grpc_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.info['metrics_port']}/metrics"

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

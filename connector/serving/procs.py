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
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbridge.connector.serving.daemon.security import ClientAuth
from prometheus_client.parser import text_string_to_metric_families


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DaemonProcess:
    """``kvbridge ROLE ...`` in a child process, its log in ``log_dir``.

    ``host``: the address it binds and clients dial; ``wrap``: a command prefix
    (e.g. ``ip netns exec NS``); ``env``: extra environment; ``client``: how to
    dial it (TLS, token) for the readiness check and ``channel()``.
    """

    def __init__(
        self,
        role: str,
        args: list[str],
        log_dir: str | Path | None = None,
        name: str = "",
        *,
        host: str = "127.0.0.1",
        wrap: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        client: ClientAuth | None = None,
    ) -> None:
        self.role = role
        self.host = host
        self.client = client or ClientAuth()
        self.extra_env = dict(env or {})
        self.name = name or role
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kvbridge-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.log_dir / f"{self.name}.ready.json"
        self.log_path = self.log_dir / f"{self.name}.log"
        self.ready_file.unlink(missing_ok=True)
        self.cmd = [
            *wrap,
            sys.executable,
            "-m",
            "kvbridge.connector.serving.cli",
            role,
            "--host",
            host,
            "--engine-name",
            self.name,
            "--ready-file",
            str(self.ready_file),
            # loopback daemons side by side: a free HTTP port unless the caller picks one
            *(["--http-port", "0"] if role == "decode" and "--http-port" not in args else []),
            *args,
        ]
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVBRIDGE_")}
        env.update(self.extra_env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def wait_ready(self, timeout: float = 60.0, service: str = "") -> dict:
        """Wait for the ready file and a SERVING health check of ``service`` (readiness
        by default; ``kvbridge.liveness``: only up); returns the bound ports. A daemon
        that does not get there is killed (no process outlives a failed start)."""
        try:
            return self._wait_ready(timeout, service)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float, service: str) -> dict:
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
        # readiness: a decode daemon turns SERVING once a prefill daemon answers its
        # health check (checked every second), which may be after its ready file
        with self.channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                resp = stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=max(1.0, deadline - time.monotonic()),
                )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return self.info
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited during startup:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s: {name}")
                time.sleep(0.05)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.info['grpc_port']}"

    def channel(self):
        """A gRPC channel to the daemon, authenticated like ``client``."""
        return self.client.channel(self.target)

    @property
    def http_url(self) -> str:
        """Base URL of a decode daemon's HTTP API (``https`` when it authenticates)."""
        scheme = "https" if self.client.tls else "http"
        return f"{scheme}://{self.host}:{self.info['http_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.info['metrics_port']}/metrics"

    def metrics(self, timeout: float = 10.0) -> dict[str, float]:
        """Its /metrics as ``{sample name{labels}: value}`` (label ``role`` dropped)."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "role")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def kill(self) -> int | None:
        """SIGKILL (no drain); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.returncode

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

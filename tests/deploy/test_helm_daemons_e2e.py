"""The chart's rendered daemons, run for real on loopback: the prefill and decode containers'
args, env and config files (pod paths and ports mapped to this machine), probed the way the
kubelet would, then the first request from NOTES.txt, then SIGTERM within the grace period."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_chart import (
    DEPLOY,
    Rendered,
    arg_values,
    container,
    fullname,
    note_commands,
    notes,
    render,
)

START_TIMEOUT_S = 90
CALL_TIMEOUT_S = 60
HEALTHCHECK = DEPLOY / "healthcheck.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One rendered container run as a local process."""

    def __init__(self, r: Rendered, role: str, tmp: Path, prefill: list[str] | None = None):
        c = container(r.get("StatefulSet", f"{fullname()}-{role}"))
        self.role, self.tmp = role, tmp
        self.files = _materialize(r, tmp)
        self.ports = {"grpc": _free_port(), "side": _free_port(), "metrics": _free_port()}
        args = []
        for a in c["args"]:
            flag, eq, value = a.partition("=")
            if value.startswith("/etc/kvbridge/"):
                value = str(self.files[value])
            elif flag == "--host":
                value = "127.0.0.1"  # loopback only
            elif flag in ("--grpc-port", "--side-port", "--metrics-port"):
                value = str(self.ports[flag[2:].split("-")[0]])
            elif flag == "--http-port":
                value = "0"  # the chart's port may be taken on this machine
            elif flag == "--prefill":
                continue
            args.append(f"{flag}{eq}{value}")
        args += [f"--prefill={t}" for t in prefill or []]
        self.ready_file = tmp / f"{role}.ready.json"
        args.append(f"--ready-file={self.ready_file}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVBRIDGE_")}
        for e in c["env"]:
            env[e["name"]] = e.get("value", "127.0.0.1")  # downward API: the pod IP
        env["HOME"] = env["TRITON_CACHE_DIR"] = str(tmp)
        self.log = (tmp / f"{role}.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvbridge.connector.serving.cli", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.tmp / f"{self.role}.log").read_text()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return
            if self.proc.poll() is not None:
                out = self.output()
                missing = re.search(r"No module named '(kvbridge\.[\w.]+)'", out)
                if missing:  # the daemon package is still being written
                    pytest.skip(f"daemon not runnable yet: {missing.group(0)}")
                pytest.fail(f"{self.role} exited {self.proc.returncode}:\n{out[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"{self.role} not ready after {START_TIMEOUT_S} s:\n{self.output()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        return self.proc.returncode


def _materialize(r: Rendered, tmp: Path) -> dict[str, Path]:
    """Pod files (ConfigMap, generated Secrets) written under ``tmp``, keyed by pod path."""
    files = {}
    cm = r.get("ConfigMap", f"{fullname()}-config")
    for name, text in cm["data"].items():
        files[f"/etc/kvbridge/config/{name}"] = text.encode()
    for s in r.of_kind("Secret"):
        for key, value in s["data"].items():
            folder = "tls" if s["type"] == "kubernetes.io/tls" else "auth"
            files[f"/etc/kvbridge/{folder}/{key}"] = base64.b64decode(value)
    out = {}
    for pod_path, data in files.items():
        p = tmp / pod_path.removeprefix("/etc/kvbridge/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[pod_path] = p
    return out


def _probe(d: Daemon, r: Rendered) -> subprocess.CompletedProcess[str]:
    """The container's readiness probe: the exec command, or the kubelet's native gRPC check."""
    probe = container(r.get("StatefulSet", f"{fullname()}-{d.role}"))["readinessProbe"]
    if "grpc" in probe:
        cmd = [f"--target=127.0.0.1:{d.ports['grpc']}", f"--service={probe['grpc']['service']}"]
    else:
        cmd = []
        for a in probe["exec"]["command"][1:]:
            flag, _, value = a.partition("=")
            if flag == "--target":
                value = f"127.0.0.1:{d.ports['grpc']}"
            elif value.startswith("/etc/kvbridge/"):
                value = str(d.files[value])
            cmd.append(f"{flag}={value}")
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *cmd],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in reversed(started):
        d.stop()


def test_cpu_release_serves_a_first_request(daemons: list[Daemon], tmp_path: Path) -> None:
    r = render("cpu-insecure")
    prefill = Daemon(r, "prefill", tmp_path)
    daemons.append(prefill)
    prefill.wait_ready()
    grpc_port = json.loads(prefill.ready_file.read_text())["grpc_port"]
    assert grpc_port == prefill.ports["grpc"]
    decode = Daemon(r, "decode", tmp_path, prefill=[f"127.0.0.1:{grpc_port}"])
    daemons.append(decode)
    decode.wait_ready()
    for d in (prefill, decode):
        probe = _probe(d, r)
        assert probe.returncode == 0, probe.stderr
    # the first request, as NOTES.txt words it, sent through the decode daemon
    (generate,) = note_commands(notes("cpu-insecure"), "kvbridge")
    target = arg_values(generate, "--target")[0]
    generate = [a if a != target else f"127.0.0.1:{decode.ports['grpc']}" for a in generate]
    out = subprocess.run(
        [sys.executable, "-m", "kvbridge.connector.serving.cli", *generate],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip()
    # SIGTERM drains and exits 0 well inside terminationGracePeriodSeconds (kubelet's wait)
    grace = r.values["terminationGracePeriodSeconds"]
    codes = {}
    for d in (decode, prefill):
        t0 = time.monotonic()
        codes[d.role] = d.stop()
        assert time.monotonic() - t0 < grace, f"{d.role} took longer than the grace period"
        assert '"msg": "stopped"' in d.output(), f"{d.role} did not drain:\n{d.output()[-2000:]}"
    assert codes == {"decode": 0, "prefill": 0}, f"exit codes after a clean drain: {codes}"


def test_authenticated_release_passes_its_exec_probe(daemons: list[Daemon], tmp_path: Path) -> None:
    """Default auth (generated TLS + token + side secret) on CPU daemons: both pass their
    exec probe, and the first request of NOTES.txt (TLS, client cert, token) is served."""
    r = render("default", ("gpu.enabled=false", "config.device=cpu", "config.num_blocks=64"))
    prefill = Daemon(r, "prefill", tmp_path)
    daemons.append(prefill)
    prefill.wait_ready()
    probe = _probe(prefill, r)
    assert probe.returncode == 0, probe.stderr
    decode = Daemon(r, "decode", tmp_path, prefill=[f"127.0.0.1:{prefill.ports['grpc']}"])
    daemons.append(decode)
    decode.wait_ready()
    assert _probe(decode, r).returncode == 0
    (generate,) = note_commands(notes("default"), "kvbridge")
    target = arg_values(generate, "--target")[0]
    args = []
    for a in generate:  # pod paths and the Service name mapped to this machine
        if a == target:
            a = f"127.0.0.1:{decode.ports['grpc']}"
        elif a.startswith("/etc/kvbridge/"):
            a = str(decode.files[a])
        args.append(a)
    out = subprocess.run(
        [sys.executable, "-m", "kvbridge.connector.serving.cli", *args, "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=CALL_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    # without the token the same call is refused
    no_token = [a for a in args if a != arg_values(args, "--auth-token-file")[0]]
    no_token.remove("--auth-token-file")
    out = subprocess.run(
        [sys.executable, "-m", "kvbridge.connector.serving.cli", *no_token],
        capture_output=True, text=True, timeout=CALL_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr

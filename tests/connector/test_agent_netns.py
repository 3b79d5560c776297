"""Multi-host: two agents in two network namespaces joined by a veth pair.

The holder lives at 10.77.0.2, the reader at 10.77.0.1; the handshake, the
engine's traffic and the notice all cross the veth. NIXL is pinned to UCX's TCP
transport on the veth (shared memory would bypass the network between
namespaces of one kernel). Needs root and ``ip``; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engines import backend_params

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent
ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' tool (iproute2) is not installed")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, veth_a, veth_b = f"kvba{tag}", f"kvbb{tag}", f"kva{tag}", f"kvb{tag}"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
    except subprocess.CalledProcessError as exc:
        subprocess.run(["ip", "netns", "del", ns_a], capture_output=True, timeout=20)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
    try:
        # created inside the namespaces: the pair never shows up in the root namespace,
        # where other processes' UCX contexts enumerate interfaces
        _ip("-n", ns_a, "link", "add", veth_a, "type", "veth", "peer", "name", veth_b,
            "netns", ns_b)  # fmt: skip
        for ns, dev, addr in ((ns_a, veth_a, ADDR_A), (ns_b, veth_b, ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {"a": (ns_a, veth_a), "b": (ns_b, veth_b)}
    finally:
        for ns in (ns_a, ns_b):  # deleting a namespace removes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _spawn(ns: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "UCX_TLS": "tcp,self", "PYTHONUNBUFFERED": "1"}
    cmd = ["ip", "netns", "exec", ns, sys.executable, str(HERE / "netns_peer.py"), *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )


def _wait_ready(proc: subprocess.Popen, timeout: float) -> None:
    """Read the holder's stdout until its ready line (bounded)."""
    deadline = time.monotonic() + timeout
    seen = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(deadline - time.monotonic(), 0)):
                break
            line = proc.stdout.readline()
            if not line:
                break
            if '"ready"' in line:
                return
            seen.append(line)
    raise AssertionError(f"holder did not get ready: {''.join(seen)[-2000:]!r}")


def _last_json(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert lines, f"no result line in output: {text[-2000:]!r}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("backend", backend_params())
def test_pull_across_namespaces(namespaces, backend):
    (ns_a, dev_a), (ns_b, dev_b) = namespaces["a"], namespaces["b"]
    port = "47100" if backend == "nixl" else "47200"
    holder = _spawn(ns_b, "holder", "--backend", backend, "--host", ADDR_B, "--device", dev_b,
                    "--port", port)  # fmt: skip
    try:
        _wait_ready(holder, 60)
        reader = _spawn(ns_a, "reader", "--backend", backend, "--host", ADDR_A, "--device",
                        dev_a, "--peer", f"{ADDR_B}:{port}")  # fmt: skip
        r_out, _ = reader.communicate(timeout=120)
        h_out, _ = holder.communicate(timeout=60)
    finally:
        for proc in (holder, locals().get("reader")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    r, h = _last_json(r_out), _last_json(h_out)
    assert r.get("problem") == "", r
    assert r["bytes"] > 0 and r["peer"] == f"holder-{ADDR_B}"
    assert h["status"] == "done" and h["sender"] == f"reader-{ADDR_A}" and h["unchanged"]
    assert reader.returncode == 0 and holder.returncode == 0

"""Three prefill daemons behind ONE ``--prefill ipv4:A,B,C`` target, one decode daemon.

Every prefill daemon serves requests (their own Stats); a killed one's share moves to
the others with no failed request after the first; the decode daemon's readiness turns
NOT_SERVING while no prefill daemon answers and SERVING again when one is back, while
its liveness stays SERVING; /metrics passes promtool's checks on both roles.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from e2e_cluster import Client, daemon_args
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbridge.connector.serving.client import generate
from kvbridge.connector.serving.daemon.health import LIVENESS_SERVICE
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from metrics_lint import lint

SMALL = [
    "--num-layers", "1", "--hidden-size", "64", "--num-heads", "2", "--num-kv-heads", "1",
    "--head-dim", "32", "--intermediate-size", "64", "--vocab-size", "300",
]  # fmt: skip
PROMPTS = ["the quick brown fox", "jumps over", "the lazy dog", "kv cache"]
BACKEND = "nixl"  # balancing is above the engine; one backend keeps the test short


def _prefill(log_dir, name: str, grpc_port: int) -> DaemonProcess:
    args = daemon_args(BACKEND, "nhd", *SMALL, "--grpc-port", str(grpc_port))
    return DaemonProcess("prefill", args, log_dir, name)


def _health(proc: DaemonProcess, service: str = "") -> int:
    with proc.channel() as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def _wait_health(proc: DaemonProcess, status: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _health(proc) != status:
        assert time.monotonic() < deadline, f"readiness never became {status}"
        time.sleep(0.1)


def _served(clients: list[Client]) -> list[int]:
    return [c.stats().counters.requests_done for c in clients]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("balance")
    ports = [free_port() for _ in range(3)]
    prefills = [_prefill(log_dir, f"p{i}", port).start() for i, port in enumerate(ports)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    decode = DaemonProcess(
        "decode", daemon_args(BACKEND, "nhd", *SMALL, "--prefill", target), log_dir, "d"
    )
    try:
        for p in prefills:
            p.wait_ready(180)
        decode.start().wait_ready(180)
        yield log_dir, ports, prefills, decode
    finally:
        for p in [*prefills, decode]:  # the test may append a restarted prefill daemon
            p.kill()


def test_one_target_spreads_heals_and_readiness_follows(cluster):
    log_dir, ports, prefills, decode = cluster
    d = Client(decode.target)
    p = [Client(pr.target) for pr in prefills]
    try:
        _wait_health(decode, health_pb2.HealthCheckResponse.SERVING)
        # every prefill daemon serves: their own Stats, not the decode daemon's view
        tokens = {}
        for i in range(9):
            prompt = PROMPTS[i % len(PROMPTS)]
            g = generate(d.stub, prompt=prompt, max_new_tokens=3, timeout=60)
            assert tokens.setdefault(prompt, g.token_ids) == g.token_ids  # same model everywhere
        served = _served(p)
        assert sum(served) == 9 and min(served) >= 1, served

        # kill one: the others take its share; at most the first request after it fails
        prefills[0].kill()
        failed = []
        for i in range(8):
            try:
                g = generate(d.stub, prompt=PROMPTS[i % 4], max_new_tokens=3, timeout=60)
                assert g.token_ids == tokens[PROMPTS[i % 4]]
            except grpc.RpcError as exc:
                failed.append((i, exc.code()))
        assert failed in ([], [(0, grpc.StatusCode.UNAVAILABLE)]), failed
        after = _served(p[1:])
        assert sum(after) - sum(served[1:]) == 8 - len(failed), (served, after)
        assert all(a > b for a, b in zip(after, served[1:], strict=True)), (served, after)

        # no prefill daemon left: readiness NOT_SERVING, liveness SERVING, Generate UNAVAILABLE
        for pr in prefills[1:]:
            pr.kill()
        _wait_health(decode, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _health(decode, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            generate(d.stub, prompt="x", max_new_tokens=1, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # one comes back on its address: SERVING again and requests succeed
        back = _prefill(log_dir, "p1-again", ports[1]).start()
        prefills.append(back)  # killed by the fixture
        back.wait_ready(180)
        _wait_health(decode, health_pb2.HealthCheckResponse.SERVING)
        g = generate(d.stub, prompt=PROMPTS[0], max_new_tokens=3, timeout=60)
        assert g.token_ids == tokens[PROMPTS[0]]
        m = decode.metrics()
        assert m["kvbridge_prefill_peers_ready"] == 1
        assert m["kvbridge_requests_total{state=done}"] == d.stats().counters.requests_done
    finally:
        for c in (d, *p):
            c.close()


def test_metrics_pass_promtool_checks(cluster):
    _, _, prefills, decode = cluster
    for proc in (decode, prefills[-1]):
        with urllib.request.urlopen(proc.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        assert lint(text) == [], proc.name
        assert "process_resident_memory_bytes" in text and "_created" not in text
        assert f'kvbridge_requests_total{{role="{proc.role}",state="failed"}}' in text

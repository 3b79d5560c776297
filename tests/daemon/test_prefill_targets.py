"""``--prefill`` target URIs, DNS re-resolution and health-checked readiness of the pool."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kvbridge.connector.serving.daemon.health import (
    LIVENESS_SERVICE,
    READINESS_SERVICES,
    SERVICE_NAME,
    HealthState,
)
from kvbridge.connector.serving.daemon.prefill_pool import PrefillPool
from kvbridge.connector.serving.daemon.targets import parse_target


@pytest.mark.parametrize(
    ("text", "name", "port", "addresses"),
    [
        ("10.0.0.1:50051", "", 0, ("10.0.0.1:50051",)),
        ("[::1]:7", "", 0, ("[::1]:7",)),
        ("prefill-0.ns.svc:50051", "prefill-0.ns.svc", 50051, ()),
        ("dns:///prefill-headless.ns.svc:50051", "prefill-headless.ns.svc", 50051, ()),
        ("dns://8.8.8.8/prefill.ns:1", "prefill.ns", 1, ()),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "", 0, ("10.0.0.1:1", "10.0.0.2:2")),
        ("ipv6:[::1]:1,[fe80::1]:2", "", 0, ("[::1]:1", "[fe80::1]:2")),
    ],
)
def test_targets_parse(text, name, port, addresses):
    t = parse_target(text)
    assert (t.name, t.port, t.addresses) == (name, port, addresses)
    assert t.dynamic == bool(name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nohostport", "HOST:PORT"),
        ("host:0", "outside 1..65535"),
        ("host:x", "not a number"),
        ("ipv4:10.0.0.1:1,[::1]:2", "not an IPV4 address"),
        ("ipv4:somehost:1", "not an IPV4 address"),
        ("unix:/tmp/sock", "use HOST:PORT"),
        ("http://a:1", "use HOST:PORT"),
        ("::1:50051", r"\[ADDRESS\]:PORT"),
    ],
)
def test_targets_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_target(text)


def test_dns_names_are_re_resolved_and_each_address_is_a_peer():
    answers = {"prefill.ns": ["10.0.0.1:5", "10.0.0.2:5"]}
    pool = PrefillPool(["dns:///prefill.ns:5", "10.0.0.9:6"], resolver=lambda n, p: answers[n])
    assert pool.targets == ["10.0.0.1:5", "10.0.0.2:5", "10.0.0.9:6"]
    with pool.use("10.0.0.2:5"):
        answers["prefill.ns"] = ["10.0.0.3:5"]  # a pod left, another came
        pool.resolve()
        assert pool.targets == ["10.0.0.3:5", "10.0.0.9:6"]
    answers["prefill.ns"] = []  # a DNS hiccup keeps the last answer
    pool.resolve()
    assert pool.targets == ["10.0.0.3:5", "10.0.0.9:6"]
    assert pool.served() == {"10.0.0.2:5": 1}
    pool.close()


def _health_server() -> tuple[grpc.Server, health.HealthServicer, int]:
    server = grpc.server(ThreadPoolExecutor(4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, port


def test_pool_readiness_follows_the_prefill_health_checks():
    server, servicer, port = _health_server()
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    seen: list[bool] = []
    changed = threading.Event()

    def on_ready(ready: bool) -> None:
        seen.append(ready)
        changed.set()

    dead = "127.0.0.1:1"  # nothing listens there
    pool = PrefillPool([dead, f"127.0.0.1:{port}"], on_ready=on_ready, probe_seconds=0.2)
    pool.start()
    try:
        assert seen == [False] and not pool.ready and pool.num_ready() == 0
        changed.clear()
        servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        assert changed.wait(10) and seen == [False, True] and pool.num_ready() == 1
        assert all(pool.order()[0] == f"127.0.0.1:{port}" for _ in range(4))  # dead one last
        changed.clear()
        server.stop(None)
        assert changed.wait(10) and seen == [False, True, False]
    finally:
        pool.close()
        server.stop(None)


def test_health_state_liveness_survives_the_drain():
    servicer = health.HealthServicer()
    state = HealthState(servicer)

    def status(name: str) -> int:
        return servicer.Check(health_pb2.HealthCheckRequest(service=name), None).status

    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert [status(n) for n in READINESS_SERVICES] == [not_serving] * 2
    assert status(LIVENESS_SERVICE) == serving
    state.set_ready(True)
    assert [status(n) for n in READINESS_SERVICES] == [serving] * 2
    state.drain()
    state.set_ready(True)  # a late prefill-pool update does not undo the drain
    assert [status(n) for n in READINESS_SERVICES] == [not_serving] * 2
    assert status(LIVENESS_SERVICE) == serving

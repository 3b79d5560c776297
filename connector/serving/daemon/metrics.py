"""Prometheus metrics of a daemon, in a registry of its own, served on ``/metrics``.

The Prometheus metrics are the daemon's only counters: ``Stats`` reads its counters
from them (``DaemonMetrics.stats_counters``). Each role exports its own set (a
prefill daemon has no pull metrics, a decode daemon no lease metrics); a metric a
role does not export still exists, in a registry nobody serves, so code may count
it. Labelled series are created at zero (``requests_total{state}`` is there before
the first request); the process (RSS, CPU, fds), platform and GC collectors are
added; ``_created`` series are not exported. Units are in the names and, in the
OpenMetrics format, in the ``# UNIT`` metadata.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, fields
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

disable_created_metrics()  # process-wide: no *_created series

TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REQUEST_STATES = ("done", "failed")
_BOTH = ("prefill", "decode")

# field: (kind, name, help, unit, roles)
_SPECS: dict[str, tuple[str, str, str, str, tuple[str, ...]]] = {
    "transfer_bytes": (
        "counter", "kvbridge_transfer_bytes", "KV bytes pulled", "bytes", ("decode",)
    ),
    "transfer_descriptors": (
        "counter", "kvbridge_transfer_descriptors", "transfer descriptors posted", "", ("decode",)
    ),
    "transfer_seconds": (
        "histogram", "kvbridge_transfer_seconds", "seconds per KV pull", "seconds", ("decode",)
    ),
    "transfer_failures": (
        "counter", "kvbridge_transfer_failures", "failed KV pulls", "", ("decode",)
    ),
    "lease_expiries": (
        "counter", "kvbridge_lease_expiries", "block leases that expired", "", ("prefill",)
    ),
    "leases_released": (
        "counter", "kvbridge_leases_released",
        "block leases ended by release or notification", "", ("prefill",),
    ),
    "requests": ("counter", "kvbridge_requests", "finished requests by state", "", _BOTH),
    "tokens_generated": (
        "counter", "kvbridge_tokens_generated", "tokens generated", "", ("decode",)
    ),
    "blocks_in_use": ("gauge", "kvbridge_blocks_in_use", "KV cache blocks allocated", "", _BOTH),
    "blocks_leased": (
        "gauge", "kvbridge_blocks_leased", "KV cache blocks leased to peers", "", ("prefill",)
    ),
    "requests_in_flight": (
        "gauge", "kvbridge_requests_in_flight", "requests not yet finished", "", _BOTH
    ),
    "corrupt_transfers": (
        "counter", "kvbridge_corrupt_transfers",
        "pulled KV that failed its checksum (verify_kv)", "", ("decode",),
    ),
    "transfer_retries": (
        "counter", "kvbridge_transfer_retries", "failed pulls retried", "", ("decode",)
    ),
    "auth_failures": (
        "counter", "kvbridge_auth_failures",
        "gRPC calls refused for a missing or wrong token", "", _BOTH,
    ),
    "cancellations": (
        "counter", "kvbridge_cancellations",
        "requests ended because the caller cancelled or went away (not failures)", "", _BOTH,
    ),
    "blocks_quarantined": (
        "gauge", "kvbridge_blocks_quarantined",
        "blocks withheld until an aborted transfer can no longer write them", "", _BOTH,
    ),
    "threads": ("gauge", "kvbridge_threads", "live Python threads of the daemon", "", _BOTH),
    "prefill_peers_ready": (
        "gauge", "kvbridge_prefill_peers_ready",
        "prefill addresses whose last health check answered SERVING", "", ("decode",),
    ),
}  # fmt: skip

# Stats counter -> (metric field, sample suffix)
_STATS = {
    "transfers": ("transfer_seconds", "_count"),
    "bytes_transferred": ("transfer_bytes", "_total"),
    "descriptors": ("transfer_descriptors", "_total"),
    "transfer_seconds": ("transfer_seconds", "_sum"),
    "transfer_failures": ("transfer_failures", "_total"),
    "lease_expiries": ("lease_expiries", "_total"),
    "leases_released": ("leases_released", "_total"),
    "tokens_generated": ("tokens_generated", "_total"),
    "corrupt_transfers": ("corrupt_transfers", "_total"),
    "transfer_retries": ("transfer_retries", "_total"),
    "auth_failures": ("auth_failures", "_total"),
    "cancellations": ("cancellations", "_total"),
}


def sample_value(metric, suffix: str) -> float:
    """The value of a labelled metric's sample ending in ``suffix`` (``_total``, ``_sum``)."""
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith(suffix):
                return s.value
    return 0.0


@dataclass
class DaemonMetrics:
    """Every metric a daemon may count (names prefixed ``kvbridge_``), labelled ``role``."""

    registry: CollectorRegistry
    role: str
    transfer_bytes: Counter
    transfer_descriptors: Counter
    transfer_seconds: Histogram
    transfer_failures: Counter
    lease_expiries: Counter
    leases_released: Counter
    requests: Counter  # labels role, state (the parent)
    tokens_generated: Counter
    blocks_in_use: Gauge
    blocks_leased: Gauge
    requests_in_flight: Gauge
    corrupt_transfers: Counter
    transfer_retries: Counter
    auth_failures: Counter
    cancellations: Counter
    blocks_quarantined: Gauge
    threads: Gauge
    prefill_peers_ready: Gauge
    peer_bandwidth: Gauge  # labels role, peer, op

    def set_path(self, role: str, peer: str, read_bps: float, write_bps: float) -> None:
        """The probed rates of the path to ``peer`` (0 for a direction that failed)."""
        self.peer_bandwidth.labels(role=role, peer=peer, op="read").set(read_bps)
        self.peer_bandwidth.labels(role=role, peer=peer, op="write").set(write_bps)

    @classmethod
    def create(cls, role: str) -> DaemonMetrics:
        reg, unexported = CollectorRegistry(), CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            reg.register(collector)
        made: dict[str, object] = {}
        for key, (kind, name, doc, unit, roles) in _SPECS.items():
            target = reg if role in roles else unexported
            if kind == "histogram":
                m = Histogram(
                    name, doc, ("role",), unit=unit, buckets=TRANSFER_BUCKETS, registry=target
                )
            elif kind == "gauge":
                m = Gauge(name, doc, ("role",), unit=unit, registry=target)
            elif key == "requests":
                m = Counter(name, doc, ("role", "state"), unit=unit, registry=target)
                for state in REQUEST_STATES:
                    m.labels(role=role, state=state)  # present at 0 from the start
            else:
                m = Counter(name, doc, ("role",), unit=unit, registry=target)
            made[key] = m if key == "requests" else m.labels(role=role)
        made["peer_bandwidth"] = Gauge(
            "kvbridge_peer_bandwidth_bytes_per_second",
            "probed rate of the path to a peer at handshake (0: the direction failed)",
            ("role", "peer", "op"),
            registry=reg,
        )
        return cls(registry=reg, role=role, **made)

    def finished(self, role: str, state: str) -> None:
        self.requests.labels(role=role, state=state).inc()

    def count_transfer(self, nbytes: int, descriptors: int, seconds: float) -> None:
        """One finished KV pull."""
        self.transfer_bytes.inc(nbytes)
        self.transfer_descriptors.inc(descriptors)
        self.transfer_seconds.observe(seconds)

    def stats_counters(self) -> dict[str, float]:
        """The ``Stats`` counters, read from these metrics."""
        out = {k: sample_value(getattr(self, f), suf) for k, (f, suf) in _STATS.items()}
        for state in REQUEST_STATES:
            child = self.requests.labels(role=self.role, state=state)
            out[f"requests_{state}"] = sample_value(child, "_total")
        return out

    @property
    def names(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in ("registry", "role")]


def serve_metrics(metrics: DaemonMetrics | CollectorRegistry, host: str, port: int):
    """Serve ``/metrics`` over HTTP in a daemon thread; returns ``(server, bound_port)``.

    ``port`` 0 picks a free port. Stop with ``server.shutdown()``: the serving loop polls
    every 50 ms (``prometheus_client.start_http_server`` polls every 0.5 s, which a
    daemon's shutdown would wait for).
    """
    registry = metrics if isinstance(metrics, CollectorRegistry) else metrics.registry
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]  # fmt: skip

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Quiet)
    threading.Thread(
        target=server.serve_forever, args=(0.05,), name="kvbridge-metrics", daemon=True
    ).start()
    return server, server.server_port


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args) -> None:
        pass

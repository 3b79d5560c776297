"""Prometheus metrics of a daemon, in a registry of its own, served on ``/metrics``."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class DaemonMetrics:
    """Every metric a daemon exports (names prefixed ``kvbridge_``)."""

    registry: CollectorRegistry
    transfer_bytes: Counter
    transfer_descriptors: Counter
    transfer_seconds: Histogram
    transfer_failures: Counter
    lease_expiries: Counter
    leases_released: Counter
    requests: Counter
    tokens_generated: Counter
    blocks_in_use: Gauge
    blocks_leased: Gauge
    requests_in_flight: Gauge
    corrupt_transfers: Counter
    transfer_retries: Counter
    auth_failures: Counter
    blocks_quarantined: Gauge
    threads: Gauge
    peer_bandwidth: Gauge  # labels role, peer, op

    def set_path(self, role: str, peer: str, read_bps: float, write_bps: float) -> None:
        """The probed rates of the path to ``peer`` (0 for a direction that failed)."""
        self.peer_bandwidth.labels(role=role, peer=peer, op="read").set(read_bps)
        self.peer_bandwidth.labels(role=role, peer=peer, op="write").set(write_bps)

    @classmethod
    def create(cls, role: str) -> DaemonMetrics:
        reg = CollectorRegistry()
        labels = {"role": role}

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            c = Counter(name, doc, ("role", *extra), registry=reg)
            return c if extra else c.labels(**labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ("role",), registry=reg).labels(**labels)

        return cls(
            registry=reg,
            transfer_bytes=counter("kvbridge_transfer_bytes", "KV bytes moved by transfers"),
            transfer_descriptors=counter(
                "kvbridge_transfer_descriptors", "transfer descriptors posted"
            ),
            transfer_seconds=Histogram(
                "kvbridge_transfer_seconds",
                "seconds per KV transfer",
                ("role",),
                buckets=TRANSFER_BUCKETS,
                registry=reg,
            ).labels(**labels),
            transfer_failures=counter("kvbridge_transfer_failures", "failed KV transfers"),
            lease_expiries=counter("kvbridge_lease_expiries", "block leases that expired"),
            leases_released=counter(
                "kvbridge_leases_released", "block leases ended by release or notification"
            ),
            requests=counter("kvbridge_requests", "finished requests by state", ("state",)),
            tokens_generated=counter("kvbridge_tokens_generated", "tokens generated"),
            blocks_in_use=gauge("kvbridge_blocks_in_use", "KV cache blocks allocated"),
            blocks_leased=gauge("kvbridge_blocks_leased", "KV cache blocks leased to peers"),
            requests_in_flight=gauge("kvbridge_requests_in_flight", "requests not yet finished"),
            corrupt_transfers=counter(
                "kvbridge_corrupt_transfers", "pulled KV that failed its checksum (verify_kv)"
            ),
            transfer_retries=counter("kvbridge_transfer_retries", "failed pulls retried"),
            auth_failures=counter(
                "kvbridge_auth_failures", "gRPC calls refused for a missing or wrong token"
            ),
            blocks_quarantined=gauge(
                "kvbridge_blocks_quarantined",
                "blocks withheld until an aborted transfer can no longer write them",
            ),
            threads=gauge("kvbridge_threads", "live Python threads of the daemon"),
            peer_bandwidth=Gauge(
                "kvbridge_peer_bandwidth_bytes_per_second",
                "probed rate of the path to a peer at handshake (0: the direction failed)",
                ("role", "peer", "op"),
                registry=reg,
            ),
        )

    def finished(self, role: str, state: str) -> None:
        self.requests.labels(role=role, state=state).inc()


def serve_metrics(metrics: DaemonMetrics, host: str, port: int):
    """Serve ``/metrics`` over HTTP in a daemon thread; returns ``(server, bound_port)``.

    ``port`` 0 picks a free port. Stop with ``server.shutdown()``.
    """
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, server.server_port

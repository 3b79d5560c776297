"""The prefill daemons a decode daemon sends work to, and how it picks one."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kvbridge.connector.serving.daemon.security import ClientAuth
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

POLICIES = ("least-loaded", "round-robin")
# A restarted prefill daemon is dialled again within ~2 s (gRPC's default backoff
# grows to 120 s, failing every request meanwhile).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class PrefillPool:
    """gRPC stubs of the ``--prefill`` targets; tracks requests in flight per target.

    ``client``: how to dial them (TLS, client certificate, bearer token); plaintext
    by default.
    """

    def __init__(
        self, targets: list[str], policy: str = "least-loaded", client: ClientAuth | None = None
    ) -> None:
        if not targets:
            raise ValueError("a decode daemon needs at least one --prefill HOST:PORT")
        if policy not in POLICIES:
            raise ValueError(f"unknown prefill policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.targets = list(dict.fromkeys(targets))
        self.policy = policy
        client = client or ClientAuth()
        self._channels = {t: client.channel(t, CHANNEL_OPTIONS) for t in self.targets}
        self.stubs = {t: pb_grpc.KVBridgeServiceStub(c) for t, c in self._channels.items()}
        self._load = dict.fromkeys(self.targets, 0)
        self._served = dict.fromkeys(self.targets, 0)
        self._rr = itertools.count()
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """Targets in the order to try them for the next request."""
        with self._lock:
            start = next(self._rr) % len(self.targets)
            rotated = self.targets[start:] + self.targets[:start]
            if self.policy == "round-robin":
                return rotated
            return sorted(rotated, key=lambda t: self._load[t])  # stable: ties keep rotation

    @contextmanager
    def use(self, target: str) -> Iterator[pb_grpc.KVBridgeServiceStub]:
        """Count a request against ``target`` while the block runs."""
        with self._lock:
            self._load[target] += 1
            self._served[target] += 1
        try:
            yield self.stubs[target]
        finally:
            with self._lock:
                self._load[target] -= 1

    def channel(self, target: str):
        """The gRPC channel of ``target`` (None if unknown): to wait for it to connect."""
        return self._channels.get(target)

    def served(self) -> dict[str, int]:
        with self._lock:
            return dict(self._served)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

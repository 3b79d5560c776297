"""The prefill daemons a decode daemon sends work to, and how it picks one.

Every ``--prefill`` target (targets.py) resolves to one or more addresses; each
address is a peer with its own channel, so a headless Service name or an
``ipv4:`` list spreads requests over every pod instead of pinning one (gRPC's
default ``pick_first`` would). A watcher thread re-resolves DNS names every
``resolve_seconds`` and checks every address's ``grpc.health.v1`` readiness every
``probe_seconds``; ``order()`` puts the addresses that answered SERVING first (by
the policy), then the others as a last resort. ``on_ready(bool)`` is called when
"some prefill daemon is ready" changes (the decode daemon's own readiness).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbridge.connector.serving.daemon.health import SERVICE_NAME
from kvbridge.connector.serving.daemon.security import ClientAuth
from kvbridge.connector.serving.daemon.targets import Resolver, Target, parse_target
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

POLICIES = ("least-loaded", "round-robin")
# A restarted prefill daemon is dialled again within ~2 s (gRPC's default backoff
# grows to 120 s, failing every request meanwhile).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
RESOLVE_SECONDS = 5.0
PROBE_SECONDS = 1.0


@dataclasses.dataclass
class _Peer:
    address: str
    target: Target
    channel: grpc.Channel
    stub: pb_grpc.KVBridgeServiceStub
    health: health_pb2_grpc.HealthStub
    up: bool | None = None  # None: not probed yet
    load: int = 0
    served: int = 0


class PrefillPool:
    """Peers of the ``--prefill`` targets; tracks requests in flight per address.

    ``client``: how to dial them (TLS, client certificate, bearer token); plaintext
    by default. ``resolver(name, port)``: addresses of a DNS name (tests).
    """

    def __init__(
        self,
        targets: list[str],
        policy: str = "least-loaded",
        client: ClientAuth | None = None,
        *,
        on_ready: Callable[[bool], None] | None = None,
        resolver: Resolver | None = None,
        client_source: Callable[[], tuple[int, ClientAuth]] | None = None,
        resolve_seconds: float = RESOLVE_SECONDS,
        probe_seconds: float = PROBE_SECONDS,
    ) -> None:
        if not targets:
            raise ValueError("a decode daemon needs at least one --prefill target")
        if policy not in POLICIES:
            raise ValueError(f"unknown prefill policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.policy = policy
        self._targets = [parse_target(t) for t in dict.fromkeys(targets)]
        self._client = client or ClientAuth()
        self._resolver = resolver
        self._resolve_seconds, self._probe_seconds = resolve_seconds, probe_seconds
        self._on_ready = on_ready
        self._client_source = client_source  # (generation, credentials): rotated certificates
        self._client_generation = client_source()[0] if client_source else 0
        self._ready: bool | None = None
        self._peers: dict[str, _Peer] = {}  # active addresses, in target order
        self._retired: dict[str, _Peer] = {}  # gone from DNS; closed once idle
        self._old: list[_Peer] = []  # replaced by new credentials; closed once idle
        self._served: dict[str, int] = {}
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.resolve()

    # ----------------------------------------------------------- addresses
    def _channel(self, address: str, target: Target) -> grpc.Channel:
        client = self._client
        if target.dynamic and client.tls and not client.server_name:
            client = dataclasses.replace(client, server_name=target.name)  # the cert's name
        return client.channel(address, CHANNEL_OPTIONS)

    def resolve(self) -> None:
        """Re-resolve the targets: new addresses get a channel, vanished ones retire.

        A DNS name that resolves to nothing keeps its previous addresses (a DNS
        hiccup must not empty the pool; the health probes mark dead ones down).
        """
        with self._lock:
            old = dict(self._peers)
        found: dict[str, Target] = {}
        for t in self._targets:
            addrs = t.resolve(self._resolver) or [a for a, p in old.items() if p.target is t]
            for a in addrs:
                found.setdefault(a, t)
        with self._lock:
            peers: dict[str, _Peer] = {}
            for a, t in found.items():
                peer = self._peers.get(a) or self._retired.pop(a, None)
                if peer is None:
                    ch = self._channel(a, t)
                    stub, health = pb_grpc.KVBridgeServiceStub(ch), health_pb2_grpc.HealthStub(ch)
                    peer = _Peer(a, t, ch, stub, health)
                peers[a] = peer
            for a, p in self._peers.items():
                if a not in peers:
                    self._retired[a] = p
            self._peers = peers
            for a, p in list(self._retired.items()):
                if p.load == 0:
                    p.channel.close()
                    del self._retired[a]
            self._close_idle_old()

    def _close_idle_old(self) -> None:
        """Close replaced channels whose requests are done (lock held)."""
        for p in [p for p in self._old if p.load == 0]:
            p.channel.close()
            self._old.remove(p)

    def set_client(self, client: ClientAuth) -> None:
        """Dial with new credentials (a rotated certificate): a new channel per address;
        the old ones close once their requests are done."""
        with self._lock:
            self._client = client
            self._old += [*self._peers.values(), *self._retired.values()]
            self._retired.clear()
            fresh: dict[str, _Peer] = {}
            for a, p in self._peers.items():
                ch = self._channel(a, p.target)
                stub, health = pb_grpc.KVBridgeServiceStub(ch), health_pb2_grpc.HealthStub(ch)
                fresh[a] = _Peer(a, p.target, ch, stub, health, up=p.up)
            self._peers = fresh
            self._close_idle_old()

    @property
    def targets(self) -> list[str]:
        """The addresses requests go to now."""
        with self._lock:
            return list(self._peers)

    # -------------------------------------------------------------- health
    def probe(self, timeout: float | None = None) -> bool:
        """Check every address's readiness once (in parallel); True if any is SERVING."""
        timeout = self._probe_seconds if timeout is None else timeout
        with self._lock:
            peers = list(self._peers.values())
        calls = [
            (p, p.health.Check.future(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout))
            for p in peers
        ]
        for peer, call in calls:
            try:
                peer.up = call.result().status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                peer.up = False
        ready = any(p.up for p in peers)
        if ready != self._ready:
            self._ready = ready
            if self._on_ready is not None:
                self._on_ready(ready)
        return ready

    @property
    def ready(self) -> bool:
        return bool(self._ready)

    def num_ready(self) -> int:
        """Addresses whose last health check answered SERVING."""
        with self._lock:
            return sum(1 for p in self._peers.values() if p.up)

    def start(self) -> PrefillPool:
        """Probe once now, then re-resolve and probe in a background thread."""
        self.probe()
        self._thread = threading.Thread(target=self._watch, name="kvbridge-prefill-watch")
        self._thread.daemon = True
        self._thread.start()
        return self

    def _watch(self) -> None:
        next_resolve = 0.0
        ticks = 0.0
        while not self._stop.wait(self._probe_seconds):
            ticks += self._probe_seconds
            try:
                if self._client_source is not None:
                    generation, client = self._client_source()
                    if generation != self._client_generation:
                        self._client_generation = generation
                        self.set_client(client)
                if ticks >= next_resolve and any(t.dynamic for t in self._targets):
                    self.resolve()
                    next_resolve = ticks + self._resolve_seconds
                self.probe()
                with self._lock:
                    self._close_idle_old()
            except Exception:  # keep watching; a failure here must not end readiness updates
                continue

    # ------------------------------------------------------------- routing
    def order(self) -> list[str]:
        """Addresses in the order to try them for the next request (ready ones first)."""
        with self._lock:
            addrs = list(self._peers)
            if not addrs:
                return []
            start = next(self._rr) % len(addrs)
            rotated = addrs[start:] + addrs[:start]
            down = [a for a in rotated if self._peers[a].up is False]
            up = [a for a in rotated if self._peers[a].up is not False]
            if self.policy == "least-loaded":  # stable: ties keep the rotation
                up.sort(key=lambda a: self._peers[a].load)
                down.sort(key=lambda a: self._peers[a].load)
            return up + down

    @contextmanager
    def use(self, address: str) -> Iterator[pb_grpc.KVBridgeServiceStub]:
        """Count a request against ``address`` while the block runs."""
        with self._lock:
            peer = self._peers.get(address) or self._retired[address]
            peer.load += 1
            self._served[address] = self._served.get(address, 0) + 1
        try:
            yield peer.stub
        finally:
            with self._lock:
                peer.load -= 1

    def mark_down(self, address: str) -> None:
        """A call to ``address`` found it unavailable: try it last until a probe says SERVING."""
        with self._lock:
            peer = self._peers.get(address)
            if peer is not None:
                peer.up = False

    def channel(self, address: str) -> grpc.Channel | None:
        """The gRPC channel of ``address`` (None if unknown): to wait for it to connect."""
        with self._lock:
            peer = self._peers.get(address)
            return None if peer is None else peer.channel

    def served(self) -> dict[str, int]:
        """Requests sent to each address so far."""
        with self._lock:
            return dict(self._served)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        with self._lock:
            for p in [*self._peers.values(), *self._retired.values(), *self._old]:
                p.channel.close()

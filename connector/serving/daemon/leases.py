"""Leases on blocks a prefill daemon holds for a peer.

A lease ends exactly once: on the peer's completion notification, on a Release
RPC, or when it expires (the reaper thread). Ending a lease frees its blocks.

Release is idempotent by request id and may arrive before the lease: a release of
an id with no lease leaves a *tombstone* (``TOMBSTONE_SECONDS``) and a later
``grant`` for that id is refused (``LeaseRevokedError``), so a peer that gave up
on a Prefill call never pins blocks until expiry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvbridge.connector.serving.daemon.allocator import BlockAllocator

TOMBSTONE_SECONDS = 30.0  # how long a release of an unknown id is remembered
MAX_TOMBSTONES = 65536


class LeaseRevokedError(ValueError):
    """The peer released the request before its lease was granted."""


@dataclass
class Lease:
    request_id: str
    block_ids: list[int]
    owner: str
    expires_at: float  # time.monotonic()
    expires_unix: float  # time.time(), for the wire
    end_reason: str = ""

    def seconds_left(self, now: float | None = None) -> float:
        return max(0.0, self.expires_at - (time.monotonic() if now is None else now))


class LeaseTable:
    """Live leases keyed by request id; frees blocks through ``allocator``."""

    def __init__(
        self,
        allocator: BlockAllocator,
        on_end: Callable[[Lease], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allocator = allocator
        self._on_end = on_end
        self._clock = clock
        self._lock = threading.Lock()
        self._empty = threading.Condition(self._lock)
        self._leases: dict[str, Lease] = {}
        self._tombstones: dict[str, float] = {}  # request id -> forget after (clock)
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()

    def grant(self, request_id: str, block_ids: list[int], owner: str, ttl: float) -> Lease:
        """Lease already-allocated ``block_ids`` to ``owner`` for ``ttl`` seconds."""
        if ttl <= 0:
            raise ValueError(f"lease length must be positive, got {ttl}")
        now = self._clock()
        lease = Lease(request_id, list(block_ids), owner, now + ttl, time.time() + ttl)
        with self._lock:
            if self._tombstones.pop(request_id, None) is not None:
                raise LeaseRevokedError(
                    f"request {request_id!r} was released by its peer before the lease"
                )
            if request_id in self._leases:
                raise ValueError(f"request {request_id!r} already holds a lease")
            self._leases[request_id] = lease
        return lease

    def release(self, request_id: str, reason: str) -> Lease | None:
        """End the lease of ``request_id``, or remember the release (a tombstone) when it
        has none yet; idempotent. Returns the lease ended, if any."""
        with self._lock:
            if request_id not in self._leases:
                if len(self._tombstones) >= MAX_TOMBSTONES:  # oldest first (insertion order)
                    self._tombstones.pop(next(iter(self._tombstones)))
                self._tombstones[request_id] = self._clock() + TOMBSTONE_SECONDS
                return None
        return self.end(request_id, reason)

    @property
    def num_tombstones(self) -> int:
        with self._lock:
            return len(self._tombstones)

    def end(self, request_id: str, reason: str) -> Lease | None:
        """End the lease of ``request_id`` (free its blocks); None if it has none."""
        with self._empty:
            lease = self._leases.pop(request_id, None)
            if lease is None:
                return None
            lease.end_reason = reason
            self.allocator.free(lease.block_ids)
            if not self._leases:
                self._empty.notify_all()
        if self._on_end is not None:
            self._on_end(lease)
        return lease

    def expire_due(self) -> list[Lease]:
        """End every lease past its expiry; returns them."""
        now = self._clock()
        with self._lock:
            due = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
            for rid in [r for r, until in self._tombstones.items() if until <= now]:
                del self._tombstones[rid]
        ended = [self.end(rid, "expired") for rid in due]
        return [lease for lease in ended if lease is not None]

    def get(self, request_id: str) -> Lease | None:
        with self._lock:
            return self._leases.get(request_id)

    @property
    def num_leases(self) -> int:
        with self._lock:
            return len(self._leases)

    @property
    def leased_blocks(self) -> int:
        with self._lock:
            return sum(len(lease.block_ids) for lease in self._leases.values())

    def wait_empty(self, timeout: float) -> bool:
        """Wait until no lease is live; False on timeout."""
        with self._empty:
            return self._empty.wait_for(lambda: not self._leases, timeout=timeout)

    def start_reaper(self, interval: float = 0.25) -> None:
        """Expire leases every ``interval`` seconds in a daemon thread."""
        if self._reaper is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                self.expire_due()

        self._reaper = threading.Thread(target=run, name="kvbridge-lease-reaper", daemon=True)
        self._reaper.start()

    def stop_reaper(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout)
            self._reaper = None

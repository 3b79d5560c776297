"""The transport interface: raw memory regions, descriptor arrays, bounded waits.

A transport knows nothing about layouts. It registers memory regions (one engine
call per region), learns a peer's engine metadata and regions, and moves
descriptor arrays given as ``(region index, offset, nbytes)`` int64 numpy arrays on
both sides (exactly what ``TransferPlan`` holds). Every descriptor is checked
against its region before anything is posted, so no byte outside a registered
region is ever read or written. Waits are bounded; a failed or timed-out transfer
releases its engine handles before the error is raised.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from kvbridge.connector.transfer.errors import (
    DescriptorError,
    EngineUnavailableError,
    TransferFailedError,
    TransferTimeoutError,
    UnknownPeerError,
)

Op = Literal["READ", "WRITE"]
OPS = ("READ", "WRITE")


def import_engine(module: str, pip_name: str, backend: str):
    """Import an engine module lazily; a missing package names what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineUnavailableError(
            f"the {backend} backend needs the {pip_name!r} package "
            f"(pip install {pip_name}); importing {module!r} failed: {exc}"
        ) from exc


@dataclass(frozen=True)
class MemRegion:
    """A span of memory to register: base address, length, device (``cpu``, ``cuda:N``)."""

    addr: int
    nbytes: int
    device: str = "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_index(self) -> int:
        """CUDA ordinal (0 for host memory)."""
        if not self.is_cuda:
            return 0
        _, _, idx = self.device.partition(":")
        return int(idx or 0)


class RegionTable:
    """Base addresses and sizes of a side's regions, for vectorised bounds checks."""

    def __init__(self, regions: Sequence[MemRegion | None], side: str):
        self.side = side
        self.regions = list(regions)
        live = [r or MemRegion(0, 0) for r in self.regions]
        self.addr = np.array([r.addr for r in live], dtype=np.int64)
        self.nbytes = np.array([r.nbytes for r in live], dtype=np.int64)
        self.device_index = np.array([r.device_index for r in live], dtype=np.int64)
        self.is_cuda = np.array([r.is_cuda for r in live], dtype=bool)

    def __len__(self) -> int:
        return len(self.regions)

    def resolve(self, region: np.ndarray, offset: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Absolute int64 addresses; ``DescriptorError`` naming the first bad descriptor."""
        n = len(self.regions)
        bad_region = (region < 0) | (region >= n)
        if bad_region.any():
            i = int(np.flatnonzero(bad_region)[0])
            raise DescriptorError(
                f"descriptor {i}: {self.side} region {int(region[i])} does not exist "
                f"({n} regions registered)"
            )
        size = self.nbytes[region]
        bad = (offset < 0) | (nbytes <= 0) | (offset > size - nbytes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DescriptorError(
                f"descriptor {i}: {self.side} bytes [{int(offset[i])}, "
                f"{int(offset[i]) + int(nbytes[i])}) outside {self.side} region "
                f"{int(region[i])} of {int(size[i])} bytes"
            )
        return self.addr[region] + offset

    def kinds(self, region: np.ndarray) -> set[bool]:
        """Which memory kinds (``True`` = CUDA) the given regions use."""
        return {bool(x) for x in np.unique(self.is_cuda[region])}


@dataclass(frozen=True, eq=False)
class EngineDescriptors:
    """A request's descriptors after the bounds checks, as the engine hook gets them:
    absolute addresses and device ordinals (int64 arrays) and the memory kind
    (``True`` = CUDA) of each side, and the lengths."""

    local_addr: np.ndarray
    local_dev: np.ndarray
    local_cuda: bool
    remote_addr: np.ndarray
    remote_dev: np.ndarray
    remote_cuda: bool
    nbytes: np.ndarray

    @property
    def cuda(self) -> bool:
        """True when either side is GPU memory."""
        return self.local_cuda or self.remote_cuda


@dataclass(eq=False)
class PendingTransfer:
    """A posted transfer: its engine handle plus what is needed to report on it."""

    op: Op
    peer: str
    descriptors: int
    nbytes: int
    handle: Any
    engine_descriptors: int = 0  # what the engine was given (after any splitting)
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    released: bool = False
    error: TransferFailedError | None = None  # how it failed (raised again by ``check``)
    owner: Any = None  # the transport that posted it (routed transports delegate to it)
    # test hook (``Transport.degrade``): not posted to the engine before ``not_before``
    not_before: float = 0.0
    deferred: tuple | None = None

    @property
    def seconds(self) -> float:
        end = self.finished if self.finished is not None else time.perf_counter()
        return end - self.started


def _as_i64(name: str, a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise DescriptorError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False).reshape(-1)


class Transport(ABC):
    """One engine instance: local registrations, peers, posts, completion, notifications."""

    backend: ClassVar[str] = ""
    #: Longest sleep between two completion checks in ``wait``.
    poll_max_seconds: ClassVar[float] = 500e-6

    @classmethod
    def daemon_options(cls, cfg: Any) -> dict[str, Any]:
        """Constructor options a daemon derives from its configuration.

        ``cfg`` is any object with the daemon config's fields (``transfer_timeout``,
        ``engine_drain_seconds``, ...); the base transport needs none.
        """
        return {}

    def __init__(self, name: str):
        self.name = name
        self._local: list[MemRegion | None] = []
        self._local_handles: list[Any] = []
        self._local_table = RegionTable([], "local")
        self._peers: dict[str, RegionTable] = {}
        self._closed = False
        self._degraded: dict[str, float] = {}
        # registrations from several threads (staging buffers grow while pulls run)
        self._registration = threading.RLock()

    # ------------------------------------------------------------ engine hooks
    @abstractmethod
    def engine_metadata(self) -> bytes:
        """What a peer needs to reach this engine (opaque bytes)."""

    @abstractmethod
    def _register(self, region: MemRegion) -> Any: ...

    @abstractmethod
    def _deregister(self, handle: Any) -> None: ...

    @abstractmethod
    def _add_peer(self, peer: str, engine_metadata: bytes) -> None: ...

    @abstractmethod
    def _remove_peer(self, peer: str) -> None: ...

    @abstractmethod
    def _post(self, op: Op, peer: str, descs: EngineDescriptors, notify: bytes) -> Any:
        """Post one engine request; returns its handle."""

    @abstractmethod
    def _check(self, handle: Any) -> str:
        """``"done"``, ``"pending"`` or ``"failed: <why>"``."""

    @abstractmethod
    def _release(self, handle: Any) -> None: ...

    @abstractmethod
    def _notifications(self) -> list[tuple[str, bytes]]: ...

    @abstractmethod
    def _close(self) -> None: ...

    def path_info(self, peer: str) -> str:
        """What this engine says about its path to ``peer`` (where it can tell)."""
        return self.backend

    def engine_of(self, peer: str) -> Transport:
        """The transport that moves data with ``peer`` (routed transports choose)."""
        return self

    def local_metadata(self) -> bytes:
        """The same-host transport's offer for peers ("" when there is none)."""
        return b""

    def degrade(self, op: Op, bytes_per_second: float) -> None:
        """Test hook: throttle ``op`` to ``bytes_per_second`` (0: every ``op`` fails to post).

        A throttled request reaches the engine only once its bytes would have moved at
        that rate (nothing lands before), so a slow or broken direction can be
        simulated on loopback.
        """
        if op not in OPS or bytes_per_second < 0:
            raise ValueError(f"degrade needs an op in {OPS} and a rate >= 0")
        self._degraded[op] = float(bytes_per_second)

    # ------------------------------------------------------------ registration
    def register_region(self, region: MemRegion) -> int:
        """Register one region with the engine (one call); returns its local index."""
        if region.nbytes <= 0 or region.addr <= 0:
            raise DescriptorError(f"cannot register region {region}: empty or null")
        with self._registration:
            handle = self._register(region)
            self._local.append(region)
            self._local_handles.append(handle)
            self._local_table = RegionTable(self._local, "local")
            return len(self._local) - 1

    def deregister_region(self, index: int) -> None:
        with self._registration:
            if not 0 <= index < len(self._local) or self._local[index] is None:
                raise DescriptorError(f"local region {index} is not registered")
            handle, self._local_handles[index] = self._local_handles[index], None
            self._local[index] = None
            self._local_table = RegionTable(self._local, "local")
        self._deregister(handle)

    @property
    def local_regions(self) -> list[MemRegion | None]:
        return list(self._local)

    # ------------------------------------------------------------------- peers
    def add_peer(
        self,
        peer: str,
        engine_metadata: bytes,
        regions: Sequence[MemRegion],
        local_metadata: bytes = b"",
    ) -> None:
        """Make ``peer`` reachable; ``regions`` are its registered regions, in its order.

        ``local_metadata``: the peer's same-host transport offer (used by routed transports).
        """
        if peer in self._peers:
            self.remove_peer(peer)
        self._add_peer(peer, engine_metadata)
        self._peers[peer] = RegionTable(regions, f"remote ({peer})")

    def remove_peer(self, peer: str) -> None:
        if self._peers.pop(peer, None) is not None:
            self._remove_peer(peer)

    def has_peer(self, peer: str) -> bool:
        return peer in self._peers

    def _peer_table(self, peer: str) -> RegionTable:
        try:
            return self._peers[peer]
        except KeyError:
            raise UnknownPeerError(
                f"{self.backend} transport {self.name!r}: unknown peer {peer!r} "
                f"(connected: {sorted(self._peers) or 'none'})"
            ) from None

    # --------------------------------------------------------------- transfers
    def post(
        self,
        op: Op,
        peer: str,
        local_region,
        local_offset,
        remote_region,
        remote_offset,
        nbytes,
        notify: bytes = b"",
    ) -> PendingTransfer:
        """Check every descriptor against its region, then post one engine request.

        ``op="READ"`` copies remote ranges onto local ranges, ``"WRITE"`` the reverse.
        ``notify`` (bytes) reaches the peer once the data has landed.
        """
        if op not in OPS:
            raise DescriptorError(f"op must be one of {OPS}, got {op!r}")
        if self._closed:
            raise TransferFailedError(f"{self.backend} transport {self.name!r} is closed")
        remote = self._peer_table(peer)
        arrays = [
            _as_i64(n, a)
            for n, a in (
                ("local_region", local_region),
                ("local_offset", local_offset),
                ("remote_region", remote_region),
                ("remote_offset", remote_offset),
                ("nbytes", nbytes),
            )
        ]
        lreg, loff, rreg, roff, nb = arrays
        if len({a.size for a in arrays}) != 1:
            raise DescriptorError(
                "descriptor arrays differ in length: " + ", ".join(str(a.size) for a in arrays)
            )
        if nb.size == 0:
            raise DescriptorError("no descriptors to transfer")
        local = self._local_table
        laddr = local.resolve(lreg, loff, nb)
        raddr = remote.resolve(rreg, roff, nb)
        lkinds, rkinds = local.kinds(lreg), remote.kinds(rreg)
        if len(lkinds) != 1 or len(rkinds) != 1:
            raise DescriptorError("one request cannot mix host and GPU memory on one side")
        descs = EngineDescriptors(
            laddr,
            local.device_index[lreg],
            lkinds.pop(),
            raddr,
            remote.device_index[rreg],
            rkinds.pop(),
            nb,
        )
        engine = self.engine_descriptors(nb, descs.cuda)
        rate = self._degraded.get(op)
        if rate == 0:
            raise TransferFailedError(
                f"{self.backend} {op} with peer {peer!r} failed to post (disabled by a test hook)"
            )
        if rate:
            xfer = PendingTransfer(op, peer, int(nb.size), int(nb.sum()), None, engine, owner=self)
            xfer.not_before = xfer.started + xfer.nbytes / rate
            xfer.deferred = (op, peer, descs, bytes(notify))
            return xfer
        handle = self._post(op, peer, descs, bytes(notify))
        return PendingTransfer(op, peer, int(nb.size), int(nb.sum()), handle, engine, owner=self)

    def engine_descriptors(self, nbytes: np.ndarray, cuda: bool) -> int:
        """How many descriptors the engine gets for these (backends that split override)."""
        return int(nbytes.size)

    def check(self, xfer: PendingTransfer) -> bool:
        """True once complete; a failure releases the handle and raises."""
        if xfer.finished is not None:
            return True
        if xfer.error is not None:  # never ask the engine about a released handle
            raise xfer.error
        if xfer.deferred is not None:  # throttled by the test hook
            if time.perf_counter() < xfer.not_before:
                return False
            args, xfer.deferred = xfer.deferred, None
            try:
                xfer.handle = self._post(*args)
            except TransferFailedError as exc:
                xfer.released, xfer.error = True, exc
                raise
        state = self._check(xfer.handle)
        if state == "done":
            xfer.finished = time.perf_counter()
            self.release(xfer)
            return True
        if state == "pending":
            return False
        self.release(xfer)
        xfer.error = TransferFailedError(
            f"{self.backend} {xfer.op} of {xfer.descriptors} descriptors ({xfer.nbytes} bytes) "
            f"with peer {xfer.peer!r} failed: {state.removeprefix('failed: ')}"
        )
        raise xfer.error

    def wait(self, xfer: PendingTransfer, timeout: float) -> float:
        """Wait at most ``timeout`` seconds; returns the transfer's seconds.

        On timeout the handle is released (the engine cancels what it can) and
        ``TransferTimeoutError`` is raised.
        """
        deadline = time.perf_counter() + timeout
        pause = min(10e-6, self.poll_max_seconds)
        while not self.check(xfer):
            now = time.perf_counter()
            if now >= deadline:
                self.release(xfer)
                xfer.error = TransferTimeoutError(
                    f"{self.backend} {xfer.op} of {xfer.descriptors} descriptors "
                    f"({xfer.nbytes} bytes) with peer {xfer.peer!r} did not complete in "
                    f"{timeout:.3g} s; released"
                )
                raise xfer.error
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, self.poll_max_seconds)
        return xfer.seconds

    def quiesced(self, xfer: PendingTransfer) -> bool:
        """True once the engine can no longer touch the transfer's memory.

        A completed transfer is quiet; a released one once the engine confirms it
        stopped (``_quiesced``). Until then its destination memory must not be reused.
        """
        if xfer.finished is not None:
            return True
        if not xfer.released:
            return False
        if xfer.handle is None:  # a throttled request that never reached the engine
            return True
        return self._quiesced(xfer.handle)

    def _quiesced(self, handle: Any) -> bool:
        """Engine hook: a released handle's transfer has stopped (default: release cancels)."""
        return True

    def release(self, xfer: PendingTransfer) -> None:
        """Release the engine handle (idempotent; cancels an unfinished transfer)."""
        if not xfer.released:
            xfer.released = True
            xfer.deferred = None
            if xfer.handle is not None:
                self._release(xfer.handle)

    def notifications(self) -> list[tuple[str, bytes]]:
        """New notifications: ``(peer name, message)``, oldest first."""
        return self._notifications()

    # ----------------------------------------------------------------- closing
    def close(self) -> None:
        """Forget peers, deregister every region, stop the engine (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for peer in list(self._peers):
            with contextlib.suppress(Exception):
                self.remove_peer(peer)
        for i, handle in enumerate(self._local_handles):
            if handle is not None:
                with contextlib.suppress(Exception):
                    self._deregister(handle)
                self._local_handles[i] = None
        self._close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

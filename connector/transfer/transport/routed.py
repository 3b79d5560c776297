"""An agent's network engine plus the local transport, chosen per peer.

``RoutedTransport`` registers every region with both; a peer is added to the local
transport when its hello offers one for this host (both sides agree: each offers
only when its own local transport is on) and the mapping works, else to the
network engine. A posted transfer remembers its transport (``PendingTransfer.owner``),
so checks, waits and releases go to the engine that holds it, and notifications
are read from both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from kvbridge.connector.transfer.errors import TransferError
from kvbridge.connector.transfer.transport.base import (
    MemRegion,
    Op,
    PendingTransfer,
    Transport,
)
from kvbridge.connector.transfer.transport.local import LocalTransport

log = logging.getLogger(__name__)


def with_local(primary: Transport, host: str) -> RoutedTransport:
    """``primary`` plus a new local transport (``primary`` is closed if that fails)."""
    try:
        local = LocalTransport(primary.name, host=host)
    except BaseException:
        primary.close()
        raise
    return RoutedTransport(primary, local)


class RoutedTransport(Transport):
    """``primary`` (NIXL, Mooncake) for remote peers, ``local`` for same-host ones."""

    def __init__(self, primary: Transport, local: LocalTransport):
        super().__init__(primary.name)
        self.backend = primary.backend
        self.primary, self.local = primary, local
        self.local_ok = True  # False once a region could not be exported locally
        self._route: dict[str, Transport] = {}

    def engine_metadata(self) -> bytes:
        return self.primary.engine_metadata()

    def local_metadata(self) -> bytes:
        """What a same-host peer needs to reach this agent's local transport ("": none)."""
        return self.local.engine_metadata() if self.local_ok else b""

    def engine_of(self, peer: str) -> Transport:
        """The transport that moves data with ``peer``."""
        return self._route.get(peer, self.primary)

    def path_info(self, peer: str) -> str:
        return self.engine_of(peer).path_info(peer)

    def degrade(self, op: Op, bytes_per_second: float) -> None:
        self.primary.degrade(op, bytes_per_second)
        self.local.degrade(op, bytes_per_second)

    # ------------------------------------------------------------ registration
    def register_region(self, region: MemRegion) -> int:
        with self._registration:  # both engines give the region the same index
            index = self.primary.register_region(region)
            if self.local_ok:
                try:
                    local = self.local.register_region(region)
                except TransferError as exc:  # e.g. memory CUDA IPC cannot export
                    log.warning("local transport off for %s: %s", self.name, exc)
                    self.local_ok = False
                else:
                    if local != index:
                        raise TransferError(
                            f"region indices diverged: {self.backend} {index}, local {local}"
                        )
            return index

    def deregister_region(self, index: int) -> None:
        with self._registration:
            try:
                self.primary.deregister_region(index)
            finally:
                if self.local_ok:
                    self.local.deregister_region(index)

    @property
    def local_regions(self) -> list[MemRegion | None]:
        return self.primary.local_regions

    # ------------------------------------------------------------------- peers
    def add_peer(
        self,
        peer: str,
        engine_metadata: bytes,
        regions: Sequence[MemRegion],
        local_metadata: bytes = b"",
    ) -> None:
        self.remove_peer(peer)
        if self.local_ok and local_metadata and self.local.same_host(local_metadata):
            try:
                self.local.add_peer(peer, local_metadata, regions)
                self._route[peer] = self.local
                return
            except TransferError as exc:
                log.warning("peer %s: local transport unusable (%s); using %s",
                            peer, exc, self.primary.backend)  # fmt: skip
        self.primary.add_peer(peer, engine_metadata, regions)
        self._route[peer] = self.primary

    def remove_peer(self, peer: str) -> None:
        engine = self._route.pop(peer, None)
        if engine is not None:
            engine.remove_peer(peer)

    def has_peer(self, peer: str) -> bool:
        return peer in self._route

    # --------------------------------------------------------------- transfers
    def post(self, op: Op, peer: str, *args, **kw) -> PendingTransfer:
        return self.engine_of(peer).post(op, peer, *args, **kw)

    def engine_descriptors(self, nbytes: np.ndarray, cuda: bool) -> int:
        return self.primary.engine_descriptors(nbytes, cuda)

    def check(self, xfer: PendingTransfer) -> bool:
        return xfer.owner.check(xfer)

    def wait(self, xfer: PendingTransfer, timeout: float) -> float:
        return xfer.owner.wait(xfer, timeout)

    def quiesced(self, xfer: PendingTransfer) -> bool:
        return xfer.owner.quiesced(xfer)

    def release(self, xfer: PendingTransfer) -> None:
        xfer.owner.release(xfer)

    def notifications(self) -> list[tuple[str, bytes]]:
        return self.primary.notifications() + self.local.notifications()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._route.clear()
        try:
            self.primary.close()
        finally:
            self.local.close()

    # the engine hooks belong to the two transports
    def _register(self, region: MemRegion) -> Any:
        raise NotImplementedError

    def _deregister(self, handle: Any) -> None:
        raise NotImplementedError

    def _add_peer(self, peer: str, engine_metadata: bytes) -> None:
        raise NotImplementedError

    def _remove_peer(self, peer: str) -> None:
        raise NotImplementedError

    def _post(self, op, peer, descs, notify) -> Any:
        raise NotImplementedError

    def _check(self, handle: Any) -> str:
        raise NotImplementedError

    def _release(self, handle: Any) -> None:
        raise NotImplementedError

    def _notifications(self) -> list[tuple[str, bytes]]:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

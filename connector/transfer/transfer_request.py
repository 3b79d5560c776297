"""One request between post and finish (``PendingRequest``) and what it moved
(``TransferResult``); ``KVTransferAgent`` creates and completes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvbridge.connector.transfer.peers import Peer
from kvbridge.connector.transfer.staging import StagePlan
from kvbridge.connector.transfer.transport import PendingTransfer


@dataclass(frozen=True)
class TransferResult:
    """What one request moved: wire bytes, engine descriptors, wall seconds."""

    bytes: int
    descriptors: int
    seconds: float
    staged: bool = False
    engine_descriptors: int = 0  # descriptors handed to the engine (NIXL splits big ones)
    op: str = "READ"
    peer: str = ""
    request_id: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(eq=False)
class PendingRequest:
    """A posted request; ``KVTransferAgent.finish`` completes it."""

    op: str
    peer: Peer
    request_id: str
    xfer: PendingTransfer
    started: float
    descriptors: int
    nbytes: int
    staged: StagePlan | None = None
    relayout_args: tuple = ()
    done: bool = False
    relayout_done: Any = None  # CUDA event after a staged read's relayout copies
    _release: Callable[..., None] | None = field(default=None, repr=False)

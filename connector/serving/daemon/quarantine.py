"""Quarantine of blocks an engine may still write.

When a pull fails or is aborted, the engine handle is released; NIXL may refuse to
release a transfer still in progress, and Mooncake has no cancel (a batch in
flight ends at the engine's own timeout). Until the transport confirms the
transfer can no longer touch memory (``Transport.quiesced``), its destination
blocks are held here instead of going back to the free list, so no other request
is ever handed a block that an old transfer may still overwrite.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvbridge.connector.serving.daemon.allocator import BlockAllocator

POLL_SECONDS = 0.05


@dataclass(eq=False)
class _Held:
    block_ids: list[int]
    is_quiet: Callable[[], bool]
    reason: str
    since: float = field(default_factory=time.monotonic)


class Quarantine:
    """Blocks withheld from ``allocator`` until their transfer is confirmed dead."""

    def __init__(self, allocator: BlockAllocator, log: logging.Logger | None = None) -> None:
        self.allocator = allocator
        self.log = log or logging.getLogger(__name__)
        self._held: list[_Held] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.released_total = 0  # blocks that came back out of quarantine

    @property
    def num_blocks(self) -> int:
        with self._cond:
            return sum(len(h.block_ids) for h in self._held)

    def release_or_hold(self, block_ids: list[int], is_quiet: Callable[[], bool], reason: str):
        """Free ``block_ids`` now when ``is_quiet()``, else hold them until it is.

        Returns True when the blocks were freed at once.
        """
        if not block_ids:
            return True
        if self._quiet(is_quiet):
            self.allocator.free(block_ids)
            return True
        with self._cond:
            self._held.append(_Held(list(block_ids), is_quiet, reason))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kvbridge-quarantine", daemon=True
                )
                self._thread.start()
        self.log.warning(
            "blocks quarantined until the engine lets go of them",
            extra={"blocks": len(block_ids), "reason": reason},
        )
        return False

    def _quiet(self, is_quiet: Callable[[], bool]) -> bool:
        try:
            return bool(is_quiet())
        except Exception:  # an engine error while asking: keep the blocks
            self.log.exception("asking the engine whether a transfer is over failed")
            return False

    def poll(self) -> int:
        """Free every held group whose transfer is quiet; returns the blocks freed."""
        with self._cond:
            held = list(self._held)
        freed = 0
        for h in held:
            if not self._quiet(h.is_quiet):
                continue
            with self._cond:
                self._held.remove(h)
                self._cond.notify_all()
            self.allocator.free(h.block_ids)
            freed += len(h.block_ids)
            self.log.info(
                "quarantined blocks freed",
                extra={"blocks": len(h.block_ids), "held_seconds":
                       round(time.monotonic() - h.since, 3), "reason": h.reason},
            )  # fmt: skip
        self.released_total += freed
        return freed

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()
            with self._cond:
                if not self._held:
                    self._thread = None
                    return

    def wait_empty(self, timeout: float) -> bool:
        """Wait (bounded) until nothing is held; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._held:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, POLL_SECONDS))
        return True

    def stop(self) -> None:
        self._stop.set()

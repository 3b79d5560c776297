"""Admission by free blocks and the running set of a decode engine (no gRPC, no torch).

Two halves, both thread-safe:

- ``Admission``: a request asks for the blocks its prompt and its new tokens need.
  It gets them at once when the wait queue is empty and enough blocks are free,
  otherwise it waits in a FIFO queue (the head is served first, so a large request
  is not starved by small ones). A queue at its bound refuses at once
  (``QueueFullError``, RESOURCE_EXHAUSTED for gRPC). A waiter leaves the queue on its
  own timeout or when its ``cancelled()`` turns true.
- ``RunningSet``: sequences whose KV has arrived join (``join``), are handed to the
  engine loop at the next step boundary (``take_changes``), and leave when finished,
  cancelled (``cancel``) or failed, without stopping the others. A slot table keeps
  the active sequences dense in rows ``[0, n)`` of the batch: a leaving sequence's
  row is filled by the last one (``Sequence.slot``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvbridge.connector.serving.daemon.allocator import BlockAllocator, OutOfBlocksError

POLL_SECONDS = 0.05  # waiters also re-check on this period (frees from outside the scheduler)


class QueueFullError(RuntimeError):
    """The admission queue is at its bound."""


class AdmissionCancelledError(RuntimeError):
    """A waiting request was cancelled before it got its blocks."""


@dataclass
class _Waiter:
    request_id: str
    num_blocks: int
    blocks: list[int] | None = None


class Admission:
    """FIFO admission by free blocks, bounded wait queue."""

    def __init__(self, allocator: BlockAllocator, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.allocator = allocator
        self.max_waiting = max_waiting
        self._queue: deque[_Waiter] = deque()
        self._cond = threading.Condition()

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def _grant_head(self) -> None:
        """Give blocks to waiters at the head while they fit (lock held)."""
        while self._queue:
            head = self._queue[0]
            try:
                head.blocks = self.allocator.allocate(head.num_blocks, timeout=0.0)
            except OutOfBlocksError:
                return
            self._queue.popleft()
            self._cond.notify_all()

    def acquire(
        self,
        request_id: str,
        num_blocks: int,
        timeout: float | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> list[int]:
        """Blocks for ``request_id``: now, or after waiting in the queue.

        Raises ``QueueFullError`` when the queue is at its bound, ``OutOfBlocksError``
        when the cache can never hold the request or ``timeout`` passed, and
        ``AdmissionCancelledError`` when ``cancelled()`` became true while waiting.
        """
        if num_blocks > self.allocator.num_blocks:
            raise OutOfBlocksError(
                f"{num_blocks} blocks requested, the cache has {self.allocator.num_blocks}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if not self._queue:
                try:
                    return self.allocator.allocate(num_blocks, timeout=0.0)
                except OutOfBlocksError:
                    pass
            if len(self._queue) >= self.max_waiting:
                raise QueueFullError(
                    f"{len(self._queue)} requests already wait for blocks (the bound); "
                    f"{self.allocator.num_free} of {self.allocator.num_blocks} blocks free"
                )
            me = _Waiter(request_id, num_blocks)
            self._queue.append(me)
            try:
                while True:
                    self._grant_head()
                    if me.blocks is not None:
                        return me.blocks
                    if cancelled():
                        raise AdmissionCancelledError(f"request {request_id} cancelled in queue")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise OutOfBlocksError(
                            f"{num_blocks} blocks requested, {self.allocator.num_free} of "
                            f"{self.allocator.num_blocks} free after waiting {timeout:.1f}s"
                        )
                    wait = POLL_SECONDS if left is None else min(POLL_SECONDS, left)
                    self._cond.wait(wait)
            finally:
                if me.blocks is None and me in self._queue:
                    self._queue.remove(me)
                    self._grant_head()  # the next one may fit now

    def release(self, blocks: list[int]) -> None:
        """Free ``blocks`` and hand them to waiters."""
        with self._cond:
            if blocks:
                self.allocator.free(blocks)
            self._grant_head()

    def poke(self) -> None:
        """Blocks were freed elsewhere (quarantine, another path): serve waiters now."""
        with self._cond:
            self._grant_head()


@dataclass
class SamplingParams:
    """Per-request sampling; ``temperature == 0`` is greedy (the default)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(eq=False)
class Sequence:
    """One generation in the running set. The engine loop alone writes the mutable fields."""

    request_id: str
    blocks: list[int]
    prompt_len: int
    first_token: int
    max_new: int
    stop: frozenset[int] = frozenset()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    emit: Callable[[list[int], str | None, str | None], None] = lambda toks, fin, err: None
    # engine state
    generated: int = 1  # the first token came from the prefill
    slot: int = -1
    finish: str | None = None  # "stop", "length", "cancelled", "failed"
    unsent: list[int] = field(default_factory=list)  # tokens held for the stream interval
    left: threading.Event = field(default_factory=threading.Event)

    @property
    def position(self) -> int:
        """Position of the token the next step feeds."""
        return self.prompt_len + self.generated - 1

    def capacity_ok(self, block_size: int) -> bool:
        """The blocks hold the prompt and every new token (host-side check at join)."""
        return self.prompt_len + self.max_new <= len(self.blocks) * block_size


class RunningSet:
    """Join/leave/cancel bookkeeping between the servicer threads and the engine loop."""

    def __init__(self, max_batch: int) -> None:
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.max_batch = max_batch
        self.active: list[Sequence] = []  # engine thread only; active[i].slot == i
        self._joining: deque[Sequence] = deque()
        self._cancels: dict[str, str] = {}
        self._by_id: dict[str, Sequence] = {}
        self._cond = threading.Condition()
        self._closed = False

    # ------------------------------------------------------------ any thread
    def join(self, seq: Sequence) -> None:
        """Hand a sequence to the engine; it enters the batch at the next step."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is stopped")
            if seq.request_id in self._by_id:
                raise ValueError(f"request {seq.request_id!r} is already running")
            self._by_id[seq.request_id] = seq
            self._joining.append(seq)
            self._cond.notify_all()

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Ask the engine to drop ``request_id`` at the next step; False if unknown."""
        with self._cond:
            if request_id not in self._by_id:
                return False
            self._cancels.setdefault(request_id, reason)
            self._cond.notify_all()
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def num_running(self) -> int:
        with self._cond:
            return len(self._by_id)

    # --------------------------------------------------------- engine thread
    def wait_for_work(self, timeout: float) -> bool:
        """Block until something is active, joining or cancelled; False when closed."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or self.active or self._joining or self._cancels, timeout
            )
            return not self._closed

    def take_changes(self) -> tuple[list[tuple[Sequence, str]], list[Sequence]]:
        """Cancels to apply (sequence, reason) and joins that fit under ``max_batch``."""
        with self._cond:
            cancels = []
            for rid, reason in list(self._cancels.items()):
                seq = self._by_id.get(rid)
                if seq is None:
                    del self._cancels[rid]
                    continue
                if seq in self._joining:
                    self._joining.remove(seq)
                    cancels.append((seq, reason))
                    del self._cancels[rid]
                elif seq.slot >= 0:
                    cancels.append((seq, reason))
                    del self._cancels[rid]
            joins = []
            # rows freed: only cancels of running sequences (a queued one has none)
            room = self.max_batch - len(self.active) + sum(1 for q, _ in cancels if q.slot >= 0)
            while self._joining and len(joins) < room:
                joins.append(self._joining.popleft())
            return cancels, joins

    def add(self, seq: Sequence) -> int:
        """Put a joining sequence into the next free row; its slot."""
        seq.slot = len(self.active)
        self.active.append(seq)
        return seq.slot

    def remove(self, seq: Sequence, notify: bool = True) -> int | None:
        """Take ``seq`` out; the slot whose sequence moved into its row (None if none).
        ``notify=False``: the caller sets ``seq.left`` later (a step still in flight may
        write its blocks)."""
        moved_from = None
        if seq.slot >= 0:
            last = self.active.pop()
            if last is not seq:
                self.active[seq.slot] = last
                moved_from, last.slot = last.slot, seq.slot
        seq.slot = -1
        with self._cond:
            self._by_id.pop(seq.request_id, None)
            self._cancels.pop(seq.request_id, None)
        if notify:
            seq.left.set()
        return moved_from

    def drop_joining(self, seq: Sequence) -> None:
        """A joining sequence that never got a row leaves."""
        with self._cond:
            self._by_id.pop(seq.request_id, None)
        seq.left.set()

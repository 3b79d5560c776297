"""Per-request state machine and the registry the Stats RPC reads.

States and the only transitions allowed::

    WAITING ──► TRANSFERRING ──► DECODING ──► DONE
       │              │              │
       └──────────────┴──────────────┴──────► FAILED

A prefill daemon uses WAITING (computing) → TRANSFERRING (blocks leased to the
peer) → DONE (released or notified) / FAILED (lease expired, error). A decode
daemon uses all of them. DONE and FAILED are final.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field


class RequestState(enum.IntEnum):
    """Values equal the ``kvbridge.v1.RequestState`` enum numbers."""

    WAITING = 1
    TRANSFERRING = 2
    DECODING = 3
    DONE = 4
    FAILED = 5

    @property
    def final(self) -> bool:
        return self in (RequestState.DONE, RequestState.FAILED)


_ALLOWED: dict[RequestState, frozenset[RequestState]] = {
    RequestState.WAITING: frozenset(
        {RequestState.TRANSFERRING, RequestState.DONE, RequestState.FAILED}
    ),
    RequestState.TRANSFERRING: frozenset(
        {RequestState.DECODING, RequestState.DONE, RequestState.FAILED}
    ),
    RequestState.DECODING: frozenset({RequestState.DONE, RequestState.FAILED}),
    RequestState.DONE: frozenset(),
    RequestState.FAILED: frozenset(),
}


class InvalidTransitionError(RuntimeError):
    """A request was moved along an edge the state machine does not have."""


@dataclass
class RequestRecord:
    """What a daemon knows about one request."""

    request_id: str
    num_prompt_tokens: int = 0
    peer: str = ""
    state: RequestState = RequestState.WAITING
    num_generated_tokens: int = 0
    num_blocks: int = 0
    bytes: int = 0
    descriptors: int = 0
    transfer_seconds: float = 0.0
    error: str = ""
    created: float = field(default_factory=time.monotonic)
    history: list[RequestState] = field(default_factory=lambda: [RequestState.WAITING])
    # monotonic time of named steps after ``created`` (the decode daemon's timeline)
    marks: dict[str, float] = field(default_factory=dict)


class RequestRegistry:
    """Live requests plus the last ``keep_finished`` finished ones, with counters."""

    def __init__(self, keep_finished: int = 256) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, RequestRecord] = {}
        self._finished: OrderedDict[str, RequestRecord] = OrderedDict()
        self._keep = keep_finished
        self._idle = threading.Condition(self._lock)
        self.counters: dict[str, float] = {
            "requests_total": 0,
            "requests_done": 0,
            "requests_failed": 0,
        }
        self.recent_errors: deque[str] = deque(maxlen=32)

    def add(self, request_id: str, num_prompt_tokens: int = 0, peer: str = "") -> RequestRecord:
        """Register a new request in WAITING; a live duplicate id is refused."""
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._finished.pop(request_id, None)
            rec = RequestRecord(request_id, num_prompt_tokens=num_prompt_tokens, peer=peer)
            self._live[request_id] = rec
            self.counters["requests_total"] += 1
            return rec

    def get(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            return self._live.get(request_id) or self._finished.get(request_id)

    def transition(self, request_id: str, new: RequestState, error: str = "") -> RequestRecord:
        """Move a live request to ``new``; final states move it to the finished list."""
        with self._lock:
            rec = self._live.get(request_id)
            if rec is None:
                raise InvalidTransitionError(f"request {request_id!r} is not in flight")
            if new not in _ALLOWED[rec.state]:
                raise InvalidTransitionError(
                    f"request {request_id!r}: {rec.state.name} -> {new.name} is not allowed"
                )
            rec.state = new
            rec.history.append(new)
            if error:
                rec.error = error
                self.recent_errors.append(f"{request_id}: {error}")
            if new.final:
                del self._live[request_id]
                self._finished[request_id] = rec
                while len(self._finished) > self._keep:
                    self._finished.popitem(last=False)
                self.counters[
                    "requests_done" if new is RequestState.DONE else "requests_failed"
                ] += 1
                self._idle.notify_all()
            return rec

    def fail(self, request_id: str, error: str) -> bool:
        """Move a live request to FAILED; False when it is not live (already final)."""
        try:
            self.transition(request_id, RequestState.FAILED, error)
        except InvalidTransitionError:
            return False
        return True

    def snapshot(self, include_finished: bool = False) -> list[RequestRecord]:
        with self._lock:
            recs = list(self._live.values())
            if include_finished:
                recs += list(self._finished.values())
            return recs

    @property
    def num_live(self) -> int:
        with self._lock:
            return len(self._live)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is live; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._live, timeout=timeout)

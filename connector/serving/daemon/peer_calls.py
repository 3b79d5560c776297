"""A decode daemon's calls to prefill daemons: bounded by the client, cleaned up behind it.

* ``prefill``: the Prefill call, its timeout the smaller of ``--request-timeout`` and
  what is left of the client's deadline; a client that cancels cancels the call too
  (the prefill daemon then grants no lease). A peer's error is wrapped
  (``status.peer_failure``), never passed through.
* ``wait_ready``: after every target refused, a target that was unreachable is
  waited for (``RECONNECT_WAIT_SECONDS``, within the deadline) once: a restarted
  prefill daemon is served as soon as the channel reconnects, not failed during
  gRPC's reconnect backoff.
* ``release``: Release runs in the background (``BackgroundReleases``), retried
  until the peer answers; the prefill daemon's Release is idempotent and
  remembered when it arrives before the lease, so a Prefill call that timed out or
  was cancelled never pins blocks until the lease expires.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from kvbridge.connector.serving.daemon.admission import RateLimitedLog
from kvbridge.connector.serving.daemon.status import TRY_NEXT, RequestFailedError, peer_failure
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

RECONNECT_WAIT_SECONDS = 3.0  # > the pool's longest reconnect backoff (2 s)
RELEASE_TIMEOUT_SECONDS = 2.0  # one Release attempt
RELEASE_RETRY_SECONDS = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # delays before the attempts
RELEASE_WORKERS = 4  # a hung peer's releases do not hold up the others' for long
S = grpc.StatusCode


class PeerRefused(RequestFailedError):
    """The peer is down or full (``status.TRY_NEXT``): try the next one."""


def remaining(context: grpc.ServicerContext, limit: float) -> float:
    """``limit``, shortened to what is left of the client's deadline (never negative)."""
    left = context.time_remaining()
    return limit if left is None else max(min(limit, left), 0.0)


class PeerCalls:
    """Calls of one decode daemon to its prefill daemons."""

    def __init__(self, rt, log=None) -> None:
        self.rt = rt
        self.warn = RateLimitedLog(log or rt.log)
        self.releases = BackgroundReleases(rt.log, rt.cfg.request_timeout)

    def prefill(
        self,
        stub: pb_grpc.KVBridgeServiceStub,
        target: str,
        request: pb.PrefillRequest,
        context: grpc.ServicerContext,
    ) -> pb.PrefillResponse:
        """The Prefill call; ``PeerRefused`` (try the next), else ``RequestFailedError``."""
        what = f"prefill daemon {target}"
        timeout = remaining(context, self.rt.cfg.request_timeout)
        if timeout <= 0:
            raise RequestFailedError(S.DEADLINE_EXCEEDED, "the client's deadline passed")
        call = stub.Prefill.future(request, timeout=timeout)
        context.add_callback(call.cancel)  # the client went away: so does our call
        try:
            return call.result()
        except grpc.FutureCancelledError:
            self.release(stub, request.request_id, "caller cancelled")
            raise RequestFailedError(S.CANCELLED, f"cancelled by the client ({what})") from None
        except grpc.RpcError as exc:
            gone = not context.is_active()
            err = peer_failure(what, exc, caller_gone=gone)
            if exc.code() in (S.DEADLINE_EXCEEDED, S.CANCELLED) or gone:
                # the prefill may still lease blocks for us: free them, off this thread
                self.release(stub, request.request_id, "prefill call failed")
            if not gone and exc.code() in TRY_NEXT:
                self.warn.warning(
                    f"refused {target}", "prefill target refused, trying next",
                    extra={"target": target, "error": str(err)},
                )  # fmt: skip
                raise PeerRefused(err.code, str(err)) from None
            raise err from None

    def wait_ready(self, channel: grpc.Channel | None, context: grpc.ServicerContext) -> bool:
        """Wait (bounded by the deadline) for ``channel`` to connect; True when it did."""
        if channel is None:
            return False
        wait = remaining(context, RECONNECT_WAIT_SECONDS)
        if wait <= 0:
            return False
        ready = grpc.channel_ready_future(channel)
        try:
            ready.result(timeout=wait)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()

    def release(self, stub: pb_grpc.KVBridgeServiceStub, prefill_id: str, reason: str) -> None:
        """Free the prefill lease of ``prefill_id`` in the background (retried)."""
        self.releases.submit(stub, prefill_id, reason)

    def close(self) -> None:
        self.releases.close()


class BackgroundReleases:
    """Release calls on a few worker threads, each retried (``RELEASE_RETRY_SECONDS``) until
    the peer answers; a peer that never does leaves the lease to expire."""

    def __init__(self, log, request_timeout: float) -> None:
        self.log = RateLimitedLog(log)
        self.timeout = min(request_timeout, RELEASE_TIMEOUT_SECONDS)
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._workers = ThreadPoolExecutor(RELEASE_WORKERS, thread_name_prefix="kvbridge-release")
        self.pending = 0
        self.done = 0  # answered by the peer
        self.given_up = 0

    def submit(self, stub, prefill_id: str, reason: str, attempt: int = 0) -> None:
        def run() -> None:
            try:
                stub.Release(pb.ReleaseRequest(request_id=prefill_id, reason=reason),
                             timeout=self.timeout)  # fmt: skip
            except grpc.RpcError as exc:
                if exc.code() in (S.UNAVAILABLE, S.DEADLINE_EXCEEDED, S.RESOURCE_EXHAUSTED) and (
                    attempt + 1 < len(RELEASE_RETRY_SECONDS)
                ):
                    self.submit(stub, prefill_id, reason, attempt + 1)
                    return
                self.given_up += 1
                self.log.warning(
                    "release", "release failed; the lease will expire",
                    extra={"request_id": prefill_id, "error": exc.details()},
                )  # fmt: skip
                return
            self.done += 1

        with self._cond:
            if self._stop:
                return
            due = time.monotonic() + RELEASE_RETRY_SECONDS[attempt]
            heapq.heappush(self._heap, (due, next(self._seq), run))
            self.pending = len(self._heap)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="kvbridge-release-timer", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                if self._stop:
                    return
                _, _, run = heapq.heappop(self._heap)
                self.pending = len(self._heap)
            self._workers.submit(self._run, run)

    def _run(self, run: Callable[[], None]) -> None:
        try:
            run()
        except Exception:  # never lose a worker
            self.log.log.exception("background release failed")

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._workers.shutdown(wait=False, cancel_futures=True)

"""KV moves of a daemon: handshake once per peer engine, post, poll, give up safely.

The decode side pulls (``pull``); a prefill daemon asked to push (its peer's probe
found reads degraded) writes through the same machinery (``push``), and once a
failed push can no longer touch the peer's blocks it tells the peer so
(a ``released`` notice), which ends the peer's quarantine of those blocks.

A pull posts one read and polls it; the caller's ``aborted()`` and the deadline end
the wait. An engine transfer is never cancelled mid-flight: releasing an in-flight
NIXL handle can crash UCX, and Mooncake has no cancel at all. A pull given up on is
*abandoned* instead: a background thread keeps polling it until the engine
finishes or fails it, then lets the agent clean up (staging buffer, failure notice).
``PullError.quiet()`` turns true only then (and, for Mooncake, after the engine's
drain time following a failed call), so the caller quarantines the destination
blocks until no engine can write them any more.

Peers are known by engine name *and* incarnation: a handle naming another agent
instance id (or side channel) than the connected peer's is from a restarted engine,
which is handshaken with again. Peers are dropped only once no transfer with them
is in flight: removing a NIXL remote agent under a live handle deletes the handle
behind Python's back. Before a handshake the side channel is probed with a TCP
connect, so a peer that is gone fails at once instead of after the whole timeout.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvbridge.connector.transfer.agent import KVTransferAgent, PendingRequest
from kvbridge.connector.transfer.errors import (
    DescriptorError,
    IncompatiblePeerError,
    PeerUnreachableError,
    TransferError,
)

POLL_MAX_SECONDS = 0.002
ABANDONED_POLL_SECONDS = 0.01
PROBE_SECONDS = 1.0  # longest TCP connect probe of a side channel before a handshake


def probe(address: str, timeout: float) -> None:
    """``PeerUnreachableError`` when nothing listens at ``host:port`` any more (refused);
    other errors (timeouts, no route) are left to the handshake's own bounded wait."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection(
            (host.strip("[]"), int(port)), timeout=min(max(timeout, 1e-3), PROBE_SECONDS)
        ):
            pass
    except ConnectionRefusedError as exc:
        raise PeerUnreachableError(f"side channel {address} refuses connections: {exc}") from None
    except (OSError, ValueError):
        pass


def current(peer, side_address: str, instance: str) -> bool:
    """Whether the connected ``peer`` is the incarnation a handle names."""
    if instance and peer.instance_id != instance:
        return False
    return not side_address or not peer.side_channel or peer.side_channel == side_address


class HandshakeBusyError(PeerUnreachableError):
    """Another request's handshake with the peer did not end within our timeout."""


class PullError(Exception):
    """A pull failed. ``quiet()`` says whether the engine is done with the blocks.

    ``aborted``: cancelled by the caller; ``timed_out``: ran out of time;
    ``retryable``: an engine or peer failure worth one more try (not bad input);
    ``permanent``: the peers cannot work together (incompatible caches): misconfiguration.
    """

    def __init__(
        self,
        message: str,
        *,
        quiet: Callable[[], bool] | None = None,
        aborted: bool = False,
        timed_out: bool = False,
        retryable: bool = False,
        permanent: bool = False,
        posted: bool = True,
    ) -> None:
        super().__init__(message)
        self.quiet = quiet or (lambda: True)
        self.aborted, self.timed_out, self.retryable = aborted, timed_out, retryable
        self.permanent = permanent
        self.posted = posted  # False: refused before anything reached the engine


@dataclass(frozen=True)
class PullResult:
    bytes: int
    descriptors: int
    seconds: float
    handshake_seconds: float = 0.0
    staged: bool = False
    direction: str = "pull"  # or "push": the holder wrote the blocks
    engine: str = ""  # the transport that carried them
    # seconds spent posting (plan, staging buffer), waiting for the engine, finishing
    # (relayout queued, buffer back): where a slow pull's time went
    phases: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(eq=False)
class _Abandoned:
    pending: PendingRequest
    engine: str
    settled: threading.Event


class Puller:
    """Pulls KV blocks from prefill engines through ``agent``."""

    def __init__(self, agent: KVTransferAgent, log) -> None:
        self.agent = agent
        self.log = log
        self._connect_lock = threading.Lock()
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}  # engine -> transfers posted and not settled
        self._stale: set[str] = set()  # engines to drop once nothing is in flight
        self._abandoned: list[_Abandoned] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ----------------------------------------------------------------- peers
    def connect(
        self, engine: str, side_address: str, timeout: float, instance: str = ""
    ) -> tuple[object, float]:
        """``(peer, handshake seconds)``, handshaking (and probing) first if needed;
        ``PullError`` (nothing posted) when that fails."""
        try:
            return self._peer(engine, side_address, timeout, instance)
        except HandshakeBusyError as exc:  # waited for another request's handshake:
            # nothing of ours failed, and the peer it made (maybe in use) must stay
            raise PullError(f"PeerUnreachableError: {exc}", retryable=True, posted=False) from None
        except IncompatiblePeerError as exc:
            raise PullError(f"{type(exc).__name__}: {exc}", permanent=True, posted=False) from None
        except (TransferError, OSError) as exc:
            self._drop(engine)
            raise PullError(f"{type(exc).__name__}: {exc}", retryable=True, posted=False) from None
        except Exception as exc:
            raise PullError(f"{type(exc).__name__}: {exc}", posted=False) from None

    def _peer(
        self, engine: str, side_address: str, timeout: float, instance: str = ""
    ) -> tuple[object, float]:
        """The connected peer of that incarnation, handshaking first if needed; bounded
        by ``timeout`` even while another request's handshake holds the lock."""
        peer = self.agent.peers.get(engine)
        if peer is not None and current(peer, side_address, instance):
            return peer, 0.0
        t0 = time.perf_counter()
        if not self._connect_lock.acquire(timeout=max(timeout, 0.0)):
            raise HandshakeBusyError(
                f"handshake with {engine} at {side_address}: another handshake did not "
                f"finish within {timeout:.3g} s"
            )
        try:
            peer = self.agent.peers.get(engine)  # the other handshake may have made it
            if peer is not None and current(peer, side_address, instance):
                return peer, time.perf_counter() - t0
            if peer is not None:  # restarted under the same name: a new peer
                self.log.info(
                    "peer restarted; handshaking again",
                    extra={"peer": engine, "address": side_address, "instance": instance},
                )
                if not self._drop(engine):
                    raise PeerUnreachableError(
                        f"engine {engine} restarted; transfers with its previous "
                        "incarnation are still in flight"
                    )
            left = max(timeout - (time.perf_counter() - t0), 1e-3)
            probe(side_address, left)
            peer = self.agent.connect_to(side_address, timeout=left)
            if peer.name != engine:
                self._drop(peer.name)
                raise RuntimeError(
                    f"side channel {side_address} belongs to engine {peer.name!r}, "
                    f"the handle names {engine!r}"
                )
            if instance and peer.instance_id != instance:  # restarted after the Prefill
                raise RuntimeError(
                    f"engine {engine} restarted after it leased the blocks (instance "
                    f"{peer.instance_id[:8]}, the handle names {instance[:8]})"
                )
            seconds = time.perf_counter() - t0
        finally:
            self._connect_lock.release()
        self.log.info(
            "handshake done",
            extra={"peer": engine, "address": side_address, "seconds": round(seconds, 6)},
        )
        return peer, seconds

    def _drop(self, engine: str) -> bool:
        """Forget ``engine`` (re-handshake next time), once nothing is in flight with it;
        False when that has to wait for transfers in flight."""
        with self._lock:
            if self._inflight.get(engine):
                self._stale.add(engine)
                return False
            self._stale.discard(engine)
        self.agent.disconnect(engine)
        return True

    def _begin(self, engine: str) -> None:
        with self._lock:
            self._inflight[engine] = self._inflight.get(engine, 0) + 1

    def _end(self, engine: str) -> None:
        with self._lock:
            left = self._inflight.get(engine, 1) - 1
            if left > 0:
                self._inflight[engine] = left
                return
            self._inflight.pop(engine, None)
            stale = engine in self._stale
            self._stale.discard(engine)
        if stale:
            self.agent.disconnect(engine)

    # ----------------------------------------------------------------- pulls
    def pull(
        self,
        handle,
        local_block_ids: list[int],
        timeout: float,
        aborted: Callable[[], bool] | None = None,
        num_tokens: int | None = None,
    ) -> PullResult:
        """Read the handle's blocks into ``local_block_ids`` within ``timeout`` seconds.

        ``num_tokens``: plan in token space (the two caches' block sizes differ).
        """
        remote = list(handle.block_ids)

        def post(peer):
            return self.agent.post_read(
                peer, remote, local_block_ids,
                request_id=handle.request_id, notify=True, num_tokens=num_tokens,
            )  # fmt: skip

        return self._move(
            handle.engine_name, handle.side_channel_address, post, timeout, aborted, "read",
            instance=handle.engine_instance,
        )  # fmt: skip

    def push(
        self,
        engine: str,
        side_address: str,
        local_block_ids: list[int],
        remote_block_ids: list[int],
        request_id: str,
        timeout: float,
        aborted: Callable[[], bool] | None = None,
    ) -> PullResult:
        """Write our ``local_block_ids`` into the peer's ``remote_block_ids``; the peer
        gets the engine's completion notice, or a ``released`` notice once a failed
        push can no longer touch its blocks."""

        def post(peer):
            return self.agent.post_write(
                peer, local_block_ids, remote_block_ids, request_id=request_id, notify=True
            )

        try:
            return self._move(engine, side_address, post, timeout, aborted, "write")
        except PullError as exc:
            if exc.posted:
                self._tell_when_quiet(side_address, request_id, exc.quiet)
            raise

    def _tell_when_quiet(self, address: str, request_id: str, quiet: Callable[[], bool]) -> None:
        """Once ``quiet()``, tell the side channel at ``address`` that the push is over
        (the peer may have been dropped meanwhile: the address comes from the request)."""

        def run() -> None:
            while not self._stop.wait(ABANDONED_POLL_SECONDS * 5):
                try:
                    if quiet():
                        break
                except Exception:
                    self.log.exception("asking whether a push is over failed")
                    return
            else:
                return
            self.agent.tell(address, request_id, "WRITE", "released", "push given up")

        threading.Thread(target=run, name="kvbridge-push-quiet", daemon=True).start()

    def _move(
        self, engine, side_address, post, timeout, aborted, what, instance: str = ""
    ) -> PullResult:
        deadline = time.monotonic() + timeout
        agent = self.agent
        peer, handshake = self.connect(engine, side_address, timeout, instance)
        t_post = time.monotonic()
        try:
            pending = post(peer)
        except IncompatiblePeerError as exc:  # refused: nothing was posted
            raise PullError(f"{type(exc).__name__}: {exc}", permanent=True, posted=False) from None
        except DescriptorError as exc:  # refused: nothing was posted
            raise PullError(f"{type(exc).__name__}: {exc}", posted=False) from None
        except (TransferError, OSError) as exc:  # nothing was posted
            self._drop(engine)
            raise PullError(f"{type(exc).__name__}: {exc}", retryable=True, posted=False) from None
        except Exception as exc:  # bad block ids, mismatched layouts: nothing was posted
            raise PullError(f"{type(exc).__name__}: {exc}", posted=False) from None
        self._begin(engine)
        t0, cancel = time.monotonic(), ""
        try:
            cancel = self._wait(pending, deadline, aborted)
            if not cancel:
                t_done = time.monotonic()
                r = agent.finish(pending, timeout=1.0)  # done: relayout, staging buffer back
                self._end(engine)
                return PullResult(
                    r.bytes, r.descriptors, r.seconds, handshake, r.staged,
                    "pull" if what == "read" else "push",
                    agent.transport.engine_of(engine).backend,
                    (t0 - t_post, t_done - t0, time.monotonic() - t_done),
                )  # fmt: skip
        except TransferError as exc:  # the engine failed it (its handle is released)
            self._settle(pending)
            self._end(engine)
            self._drop(engine)
            xfer = pending.xfer
            raise PullError(
                f"{type(exc).__name__}: {exc}",
                quiet=lambda: agent.transport.quiesced(xfer),
                retryable=True,
            ) from None
        settled = self._abandon(pending, engine)
        xfer = pending.xfer
        raise PullError(
            f"KV {what} {cancel} after {time.monotonic() - t0:.3g} s; the engine finishes it "
            "in the background",
            quiet=lambda: settled.is_set() and agent.transport.quiesced(xfer),
            aborted=cancel == "aborted",
            timed_out=cancel == "timed out",
        )

    def _wait(self, pending: PendingRequest, deadline: float, aborted) -> str:
        """Poll until done (""), or "aborted" / "timed out"; raises if the engine failed it."""
        pause = 50e-6
        while not self.agent.transport.check(pending.xfer):
            if aborted is not None and aborted():
                return "aborted"
            if time.monotonic() >= deadline:
                return "timed out"
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX_SECONDS)
        return ""

    def _settle(self, pending: PendingRequest) -> None:
        """Let the agent finish a transfer the engine completed or failed (cleanup only)."""
        try:
            self.agent.finish(pending, timeout=0.0)
        except TransferError:
            pass  # a failure: the peer is told, the staging buffer handled
        except Exception:
            self.log.exception("finishing an abandoned transfer failed")

    # ---------------------------------------------------- abandoned transfers
    def _abandon(self, pending: PendingRequest, engine: str) -> threading.Event:
        item = _Abandoned(pending, engine, threading.Event())
        with self._lock:
            self._abandoned.append(item)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._reap, name="kvbridge-abandoned", daemon=True
                )
                self._thread.start()
        return item.settled

    def _reap(self) -> None:
        while not self._stop.wait(ABANDONED_POLL_SECONDS):
            with self._lock:
                items = list(self._abandoned)
            for item in items:
                try:
                    finished = self.agent.transport.check(item.pending.xfer)
                except TransferError:
                    finished = True  # failed: the handle is released
                except Exception:
                    self.log.exception("polling an abandoned transfer failed")
                    continue
                if not finished:
                    continue
                self._settle(item.pending)
                with self._lock:
                    self._abandoned.remove(item)
                item.settled.set()
                self._end(item.engine)
            with self._lock:
                if not self._abandoned:
                    self._thread = None
                    return

    def close(self) -> None:
        self._stop.set()

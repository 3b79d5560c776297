"""Completion notices of one agent: the signed notice a request carries, the failure
notice sent to a peer's side channel, and the inbox of notices from peers.

Success notices ride on the engine transfer (they reach the other side after the
data); failure notices go over the side channel, best effort, off the caller's
thread. Incoming notices come from both paths and wait in one inbox;
``wait_notice`` takes one request's notice and leaves the others for
``notifications``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from kvbridge.connector.transfer import metadata as md
from kvbridge.connector.transfer.errors import HandshakeError, TransferError, TransferTimeoutError
from kvbridge.connector.transfer.side_channel import request, sign_notice, verify_notice
from kvbridge.connector.transfer.transport import Transport

log = logging.getLogger(__name__)


class NoticeBox:
    """Notices in and out for the agent ``name``.

    ``transport_lock`` guards the transport (shared with the agent's posts);
    ``secret`` signs and checks notices (``None``: unsigned); ``timeout`` bounds the
    failure notice's side-channel request (at most 2 s).
    """

    def __init__(
        self,
        name: str,
        transport: Transport,
        transport_lock: threading.RLock,
        secret: bytes | None,
        timeout: float,
    ) -> None:
        self.name = name
        self._transport, self._transport_lock = transport, transport_lock
        self._secret, self._timeout = secret, timeout
        self._side: deque[md.TransferNotice] = deque()  # from the side channel
        self._held: list[md.TransferNotice] = []  # taken by wait_notice, not its request's
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ out
    def signed(self, request_id: str, op: str, nbytes: int) -> bytes:
        """The success notice a request carries through the engine."""
        notice = md.TransferNotice(request_id=request_id, sender=self.name, op=op, nbytes=nbytes)
        return sign_notice(self._secret, md.encode_notice(notice))

    def tell_failure(self, address: str, request_id: str, op: str, exc: Exception) -> None:
        """Best effort, off the caller's thread: the peer at ``address`` learns the
        request failed (nothing without an address)."""
        self.tell(address, request_id, op, "failed", str(exc))

    def tell(self, address: str, request_id: str, op: str, status: str, detail: str = "") -> None:
        """Best effort, off the caller's thread: a notice to the side channel at ``address``."""
        if not address:
            return
        notice = md.TransferNotice(
            request_id=request_id, sender=self.name, op=op, status=status, detail=detail[:500]
        )

        def send() -> None:
            try:
                request(address, notice, min(self._timeout, 2.0), self._secret)
            except TransferError as err:
                log.info("could not tell %s that %s %s: %s", address, request_id, status, err)

        threading.Thread(target=send, name=f"notice-{self.name}", daemon=True).start()

    # ------------------------------------------------------------------- in
    def deliver(self, notice: md.TransferNotice) -> None:
        """A notice that arrived on the side channel (already authenticated there)."""
        self._side.append(notice)

    def notifications(self) -> list[md.TransferNotice]:
        """New notices from peers (engine notifications and side-channel messages)."""
        with self._lock:
            out = list(self._held)
            self._held.clear()
            with self._transport_lock:
                raw = self._transport.notifications()
            for peer, data in raw:
                try:
                    out.append(md.decode_notice(verify_notice(self._secret, data)))
                except HandshakeError as exc:
                    log.warning("agent %s: bad notification from %s: %s", self.name, peer, exc)
            while self._side:
                out.append(self._side.popleft())
        return out

    def wait_notice(self, request_id: str, timeout: float) -> md.TransferNotice:
        """The notice of ``request_id``; other notices stay for ``notifications()``."""
        deadline = time.perf_counter() + timeout
        pause = 1e-4
        while True:
            got = self.notifications()
            match = next((n for n in got if n.request_id == request_id), None)
            with self._lock:
                self._held.extend(n for n in got if n is not match)
            if match is not None:
                return match
            now = time.perf_counter()
            if now >= deadline:
                raise TransferTimeoutError(
                    f"agent {self.name!r}: no notice for request {request_id!r} in {timeout:.3g} s"
                )
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 5e-3)

"""The zmq side channel: handshakes and transfer notices between agents.

``SideChannelServer`` answers requests on a ROUTER socket from a background
thread; ``request()`` sends one message on a fresh REQ socket and waits a bounded
time for the answer. With a shared ``secret`` every frame carries an HMAC-SHA256
of its payload, and unsigned or wrongly signed messages are refused (and logged,
at most once per second). Transfer notices riding on engine notifications are
signed the same way (``sign_notice`` / ``verify_notice``). The HMAC authenticates;
it does not encrypt, and it does not stop a replay of a captured message (request
ids are unique, so a replayed notice ends nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable

import zmq
from kvbridge.connector.transfer import metadata as md
from kvbridge.connector.transfer.errors import HandshakeError, PeerUnreachableError

log = logging.getLogger(__name__)

Handler = Callable[[object], object]
_POLL_MS = 100


def _sign(secret: bytes | None, payload: bytes) -> list[bytes]:
    if secret is None:
        return [payload]
    return [hmac.new(secret, payload, hashlib.sha256).digest(), payload]


def _unsign(secret: bytes | None, frames: list[bytes], what: str) -> bytes:
    if secret is None:
        if len(frames) != 1:
            raise HandshakeError(f"{what}: expected one frame, got {len(frames)} (signed?)")
        return frames[0]
    if len(frames) != 2:
        raise HandshakeError(f"{what}: unsigned message refused (this side requires a secret)")
    mac, payload = frames
    if not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()):
        raise HandshakeError(f"{what}: bad signature (different side-channel secrets?)")
    return payload


_NOTICE_TAG = b"kvbsig1:"


def sign_notice(secret: bytes | None, data: bytes) -> bytes:
    """``data`` (an engine notification) with an HMAC-SHA256 prefix; unchanged without secret."""
    if secret is None:
        return data
    mac = hmac.new(secret, data, hashlib.sha256).hexdigest().encode()
    return _NOTICE_TAG + mac + b":" + data


def verify_notice(secret: bytes | None, data: bytes) -> bytes:
    """The notification inside a signed one; ``HandshakeError`` if unsigned or forged."""
    if secret is None:
        return data
    if not data.startswith(_NOTICE_TAG):
        raise HandshakeError("transfer notice: unsigned (this side requires a secret)")
    mac, sep, payload = data[len(_NOTICE_TAG) :].partition(b":")
    want = hmac.new(secret, payload, hashlib.sha256).hexdigest().encode()
    if not sep or not hmac.compare_digest(mac, want):
        raise HandshakeError("transfer notice: bad signature (different side-channel secrets?)")
    return payload


def parse_address(address: str) -> str:
    """``host:port`` (or ``tcp://host:port``) to a zmq endpoint; ``ValueError`` if malformed."""
    addr = address.removeprefix("tcp://")
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"side-channel address must be 'host:port', got {address!r}")
    return f"tcp://{host}:{port}"


class SideChannelServer:
    """Serves ``handler(message) -> reply`` on ``host:port`` (port 0: any free port)."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: bytes | None = None,
        name: str = "kvbridge",
    ):
        self._handler = handler
        self._secret = secret
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, md.MAX_MESSAGE_BYTES + 64)
        bind_host = "*" if host in ("0.0.0.0", "*") else host
        if port:
            self._sock.bind(f"tcp://{bind_host}:{port}")
        else:
            port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        self.host, self.port = host, int(port)
        self.refused = 0  # messages refused for a missing or bad signature
        self._next_log = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"side-{name}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _reply(self, payload: bytes) -> bytes:
        try:
            msg = md.decode(payload, what="side-channel request")
            reply = self._handler(msg)
        except HandshakeError as exc:
            reply = md.ErrorReply(reason=str(exc))
        except Exception as exc:
            log.exception("side-channel handler failed")
            reply = md.ErrorReply(reason=f"internal error: {type(exc).__name__}: {exc}")
        return md.encode(reply if reply is not None else md.Ack())

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(_POLL_MS):
                    continue
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                log.warning("side channel receive failed: %s", exc)
                continue
            # ROUTER + REQ: [identity, b"", *body]
            if len(frames) < 3 or frames[1] != b"":
                continue
            ident, body = frames[0], frames[2:]
            try:
                payload = _unsign(self._secret, body, "side-channel request")
            except HandshakeError as exc:
                self._log_refusal(exc)
                out = md.encode(md.ErrorReply(reason=str(exc)))
            else:
                out = self._reply(payload)
            try:
                self._sock.send_multipart([ident, b"", *_sign(self._secret, out)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("side channel reply failed: %s", exc)
        self._sock.close(0)

    def _log_refusal(self, exc: Exception) -> None:
        self.refused += 1
        now = time.monotonic()
        if now >= self._next_log:  # at most one line per second
            self._next_log = now + 1.0
            log.warning("side channel %s refused a message (%d so far): %s",
                        self.address, self.refused, exc)  # fmt: skip

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def request(
    address: str,
    msg: object,
    timeout: float,
    secret: bytes | None = None,
    expect: type | tuple[type, ...] | None = None,
) -> object:
    """Send ``msg`` to the side channel at ``address``; its reply within ``timeout`` s.

    ``PeerUnreachableError`` when nothing answers in time; ``HandshakeError`` for a
    malformed, unsigned or unexpected reply, or when the peer answered with an
    ``ErrorReply`` (its reason is in the message).
    """
    endpoint = parse_address(address)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, md.MAX_MESSAGE_BYTES + 64)
    try:
        sock.connect(endpoint)
        sock.send_multipart(_sign(secret, md.encode(msg)))
        if not sock.poll(int(max(timeout, 0.001) * 1000), zmq.POLLIN):
            raise PeerUnreachableError(
                f"side channel {address} did not answer within {timeout:.3g} s"
            )
        frames = sock.recv_multipart()
    finally:
        sock.close(0)
    what = f"reply from {address}"
    if secret is None and len(frames) == 2:  # a signing peer: show its (unverified) reason
        reply = md.decode(frames[1], what=what)
        reason = reply.reason if isinstance(reply, md.ErrorReply) else "its replies are signed"
        raise HandshakeError(
            f"side channel {address} requires a shared secret (this side has none): {reason}"
        )
    reply = md.decode(_unsign(secret, frames, what), what=what)
    if isinstance(reply, md.ErrorReply) and (expect is None or not isinstance(reply, expect)):
        raise HandshakeError(f"side channel {address} refused the message: {reply.reason}")
    if expect is not None and not isinstance(reply, expect):
        raise HandshakeError(f"reply from {address}: unexpected {type(reply).__name__}")
    return reply

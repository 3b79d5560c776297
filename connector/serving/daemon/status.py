"""Status codes a daemon answers with, and how a peer's errors become ours.

The rule: permanent misconfiguration is ``FAILED_PRECONDITION``, capacity
``RESOURCE_EXHAUSTED``, a peer that is down or failing ``UNAVAILABLE``, running out
of our own (or the client's) time ``DEADLINE_EXCEEDED``, a caller that went away
``CANCELLED``. A peer daemon's status is never passed through as if it were ours
(a prefill daemon refusing the decode daemon's token must not reach the client as
``UNAUTHENTICATED``): ``peer_failure`` maps it by ``PEER_CODES`` and names the peer
and its code in the message (``call to prefill daemon H:P ended with CODE: ...``;
the code may be the peer's answer or the local channel's, e.g. a timeout).
"""

from __future__ import annotations

import grpc

S = grpc.StatusCode

#: a peer's code -> the code our caller gets
PEER_CODES: dict[grpc.StatusCode, grpc.StatusCode] = {
    S.UNAVAILABLE: S.UNAVAILABLE,
    S.RESOURCE_EXHAUSTED: S.RESOURCE_EXHAUSTED,
    S.DEADLINE_EXCEEDED: S.DEADLINE_EXCEEDED,
    S.CANCELLED: S.UNAVAILABLE,  # we did not cancel it (see peer_failure): the peer did
    # misconfiguration between the daemons: retrying will not help
    S.UNAUTHENTICATED: S.FAILED_PRECONDITION,
    S.PERMISSION_DENIED: S.FAILED_PRECONDITION,
    S.UNIMPLEMENTED: S.FAILED_PRECONDITION,  # e.g. --prefill names a decode daemon
    S.FAILED_PRECONDITION: S.FAILED_PRECONDITION,
    S.INVALID_ARGUMENT: S.FAILED_PRECONDITION,  # we checked the request: the peers disagree
    S.OUT_OF_RANGE: S.FAILED_PRECONDITION,
}
#: peer codes worth trying the next peer for
TRY_NEXT = frozenset({S.UNAVAILABLE, S.RESOURCE_EXHAUSTED})


class RequestFailedError(Exception):
    """A request failed with a gRPC status to report."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def peer_code(code: grpc.StatusCode) -> grpc.StatusCode:
    """The code our caller gets for a peer's ``code`` (``UNAVAILABLE`` when unlisted:
    the peer's INTERNAL, UNKNOWN, DATA_LOSS ... are its failures, not ours)."""
    return PEER_CODES.get(code, S.UNAVAILABLE)


def peer_failure(what: str, exc: grpc.RpcError, caller_gone: bool = False) -> RequestFailedError:
    """Our error for a failed call to the peer ``what`` (``caller_gone``: our own caller
    cancelled, which is why the call ended)."""
    theirs = exc.code()
    text = f"call to {what} ended with {theirs.name}: {exc.details()}"
    if caller_gone:
        return RequestFailedError(S.CANCELLED, f"cancelled by the client ({text})")
    return RequestFailedError(peer_code(theirs), text)


def none_answered(failures: list[RequestFailedError]) -> RequestFailedError:
    """Every peer refused: ``RESOURCE_EXHAUSTED`` if one was full, else ``UNAVAILABLE``."""
    if not failures:
        return RequestFailedError(S.UNAVAILABLE, "no prefill daemon answered")
    full = any(f.code == S.RESOURCE_EXHAUSTED for f in failures)
    code = S.RESOURCE_EXHAUSTED if full else S.UNAVAILABLE
    return RequestFailedError(code, "; ".join(str(f) for f in failures))

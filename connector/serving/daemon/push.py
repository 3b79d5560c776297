"""Choosing the direction of a KV move, and the push when reads are degraded.

The decode side handshakes with the prefill engine (which probes the path both
ways, see the transfer library's probe.py) and then, per peer, either pulls
(``Puller.pull``) or, when reads from that peer failed or ran below the warning
fraction while writes did not (or ``--transfer-direction push``), calls the
prefill daemon's ``Push`` RPC with its destination block ids. The prefill daemon
checks that the caller holds the lease, writes the leased blocks through the
same machinery as a pull (bounded, abandoned rather than cancelled), ends the
lease once the blocks have landed, and returns what it moved.

Guarantees, as for a pull: the decode side trusts the blocks only after the
engine's completion notice from that prefill engine arrives (after the data);
if the push fails, the destination blocks stay quarantined until the prefill
engine says it can no longer write them (a ``released`` notice, sent once its
transport is quiet), or for ``--engine-drain-seconds`` when it never does (a
prefill killed mid-push). Refusals before anything was posted free them at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from kvbridge.connector.serving.daemon.pull import PullError, PullResult
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

# codes of a Push RPC that refused before posting anything: nothing will write the blocks
NOTHING_POSTED = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
})  # fmt: skip
LEASE_MARGIN_SECONDS = 0.5
POLL_SECONDS = 0.005


def fetch(endpoint, handle, local_block_ids: list[int], stub, timeout: float,
          aborted: Callable[[], bool] | None = None,
          num_tokens: int | None = None) -> PullResult:  # fmt: skip
    """Move the handle's blocks into ``local_block_ids``: pull, or ask the holder to push.

    ``num_tokens`` (the two caches' block sizes differ): always a pull, planned in
    token space (a push moves whole blocks of one size).
    """
    cfg, puller = endpoint.rt.cfg, endpoint.puller
    peer, handshake = puller.connect(
        handle.engine_name, handle.side_channel_address, timeout, handle.engine_instance
    )
    direction = cfg.transfer_direction
    if num_tokens is not None:
        direction = "pull"
    elif direction == "auto":
        direction = "push" if endpoint.agent.direction(peer) == "WRITE" else "pull"
    if direction == "pull":
        r = puller.pull(handle, local_block_ids, timeout, aborted, num_tokens=num_tokens)
    else:
        r = ask_push(endpoint, handle, local_block_ids, stub, timeout, aborted)
    return PullResult(r.bytes, r.descriptors, r.seconds, r.handshake_seconds + handshake,
                      r.staged, r.direction, r.engine, r.phases)  # fmt: skip


def ask_push(endpoint, handle, local_block_ids: list[int], stub, timeout: float,
             aborted: Callable[[], bool] | None = None) -> PullResult:  # fmt: skip
    """The decode side of a push: the RPC, then the engine's completion notice."""
    agent, rid, engine = endpoint.agent, handle.request_id, handle.engine_name
    drain = endpoint.rt.cfg.engine_drain_seconds
    deadline = time.monotonic() + timeout

    def landed() -> bool:
        n = endpoint.write_notice(rid, engine, 0.0)
        return n is not None and n.status in ("done", "released")

    def failed(message: str, code=None, **kw) -> PullError:
        if code in NOTHING_POSTED:
            return PullError(message, posted=False, **kw)
        since = time.monotonic()
        return PullError(message, quiet=lambda: landed() or time.monotonic() - since >= drain, **kw)

    request = pb.PushRequest(
        request_id=rid, engine_name=agent.name, side_channel_address=agent.side_channel_address,
        block_ids=local_block_ids, timeout_seconds=timeout,
    )  # fmt: skip
    call = stub.Push.future(request, timeout=timeout + 1.0)
    while not call.done():
        if aborted is not None and aborted():
            call.cancel()
            raise failed(f"KV push by {engine} aborted", aborted=True)
        time.sleep(POLL_SECONDS)
    try:
        resp = call.result()
    except grpc.RpcError as exc:
        code = exc.code()
        raise failed(
            f"KV push by {engine} failed: {code.name}: {exc.details()}", code,
            timed_out=code == grpc.StatusCode.DEADLINE_EXCEEDED,
            retryable=code in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE),
        ) from None  # fmt: skip
    notice = endpoint.write_notice(rid, engine, max(deadline - time.monotonic(), 1.0))
    if notice is None or notice.status != "done":
        raise failed(f"KV push by {engine}: no completion notice from its engine ({notice})")
    return PullResult(
        resp.bytes, resp.descriptors, resp.transfer_seconds, resp.handshake_seconds,
        False, "push", resp.engine,
    )  # fmt: skip


def serve_push(rt, leases, endpoint, request: pb.PushRequest, context) -> pb.PushResponse:
    """The prefill side of ``Push``: the lease's owner asks for its blocks to be written."""
    lease = leases.get(request.request_id)
    if lease is None:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no live lease {request.request_id!r}")
    if lease.owner and request.engine_name != lease.owner:
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"lease {request.request_id!r} belongs to {lease.owner!r}, not {request.engine_name!r}",
        )
    if len(request.block_ids) != len(lease.block_ids):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{len(request.block_ids)} destination blocks for {len(lease.block_ids)} leased",
        )
    if not 0 <= request.timeout_seconds <= 3600:  # also refuses NaN
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds must lie in [0, 3600]")
    timeout = min(
        request.timeout_seconds or rt.cfg.transfer_timeout,
        lease.seconds_left() - LEASE_MARGIN_SECONDS,
    )
    if timeout <= 0:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the lease is too short to push")
    try:
        r = endpoint.puller.push(
            request.engine_name, request.side_channel_address, list(lease.block_ids),
            list(request.block_ids), request.request_id, timeout,
            aborted=lambda: not context.is_active(),
        )  # fmt: skip
    except PullError as exc:
        rt.count_event("transfer_failures")
        code = grpc.StatusCode.ABORTED if exc.posted else grpc.StatusCode.FAILED_PRECONDITION
        context.abort(code, f"push failed: {exc}")
    leases.end(request.request_id, "pushed")
    rt.log.info(
        "kv pushed",
        extra={"request_id": request.request_id, "peer": request.engine_name,
               "bytes": r.bytes, "seconds": round(r.seconds, 6), "engine": r.engine},
    )  # fmt: skip
    return pb.PushResponse(
        bytes=r.bytes, descriptors=r.descriptors, transfer_seconds=r.seconds,
        handshake_seconds=r.handshake_seconds, engine=r.engine,
    )  # fmt: skip

"""Pieces both gRPC servicers use: Stats conversion, input checks, the drain gate."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from kvbridge.connector.daemon.runtime import DaemonRuntime
from kvbridge.connector.daemon.states import RequestRecord
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVBridgeService"].full_name
# RPCs refused while draining (Release and Stats keep working so peers can clean up).
DRAINED_METHODS = frozenset({f"/{SERVICE_NAME}/Prefill", f"/{SERVICE_NAME}/Generate"})
MAX_REQUEST_ID = 256


def request_status(rec: RequestRecord, now: float | None = None) -> pb.RequestStatus:
    now = time.monotonic() if now is None else now
    return pb.RequestStatus(
        request_id=rec.request_id,
        state=int(rec.state),
        num_prompt_tokens=rec.num_prompt_tokens,
        num_generated_tokens=rec.num_generated_tokens,
        num_blocks=rec.num_blocks,
        bytes=rec.bytes,
        descriptors=rec.descriptors,
        transfer_seconds=rec.transfer_seconds,
        peer=rec.peer,
        error=rec.error,
        age_seconds=now - rec.created,
    )


def stats_response(
    rt: DaemonRuntime, role: int, include_finished: bool, leased_blocks: int = 0
) -> pb.StatsResponse:
    c, reg = rt.counters, rt.registry.counters
    return pb.StatsResponse(
        role=role,
        engine_name=rt.name,
        backend=rt.cfg.backend,
        kv_layout=rt.cfg.kv_layout,
        num_blocks=rt.allocator.num_blocks,
        free_blocks=rt.allocator.num_free,
        blocks_in_use=rt.allocator.num_used,
        leased_blocks=leased_blocks,
        draining=rt.draining.is_set(),
        block_size=rt.cfg.block_size,
        compat_hash=rt.compat_hash,
        requests=[request_status(r) for r in rt.registry.snapshot(include_finished)],
        counters=pb.Counters(
            requests_total=int(reg["requests_total"]),
            requests_done=int(reg["requests_done"]),
            requests_failed=int(reg["requests_failed"]),
            transfers=int(c["transfers"]),
            bytes_transferred=int(c["bytes_transferred"]),
            descriptors=int(c["descriptors"]),
            transfer_seconds=float(c["transfer_seconds"]),
            transfer_failures=int(c["transfer_failures"]),
            lease_expiries=int(c["lease_expiries"]),
            leases_released=int(c["leases_released"]),
            tokens_generated=int(c["tokens_generated"]),
        ),
    )


def check_request_id(
    request_id: str, context: grpc.ServicerContext, limit: int = MAX_REQUEST_ID
) -> None:
    if len(request_id) > limit or any(ord(ch) < 32 for ch in request_id):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request_id must be at most {limit} printable characters",
        )


def check_tokens(tokens: list[int], vocab_size: int, context: grpc.ServicerContext) -> None:
    if not tokens:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the prompt has no tokens")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"prompt token ids must lie in [0, {vocab_size}); got {bad[:4]}",
        )


class DrainInterceptor(grpc.ServerInterceptor):
    """Answers UNAVAILABLE to Prefill/Generate once ``draining`` is set."""

    def __init__(self, draining: Callable[[], bool]) -> None:
        self._draining = draining

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method in DRAINED_METHODS and self._draining():

            def refuse(request, context):
                context.abort(grpc.StatusCode.UNAVAILABLE, "daemon is draining (shutting down)")

            handler = continuation(handler_call_details)
            if handler is not None and handler.response_streaming:
                return grpc.unary_stream_rpc_method_handler(refuse)
            return grpc.unary_unary_rpc_method_handler(refuse)
        return continuation(handler_call_details)

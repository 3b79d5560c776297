"""Pieces both gRPC servicers use: Stats conversion, input checks, the drain gate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
from kvbridge.connector.serving.daemon.runtime import DaemonRuntime
from kvbridge.connector.serving.daemon.states import RequestRecord
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVBridgeService"].full_name
# RPCs refused while draining (Release and Stats keep working so peers can clean up).
DRAINED_METHODS = frozenset({f"/{SERVICE_NAME}/Prefill", f"/{SERVICE_NAME}/Generate"})
MAX_REQUEST_ID = 256
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# services whose undecodable requests answer INVALID_ARGUMENT (gRPC's own: INTERNAL)
DECODED_PREFIXES = (f"/{SERVICE_NAME}/", HEALTH_PREFIX)


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


def peer_path(r) -> pb.PeerPath:
    """A transfer agent's ``PathReport`` as a ``PeerPath``."""
    return pb.PeerPath(
        peer=r.peer, engine=r.engine, transport=r.transport, probe_bytes=r.nbytes,
        read_bytes_per_second=r.read_bps, write_bytes_per_second=r.write_bps,
        read_error=r.read_error, write_error=r.write_error, direction=r.direction,
        degraded=list(r.degraded), expected_bytes_per_second=r.expected_bps,
        probed_unix_ms=int(r.probed_unix * 1000),
    )  # fmt: skip


def stats_response(
    rt: DaemonRuntime, role: int, include_finished: bool, leased_blocks: int = 0
) -> pb.StatsResponse:
    c = rt.counters  # read from the Prometheus metrics
    threads = threading.enumerate()
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
        quarantined_blocks=rt.quarantine.num_blocks,
        threads=len(threads),
        thread_names=sorted(t.name for t in threads),
        guard_band_bytes_changed=rt.guard_band_bytes_changed(),
        requests=[request_status(r) for r in rt.registry.snapshot(include_finished)],
        peer_paths=[peer_path(p) for p in list(rt.paths.values())],
        counters=pb.Counters(
            requests_total=int(c["requests_done"] + c["requests_failed"] + rt.registry.num_live),
            requests_done=int(c["requests_done"]),
            requests_failed=int(c["requests_failed"]),
            transfers=int(c["transfers"]),
            bytes_transferred=int(c["bytes_transferred"]),
            descriptors=int(c["descriptors"]),
            transfer_seconds=float(c["transfer_seconds"]),
            transfer_failures=int(c["transfer_failures"]),
            lease_expiries=int(c["lease_expiries"]),
            leases_released=int(c["leases_released"]),
            tokens_generated=int(c["tokens_generated"]),
            corrupt_transfers=int(c["corrupt_transfers"]),
            transfer_retries=int(c["transfer_retries"]),
            auth_failures=int(c["auth_failures"]),
            cancellations=int(c["cancellations"]),
        ),
    )


def check_request_id(
    request_id: str,
    context: grpc.ServicerContext,
    limit: int = MAX_REQUEST_ID,
    field: str = "request_id",
) -> None:
    if len(request_id) > limit or any(ord(ch) < 32 or ord(ch) == 127 for ch in request_id):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} must be at most {limit} printable characters",
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


class RequestDecodeInterceptor(grpc.ServerInterceptor):
    """Request bytes that are not a valid message answer ``INVALID_ARGUMENT`` naming the RPC
    (gRPC's own answer would be ``INTERNAL: Exception deserializing request!``)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or not method.startswith(DECODED_PREFIXES)
            or handler.request_streaming
            or handler.request_deserializer is None
        ):
            return handler
        parse, name = handler.request_deserializer, method.rsplit("/", 1)[-1]

        def decode(raw: bytes, context: grpc.ServicerContext):
            try:
                return parse(raw)
            except Exception as exc:  # protobuf's DecodeError and friends
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{name}: the request is not a valid {name}Request message: {exc}",
                )

        if handler.response_streaming:
            stream = handler.unary_stream

            def streaming(raw, context):
                yield from stream(decode(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(
                streaming, response_serializer=handler.response_serializer
            )
        unary = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(
            lambda raw, context: unary(decode(raw, context), context),
            response_serializer=handler.response_serializer,
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

"""Prefill daemon servicer: compute a prompt's KV, lease the blocks to the puller."""

from __future__ import annotations

import time
import uuid

import grpc
from kvbridge.connector.serving.daemon.allocator import OutOfBlocksError
from kvbridge.connector.serving.daemon.checksum import kv_checksum
from kvbridge.connector.serving.daemon.common import (
    MAX_REQUEST_ID,
    check_request_id,
    check_tokens,
    stats_response,
)
from kvbridge.connector.serving.daemon.leases import Lease, LeaseRevokedError, LeaseTable
from kvbridge.connector.serving.daemon.push import serve_push
from kvbridge.connector.serving.daemon.runtime import DaemonRuntime
from kvbridge.connector.serving.daemon.states import RequestState
from kvbridge.connector.serving.engine.prefill_batch import prefill_batcher
from kvbridge.connector.serving.model import blocks_needed
from kvbridge.connector.serving.model.identity import same_model
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

BLOCK_WAIT_SECONDS = 1.0
MAX_LEASE_SECONDS = 3600.0  # how long a Prefill waits for leased blocks to come back
MIN_LEASE_SECONDS = 0.01  # a shorter lease ends before its handle could be used


class PrefillServicer(pb_grpc.KVBridgeServiceServicer):
    """Serves Prefill, Push, Release and Stats; Generate belongs to decode daemons."""

    endpoint = None  # the daemon's TransferEndpoint (pushes), set by the server

    def __init__(self, rt: DaemonRuntime, side_address: str, instance: str = "") -> None:
        self.rt = rt
        self.side_address = side_address
        self.instance = instance  # the transfer agent's random id, new at every start
        self.leases = LeaseTable(rt.allocator, on_end=self._lease_ended)
        rt.metrics.blocks_leased.set_function(lambda: self.leases.leased_blocks)

    # ------------------------------------------------------------------ leases
    def _lease_ended(self, lease: Lease) -> None:
        rt = self.rt
        rec = rt.registry.get(lease.request_id)
        if lease.end_reason == "expired":
            rt.count_event("lease_expiries")
            rt.log.warning(
                "lease expired",
                extra={
                    "request_id": lease.request_id,
                    "owner": lease.owner,
                    "blocks": len(lease.block_ids),
                },
            )
            if rec is not None:
                rt.finish(rec, RequestState.FAILED, "lease expired before the peer released it")
        else:
            rt.count_event("leases_released")
            rt.log.info(
                "lease ended",
                extra={"request_id": lease.request_id, "reason": lease.end_reason},
            )
            if rec is not None:
                rt.finish(rec, RequestState.DONE)

    def on_peer_notification(self, request_id: str, sender: str = "") -> None:
        """The peer ``sender`` finished pulling ``request_id`` (transport notification).

        Only the lease's owner may end it this way: a notice from another engine is
        logged and ignored (the lease still ends on Release or expiry).
        """
        lease = self.leases.get(request_id)
        if lease is None:
            return
        if lease.owner and sender != lease.owner:
            self.rt.log.warning(
                "ignored a completion notice from an engine that does not hold the lease",
                extra={"request_id": request_id, "sender": sender, "owner": lease.owner},
            )
            return
        self.leases.end(request_id, "notified")

    # -------------------------------------------------------------------- RPCs
    def Prefill(
        self, request: pb.PrefillRequest, context: grpc.ServicerContext
    ) -> pb.PrefillResponse:
        rt, cfg = self.rt, self.rt.cfg
        arrived = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        check_request_id(request_id, context, 2 * MAX_REQUEST_ID)  # decode prefixes its name
        check_request_id(request.requester, context, MAX_REQUEST_ID, "requester")
        if len(request.prompt_token_ids) > cfg.num_blocks * cfg.block_size:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {len(request.prompt_token_ids)} tokens needs more blocks than "
                f"the cache's {cfg.num_blocks}",
            )
        tokens = list(request.prompt_token_ids)
        check_tokens(tokens, rt.model.cfg.vocab_size, context)
        if request.model_id and not same_model(request.model_id, rt.model.identity):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model mismatch: this prefill daemon serves {rt.model.identity}, "
                f"the requester serves {request.model_id}",
            )
        lease_ok = request.lease_seconds == 0 or (
            MIN_LEASE_SECONDS <= request.lease_seconds <= MAX_LEASE_SECONDS  # refuses NaN
        )
        if not lease_ok:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"lease_seconds must be 0 (the daemon's default) or lie in "
                f"[{MIN_LEASE_SECONDS}, {MAX_LEASE_SECONDS}], got {request.lease_seconds}",
            )
        n = blocks_needed(len(tokens), cfg.block_size)  # <= num_blocks: checked above
        try:
            rec = rt.registry.add(request_id, len(tokens), peer=request.requester)
        except ValueError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        try:
            left = context.time_remaining()  # never wait past the caller's deadline
            wait = BLOCK_WAIT_SECONDS if left is None else max(min(BLOCK_WAIT_SECONDS, left), 0)
            blocks = rt.allocator.allocate(n, timeout=wait)
        except OutOfBlocksError as exc:
            rt.finish(rec, RequestState.FAILED, str(exc))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill cache full: {exc}")
        rec.num_blocks = n
        try:
            t0 = time.perf_counter()
            left = context.time_remaining()  # queue for the model no longer than the caller
            out = prefill_batcher(rt).prefill(  # packed with concurrent prompts
                tokens, blocks, timeout=left, alive=context.is_active
            )
            waiting = out is not None and context.is_active()  # else the caller gave up
            first = out[1] if waiting else 0
            seconds = time.perf_counter() - t0
            checksum = (
                kv_checksum(rt.cache, blocks, len(tokens))
                if request.kv_checksum and waiting
                else ""
            )
        except Exception as exc:
            rt.allocator.free(blocks)
            rt.finish(rec, RequestState.FAILED, f"prefill failed: {exc}")
            rt.log.exception("prefill failed", extra={"request_id": request_id})
            context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc}")
        if not waiting:
            self._abandoned(rec, blocks, context, "before the computation")
        if not context.is_active():  # a lease only for a caller still waiting
            self._abandoned(rec, blocks, context, "after the computation")
        # TRANSFERRING before the lease exists: a lease ending at once (tiny ttl) then
        # finds the request in a state it can leave
        rt.registry.transition(request_id, RequestState.TRANSFERRING)
        ttl = request.lease_seconds or cfg.lease_seconds
        try:
            lease = self.leases.grant(request_id, blocks, request.requester, ttl)
        except LeaseRevokedError as exc:  # the peer's Release came first
            self._abandoned(rec, blocks, context, str(exc))
        rt.log.info(
            "prefill done",
            extra={
                "request_id": request_id,
                "tokens": len(tokens),
                "blocks": n,
                "seconds": round(seconds, 6),  # in the batcher: queue and forwards
                "allocate_s": round(t0 - arrived, 6),  # from the handler's start
                "handler_s": round(time.perf_counter() - arrived, 6),
            },
        )
        return pb.PrefillResponse(
            handle=pb.KVHandle(
                request_id=request_id,
                engine_name=rt.name,
                side_channel_address=self.side_address,
                block_ids=blocks,
                num_tokens=len(tokens),
                block_size=cfg.block_size,
                lease_expiry_unix_ms=int(lease.expires_unix * 1000),
                lease_seconds_left=lease.seconds_left(),
                first_token_id=first,
                backend=cfg.backend,
                kv_layout=cfg.kv_layout,
                compat_hash=rt.compat_hash,
                prefill_seconds=seconds,
                kv_checksum=checksum,
                engine_instance=self.instance,
                model_id=rt.model.identity,
            )
        )

    def _abandoned(self, rec, blocks: list[int], context: grpc.ServicerContext, when: str):
        """The caller is gone or released the request: free the blocks, grant nothing."""
        rt = self.rt
        rt.allocator.free(blocks)
        if rt.finish(rec, RequestState.FAILED, f"cancelled by the caller ({when})"):
            rt.count_event("cancellations")
        rt.log.info(
            "prefill abandoned by its caller; no lease granted",
            extra={"request_id": rec.request_id, "when": when},
        )
        context.abort(grpc.StatusCode.CANCELLED, f"the caller cancelled the request ({when})")

    def Release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        """End the lease; idempotent. A release of a request whose Prefill has not granted
        its lease yet (or not even arrived) is remembered, and that lease is never granted."""
        reason = f"released: {request.reason or 'by peer'}"
        rec = self.rt.registry.get(request.request_id)
        if rec is not None and rec.state.final:  # over already (an id may be reused later)
            lease = self.leases.end(request.request_id, reason)
        else:
            lease = self.leases.release(request.request_id, reason)
        if lease is None:
            return pb.ReleaseResponse(released=False)
        return pb.ReleaseResponse(released=True, freed_blocks=len(lease.block_ids))

    def Push(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushResponse:
        """Write a leased request's blocks into its owner's cache (push.py)."""
        return serve_push(self.rt, self.leases, self.endpoint, request, context)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return stats_response(
            self.rt, pb.ROLE_PREFILL, request.include_finished, self.leases.leased_blocks
        )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Generate is served by decode daemons, this is a prefill daemon",
        )

    # ------------------------------------------------------------------- drain
    def drain(self, timeout: float) -> bool:
        """Wait for every lease to be released or to expire (bounded by ``timeout``)."""
        return self.leases.wait_empty(timeout)

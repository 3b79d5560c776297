"""Decode daemon servicer: Generate = remote prefill → KV pull → local paged decode.

Per request (state in ``Stats``)::

    WAITING       local blocks allocated, Prefill RPC on a prefill daemon
    TRANSFERRING  KV blocks pulled with the transfer agent, prefill lease released
    DECODING      greedy decode steps with kernels.paged_decode, tokens streamed
    DONE/FAILED   local blocks freed (always, whatever happened)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import torch
from kvbridge.connector.daemon.allocator import OutOfBlocksError
from kvbridge.connector.daemon.common import check_request_id, check_tokens, stats_response
from kvbridge.connector.daemon.prefill_pool import PrefillPool
from kvbridge.connector.daemon.runtime import DaemonRuntime
from kvbridge.connector.daemon.states import RequestRecord, RequestState
from kvbridge.connector.model import blocks_needed
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

LEASE_MARGIN_SECONDS = 0.5  # a pull must end this long before the prefill lease does
BLOCK_WAIT_SECONDS = 5.0  # how long Generate waits for free local blocks


class RequestFailedError(Exception):
    """A request failed with a gRPC status to report."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class DecodeServicer(pb_grpc.KVBridgeServiceServicer):
    """Serves Generate, Release (abort) and Stats."""

    def __init__(self, rt: DaemonRuntime, endpoint, pool: PrefillPool) -> None:
        self.rt = rt
        self.endpoint = endpoint
        self.pool = pool
        self._aborted: set[str] = set()

    # -------------------------------------------------------------- Generate
    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        rt, cfg = self.rt, self.rt.cfg
        request_id = request.request_id or uuid.uuid4().hex
        check_request_id(request_id, context)
        tokens = list(request.prompt_token_ids) or (
            rt.tokenizer.encode(request.prompt) if request.prompt else []
        )
        check_tokens(tokens, rt.model.cfg.vocab_size, context)
        max_new = request.max_new_tokens
        if not 1 <= max_new <= cfg.max_new_tokens:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_new_tokens must lie in [1, {cfg.max_new_tokens}], got {max_new}",
            )
        n_local = blocks_needed(len(tokens) + max_new, cfg.block_size)
        if n_local > cfg.num_blocks:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(tokens)} prompt + {max_new} new tokens need {n_local} blocks; "
                f"the decode cache has {cfg.num_blocks}",
            )
        try:
            rec = rt.registry.add(request_id, len(tokens))
        except ValueError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        local: list[int] = []
        try:
            try:
                local = rt.allocator.allocate(n_local, timeout=BLOCK_WAIT_SECONDS)
            except OutOfBlocksError as exc:
                raise RequestFailedError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode cache full: {exc}"
                ) from None
            rec.num_blocks = n_local
            info, first = self._prefill_and_pull(rec, tokens, local, context)
            rt.registry.transition(request_id, RequestState.DECODING)
            yield pb.GenerateResponse(
                request_id=request_id,
                token_ids=[first],
                text=rt.tokenizer.decode([first]),
                transfer=info,
            )
            yield from self._decode(
                rec, tokens, first, max_new, set(request.stop_token_ids), local, context
            )
            rt.finish(rec, RequestState.DONE)
        except RequestFailedError as exc:
            rt.finish(rec, RequestState.FAILED, str(exc))
            context.abort(exc.code, str(exc))
        except GeneratorExit:  # the client went away mid-stream
            rt.finish(rec, RequestState.FAILED, "cancelled by the client")
            raise
        except Exception as exc:
            if rt.finish(rec, RequestState.FAILED, f"{type(exc).__name__}: {exc}"):
                rt.log.exception("generate failed", extra={"request_id": request_id})
            raise
        finally:
            if local:
                rt.allocator.free(local)
            self._aborted.discard(request_id)

    def _prefill_and_pull(
        self, rec: RequestRecord, tokens: list[int], local: list[int], context: grpc.ServicerContext
    ) -> tuple[pb.TransferInfo, int]:
        rt, cfg = self.rt, self.rt.cfg
        prefill_id = f"{rt.name}/{rec.request_id}"
        last_error = "no prefill daemon answered"
        for target in self.pool.order():
            with self.pool.use(target) as stub:
                rec.peer = target
                try:
                    resp = stub.Prefill(
                        pb.PrefillRequest(
                            request_id=prefill_id, prompt_token_ids=tokens, requester=rt.name
                        ),
                        timeout=cfg.request_timeout,
                    )
                except grpc.RpcError as exc:
                    last_error = f"prefill daemon {target}: {exc.code().name}: {exc.details()}"
                    if exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ):
                        rt.log.warning(
                            "prefill target refused, trying next",
                            extra={"target": target, "error": last_error},
                        )
                        continue
                    if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                        # the prefill may still lease blocks for us: free them (best effort)
                        self._release(stub, prefill_id, "prefill call failed")
                    raise RequestFailedError(exc.code(), last_error) from None
                received = time.monotonic()
                rt.registry.transition(rec.request_id, RequestState.TRANSFERRING)
                try:
                    info = self._pull(rec, resp.handle, local, received, target)
                finally:
                    self._release(stub, resp.handle.request_id)
                return info, resp.handle.first_token_id
        raise RequestFailedError(grpc.StatusCode.UNAVAILABLE, last_error)

    def _pull(
        self, rec: RequestRecord, h: pb.KVHandle, local: list[int], received: float, target: str
    ) -> pb.TransferInfo:
        rt, cfg = self.rt, self.rt.cfg
        n_src = len(h.block_ids)
        if h.block_size != cfg.block_size:
            raise RequestFailedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"prefill {target} uses block size {h.block_size}, "
                f"this decode daemon {cfg.block_size}",
            )
        if h.num_tokens != rec.num_prompt_tokens or n_src != blocks_needed(
            h.num_tokens, h.block_size
        ):
            raise RequestFailedError(
                grpc.StatusCode.INTERNAL,
                f"prefill {target} returned {n_src} blocks for {h.num_tokens} tokens "
                f"(sent {rec.num_prompt_tokens})",
            )
        deadline = received + h.lease_seconds_left - LEASE_MARGIN_SECONDS
        budget = min(cfg.transfer_timeout, deadline - time.monotonic())
        if budget <= 0:
            raise RequestFailedError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"prefill lease of {h.lease_seconds_left:.3f}s too short to pull",
            )
        try:
            result = self.endpoint.pull(h, local[:n_src], timeout=budget)
        except Exception as exc:
            rt.count(transfer_failures=1)
            rt.metrics.transfer_failures.inc()
            raise RequestFailedError(
                grpc.StatusCode.UNAVAILABLE, f"KV pull from {h.engine_name} failed: {exc}"
            ) from None
        if time.monotonic() > deadline:
            rt.count(transfer_failures=1)
            rt.metrics.transfer_failures.inc()
            raise RequestFailedError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "KV pull finished after the prefill lease ran out; blocks may have been reused",
            )
        rec.bytes, rec.descriptors, rec.transfer_seconds = (
            result.bytes,
            result.descriptors,
            result.seconds,
        )
        rt.count(
            transfers=1,
            bytes_transferred=result.bytes,
            descriptors=result.descriptors,
            transfer_seconds=result.seconds,
        )
        m = rt.metrics
        m.transfer_bytes.inc(result.bytes)
        m.transfer_descriptors.inc(result.descriptors)
        m.transfer_seconds.observe(result.seconds)
        rt.log.info(
            "kv pulled",
            extra={
                "request_id": rec.request_id,
                "peer": h.engine_name,
                "bytes": result.bytes,
                "descriptors": result.descriptors,
                "seconds": round(result.seconds, 6),
            },
        )
        return pb.TransferInfo(
            prefill_target=target,
            prefill_engine=h.engine_name,
            num_tokens=h.num_tokens,
            num_blocks=n_src,
            bytes=result.bytes,
            descriptors=result.descriptors,
            transfer_seconds=result.seconds,
            prefill_seconds=h.prefill_seconds,
            handshake_seconds=getattr(result, "handshake_seconds", 0.0),
            src_layout=h.kv_layout,
            dst_layout=cfg.kv_layout,
        )

    def _release(
        self, stub: pb_grpc.KVBridgeServiceStub, prefill_id: str, reason: str = "pulled"
    ) -> None:
        """Free the prefill lease (best effort: the lease expires anyway)."""
        try:
            stub.Release(
                pb.ReleaseRequest(request_id=prefill_id, reason=reason),
                timeout=self.rt.cfg.request_timeout,
            )
        except grpc.RpcError as exc:
            self.rt.log.warning(
                "release failed; the lease will expire",
                extra={"request_id": prefill_id, "error": exc.details()},
            )

    def _decode(
        self,
        rec: RequestRecord,
        prompt: list[int],
        first: int,
        max_new: int,
        stop: set[int],
        local: list[int],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.GenerateResponse]:
        rt = self.rt
        table = torch.tensor([local], dtype=torch.int32, device=rt.model.device)
        token, pos, generated = first, len(prompt), 1
        rec.num_generated_tokens = 1
        rt.count(tokens_generated=1)
        rt.metrics.tokens_generated.inc()
        if token in stop:
            yield pb.GenerateResponse(
                request_id=rec.request_id, finish_reason=pb.FINISH_REASON_STOP
            )
            return
        while generated < max_new:
            if not context.is_active() or rec.request_id in self._aborted:
                raise RequestFailedError(grpc.StatusCode.CANCELLED, "request aborted")
            with rt.compute_lock:
                logits = rt.model.decode_step([token], [pos], rt.cache, table)
            token, pos, generated = int(logits[0].argmax()), pos + 1, generated + 1
            rec.num_generated_tokens = generated
            rt.count(tokens_generated=1)
            rt.metrics.tokens_generated.inc()
            done = token in stop
            reason = (
                pb.FINISH_REASON_STOP
                if done
                else (pb.FINISH_REASON_LENGTH if generated == max_new else 0)
            )
            yield pb.GenerateResponse(
                request_id=rec.request_id,
                token_ids=[token],
                text=rt.tokenizer.decode([token]),
                finish_reason=reason,
            )
            if done:
                return
        if max_new == 1:
            yield pb.GenerateResponse(
                request_id=rec.request_id, finish_reason=pb.FINISH_REASON_LENGTH
            )

    # ------------------------------------------------------- Release / Stats
    def Release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        """Abort a live generation; its blocks are freed when its stream stops."""
        rec = self.rt.registry.get(request.request_id)
        if rec is None or rec.state.final:
            return pb.ReleaseResponse(released=False)
        self._aborted.add(request.request_id)
        return pb.ReleaseResponse(released=True, freed_blocks=rec.num_blocks)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return stats_response(self.rt, pb.ROLE_DECODE, request.include_finished)

    def Prefill(
        self, request: pb.PrefillRequest, context: grpc.ServicerContext
    ) -> pb.PrefillResponse:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Prefill is served by prefill daemons, this is a decode daemon",
        )

    def drain(self, timeout: float) -> bool:
        return self.rt.registry.wait_idle(timeout)

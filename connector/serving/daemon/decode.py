"""Decode daemon servicer: Generate = remote prefill → KV pull → local paged decode.

Per request (state in ``Stats``)::

    WAITING       local blocks allocated, Prefill RPC on a prefill daemon
    TRANSFERRING  KV blocks pulled with the transfer agent, prefill lease released
    DECODING      greedy decode steps with kernels.paged_decode, tokens streamed
    DONE/FAILED   local blocks freed (always, whatever happened); blocks a failed or
                  aborted pull may still be written by the engine are quarantined
                  first and freed once the engine lets go of them

A failed pull is retried (``--pull-retries``) while the lease lasts when the engine
reported a failure (not a timeout, not bad input) and is done with the blocks.
"""

from __future__ import annotations

import hmac
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import torch
from kvbridge.connector.serving.daemon.allocator import OutOfBlocksError
from kvbridge.connector.serving.daemon.checksum import kv_checksum
from kvbridge.connector.serving.daemon.common import check_request_id, check_tokens, stats_response
from kvbridge.connector.serving.daemon.prefill_pool import PrefillPool
from kvbridge.connector.serving.daemon.pull import PullError
from kvbridge.connector.serving.daemon.push import fetch
from kvbridge.connector.serving.daemon.runtime import DaemonRuntime
from kvbridge.connector.serving.daemon.states import RequestRecord, RequestState
from kvbridge.connector.serving.model import blocks_needed
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

LEASE_MARGIN_SECONDS = 0.5  # a pull must end this long before the prefill lease does
BLOCK_WAIT_SECONDS = 5.0  # how long Generate waits for free local blocks


# blocks a failed pull may still write, and how to ask whether the engine is done
Held = list[tuple[list[int], Callable[[], bool]]]


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
        most = cfg.num_blocks * cfg.block_size  # checked before any per-token work
        given = len(request.prompt_token_ids) or len(request.prompt.encode("utf-8", "replace"))
        if given > most:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {given} tokens needs more blocks than the decode cache's "
                f"{cfg.num_blocks} of {cfg.block_size} tokens",
            )
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
        held: Held = []
        try:
            try:
                local = rt.allocator.allocate(n_local, timeout=BLOCK_WAIT_SECONDS)
            except OutOfBlocksError as exc:
                raise RequestFailedError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode cache full: {exc}"
                ) from None
            rec.num_blocks = n_local
            info, first = self._prefill_and_pull(
                rec, tokens, local, context, held, request.verify_kv
            )
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
            self._free(rec, local, held)
            self._aborted.discard(request_id)

    def _free(self, rec: RequestRecord, local: list[int], held: Held) -> None:
        """Free the request's blocks; those an engine may still write go to quarantine."""
        rt = self.rt
        busy = {b for ids, _ in held for b in ids}
        rest = [b for b in local if b not in busy]
        if rest:
            rt.allocator.free(rest)
        for ids, quiet in held:
            rt.quarantine.release_or_hold(ids, quiet, f"request {rec.request_id}: failed pull")

    def _prefill_and_pull(
        self,
        rec: RequestRecord,
        tokens: list[int],
        local: list[int],
        context: grpc.ServicerContext,
        held: Held,
        verify: bool = False,
    ) -> tuple[pb.TransferInfo, int]:
        rt = self.rt
        prefill_id = f"{rt.name}/{rec.request_id}"
        last_error = "no prefill daemon answered"
        for target in self.pool.order():
            with self.pool.use(target) as stub:
                rec.peer = target
                try:
                    resp = stub.Prefill(
                        pb.PrefillRequest(
                            request_id=prefill_id,
                            prompt_token_ids=tokens,
                            requester=rt.name,
                            kv_checksum=verify,
                        ),
                        timeout=self._call_timeout(context),
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
                    info = self._pull(
                        rec, resp.handle, local, received, target, context, held, stub
                    )
                    if verify:
                        info.kv_checksum = self._verify(rec, resp.handle, local)
                except BaseException:
                    # fail the request now; the lease ends on this Release or on expiry
                    threading.Thread(
                        target=self._release,
                        args=(stub, resp.handle.request_id, "pull failed"),
                        name="kvbridge-release",
                        daemon=True,
                    ).start()
                    raise
                self._release(stub, resp.handle.request_id)
                return info, resp.handle.first_token_id
        raise RequestFailedError(grpc.StatusCode.UNAVAILABLE, last_error)

    def _call_timeout(self, context: grpc.ServicerContext) -> float:
        """``--request-timeout``, shortened to what is left of the client's own deadline."""
        left = context.time_remaining()
        timeout = self.rt.cfg.request_timeout
        return timeout if left is None else max(min(timeout, left), 0.0)

    def _pull(
        self,
        rec: RequestRecord,
        h: pb.KVHandle,
        local: list[int],
        received: float,
        target: str,
        context: grpc.ServicerContext,
        held: Held,
        stub: pb_grpc.KVBridgeServiceStub,
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
        if not 0 <= h.lease_seconds_left <= 3600:  # also refuses NaN
            raise RequestFailedError(
                grpc.StatusCode.INTERNAL,
                f"prefill {target} returned a lease of {h.lease_seconds_left} s",
            )
        deadline = received + h.lease_seconds_left - LEASE_MARGIN_SECONDS
        until = min(deadline, time.monotonic() + cfg.transfer_timeout)  # all attempts together
        dst = local[:n_src]

        def aborted() -> bool:
            return rec.request_id in self._aborted or not context.is_active()

        attempts = 0
        while True:
            attempts += 1
            budget = until - time.monotonic()
            if budget <= 0 and attempts == 1:
                raise RequestFailedError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"prefill lease of {h.lease_seconds_left:.3f}s too short to pull",
                )
            try:
                # pull, or have the prefill push when reads from it are degraded (push.py)
                result = fetch(self.endpoint, h, dst, stub, timeout=budget, aborted=aborted)
                break
            except PullError as exc:
                rt.count_event("transfer_failures")
                quiet = exc.quiet()
                if not quiet:
                    held.append((dst, exc.quiet))
                if exc.aborted:
                    raise RequestFailedError(
                        grpc.StatusCode.CANCELLED, f"request aborted during the KV pull: {exc}"
                    ) from None
                retry = exc.retryable and attempts <= cfg.pull_retries and not aborted()
                if not (quiet and retry and until - time.monotonic() > 0.1):
                    code = (
                        grpc.StatusCode.DEADLINE_EXCEEDED
                        if exc.timed_out
                        else grpc.StatusCode.UNAVAILABLE
                    )
                    raise RequestFailedError(
                        code, f"KV pull from {h.engine_name} failed (attempt {attempts}): {exc}"
                    ) from None
                rt.count_event("transfer_retries")
                rt.log.warning(
                    "KV pull failed, retrying",
                    extra={"request_id": rec.request_id, "peer": h.engine_name, "error": str(exc)},
                )
        if time.monotonic() > deadline:
            rt.count_event("transfer_failures")
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
                "direction": result.direction,
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
            handshake_seconds=result.handshake_seconds,
            src_layout=h.kv_layout,
            dst_layout=cfg.kv_layout,
            attempts=attempts,
            direction=result.direction,
            engine=result.engine,
        )

    def _verify(self, rec: RequestRecord, h: pb.KVHandle, local: list[int]) -> str:
        """Checksum the received KV; DATA_LOSS when it differs from the prefill's."""
        rt = self.rt
        if not h.kv_checksum:
            raise RequestFailedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"verify_kv: prefill {h.engine_name} returned no KV checksum",
            )
        got = kv_checksum(rt.cache, local[: len(h.block_ids)], int(h.num_tokens))
        if not hmac.compare_digest(got, h.kv_checksum):
            rt.count_event("corrupt_transfers")
            rt.log.error(
                "received KV differs from the prefill's",
                extra={"request_id": rec.request_id, "want": h.kv_checksum, "got": got},
            )
            raise RequestFailedError(
                grpc.StatusCode.DATA_LOSS,
                f"KV checksum mismatch: prefill {h.kv_checksum}, received {got}",
            )
        return got

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
        rt.count_event("tokens_generated")
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
            rt.count_event("tokens_generated")
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

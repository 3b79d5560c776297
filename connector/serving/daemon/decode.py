"""Decode daemon servicer: Generate = remote prefill → KV pull → local paged decode.

Per request (state in ``Stats``)::

    WAITING       local blocks allocated, Prefill RPC on a prefill daemon
    TRANSFERRING  KV blocks pulled with the transfer agent, prefill lease released
    DECODING      the sequence joins the engine loop's batch (``kvbridge.connector.
                  serving.engine``): one batched decode step for every active sequence,
                  tokens streamed from the request's queue
    DONE/FAILED   local blocks freed (always, whatever happened); blocks a failed or
                  aborted pull may still be written by the engine are quarantined
                  first and freed once the engine lets go of them

A failed pull is retried (``--pull-retries``) while the lease lasts when the engine
reported a failure (not a timeout, not bad input) and is done with the blocks.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
from kvbridge.connector.serving.daemon.allocator import OutOfBlocksError
from kvbridge.connector.serving.daemon.common import check_request_id, check_tokens, stats_response
from kvbridge.connector.serving.daemon.decode_checks import (
    check_peer_model,
    sampling_params,
    verify_kv,
)
from kvbridge.connector.serving.daemon.latency import LatencyMetrics, log_timeline
from kvbridge.connector.serving.daemon.peer_calls import PeerCalls, PeerRefused, remaining
from kvbridge.connector.serving.daemon.prefill_pool import PrefillPool
from kvbridge.connector.serving.daemon.pull import PullError
from kvbridge.connector.serving.daemon.push import fetch
from kvbridge.connector.serving.daemon.runtime import DaemonRuntime, start_decode_engine
from kvbridge.connector.serving.daemon.states import RequestRecord, RequestState
from kvbridge.connector.serving.daemon.status import RequestFailedError, none_answered
from kvbridge.connector.serving.engine import (
    Admission,
    AdmissionCancelledError,
    QueueFullError,
    Sequence,
)
from kvbridge.connector.serving.engine.process import EngineDeadError
from kvbridge.connector.serving.model import blocks_needed
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

_CANCELLED = grpc.StatusCode.CANCELLED
LEASE_MARGIN_SECONDS = 0.5  # a pull must end this long before the prefill lease does


# blocks a failed pull may still write, and how to ask whether the engine is done
Held = list[tuple[list[int], Callable[[], bool]]]

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, None: 0}
LEAVE_WAIT_SECONDS = 30.0  # how long a finished stream waits for the engine to drop its rows


class DecodeServicer(pb_grpc.KVBridgeServiceServicer):
    """Serves Generate, Release (abort) and Stats."""

    def __init__(self, rt: DaemonRuntime, endpoint, pool: PrefillPool) -> None:
        self.rt = rt
        self.endpoint = endpoint
        self.pool = pool
        self.calls = PeerCalls(rt)  # Prefill within the deadline, Release in the background
        self._aborted: set[str] = set()
        cfg = rt.cfg
        graphs = cfg.cuda_graphs and rt.model.device.type == "cuda"
        # CUDA-graph padding rows write one scratch block no request owns
        pad = rt.allocator.allocate(1)[0] if graphs else 0
        self.admission = Admission(rt.allocator, cfg.max_waiting)
        self.engine = start_decode_engine(rt, graphs, pad)
        self.latency = LatencyMetrics(rt.metrics.registry, rt.cfg.role)

    # -------------------------------------------------------------- Generate
    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        rt, cfg = self.rt, self.rt.cfg
        timer = self.latency.start()
        request_id = request.request_id or uuid.uuid4().hex
        check_request_id(request_id, context)
        most = cfg.num_blocks * cfg.block_size  # checked before any per-token work
        # text: a token holds at most max_bytes_per_token bytes, so longer text cannot fit
        given = len(request.prompt_token_ids) or -(
            -len(request.prompt.encode("utf-8", "replace")) // rt.tokenizer.max_bytes_per_token
        )
        tokens: list[int] = []
        if given <= most:
            tokens = list(request.prompt_token_ids) or (
                rt.tokenizer.encode(request.prompt) if request.prompt else []
            )
            given = len(tokens)
        if given > most:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {given}{'+' if not tokens else ''} tokens needs more blocks than "
                f"the decode cache's {cfg.num_blocks} of {cfg.block_size} tokens",
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
        sampling = sampling_params(request, context)
        try:
            rec = rt.registry.add(request_id, len(tokens))
        except ValueError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        local: list[int] = []
        held: Held = []
        seq: Sequence | None = None
        try:
            local = self._admit(request_id, n_local, context)
            rec.num_blocks = n_local
            timer.admitted()
            rec.marks["admitted"] = time.monotonic()
            info, first = self._prefill_and_pull(
                rec, tokens, local, context, held, request.verify_kv
            )
            rt.registry.transition(request_id, RequestState.DECODING)
            detok = rt.tokenizer.stream()  # text pieces never split a character
            msg = pb.GenerateResponse(
                request_id=request_id,
                token_ids=[first],
                text=detok.push(first),
                transfer=info,
            )
            timer.observe(msg)
            log_timeline(rt.log, rec)
            yield msg
            rec.num_generated_tokens = 1
            rt.count_event("tokens_generated")
            stop = frozenset(request.stop_token_ids) | rt.stop_ids  # plus the checkpoint's EOS
            if first in stop or max_new == 1:
                reason = pb.FINISH_REASON_STOP if first in stop else pb.FINISH_REASON_LENGTH
                msg = pb.GenerateResponse(
                    request_id=request_id, text=detok.flush(), finish_reason=reason
                )
                timer.observe(msg)
                yield msg
            else:
                out: queue.SimpleQueue = queue.SimpleQueue()
                seq = Sequence(
                    request_id, local, len(tokens), first, max_new, stop, sampling,
                    emit=lambda toks, fin, err: out.put((toks, fin, err)),
                )  # fmt: skip
                try:
                    self.engine.submit(seq)
                except EngineDeadError as exc:
                    raise RequestFailedError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
                for msg in self._stream(rec, seq, out, context, detok):
                    timer.observe(msg)
                    yield msg
            rt.finish(rec, RequestState.DONE)
        except RequestFailedError as exc:
            timer.fail(exc.code)
            if rt.finish(rec, RequestState.FAILED, str(exc)) and exc.code == _CANCELLED:
                rt.count_event("cancellations")  # counted apart from failures
            context.abort(exc.code, str(exc))
        except GeneratorExit:  # the client went away mid-stream
            timer.fail()
            if rt.finish(rec, RequestState.FAILED, "cancelled by the client"):
                rt.count_event("cancellations")
            raise
        except Exception as exc:
            if rt.finish(rec, RequestState.FAILED, f"{type(exc).__name__}: {exc}"):
                rt.log.exception("generate failed", extra={"request_id": request_id})
            raise
        finally:
            timer.finish()
            if seq is not None and not seq.left.is_set():
                self.engine.cancel(request_id, "the stream ended")
                if not seq.left.wait(LEAVE_WAIT_SECONDS):  # never free blocks still in use
                    rt.log.error("engine kept a sequence; its blocks leak",
                                 extra={"request_id": request_id})  # fmt: skip
                    local = []
            self._free(rec, local, held)
            self._aborted.discard(request_id)

    def _admit(self, request_id: str, n: int, context: grpc.ServicerContext) -> list[int]:
        """The request's local blocks, after a wait in the admission queue if need be."""
        try:
            return self.admission.acquire(
                request_id,
                n,
                timeout=context.time_remaining(),
                cancelled=lambda: request_id in self._aborted or not context.is_active(),
            )
        except QueueFullError as exc:
            raise RequestFailedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode daemon busy: {exc}"
            ) from None
        except OutOfBlocksError as exc:
            raise RequestFailedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode cache full: {exc}"
            ) from None
        except AdmissionCancelledError as exc:
            raise RequestFailedError(grpc.StatusCode.CANCELLED, str(exc)) from None

    def _free(self, rec: RequestRecord, local: list[int], held: Held) -> None:
        """Free the request's blocks; those an engine may still write go to quarantine."""
        rt = self.rt
        busy = {b for ids, _ in held for b in ids}
        rest = [b for b in local if b not in busy]
        self.admission.release(rest)  # frees them and serves the admission queue
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
        """Prefill on the first target that answers, pull its KV; every wait within the
        client's deadline, clean-up calls in the background (``peer_calls``)."""
        rt, calls = self.rt, self.calls
        prefill_id = f"{rt.name}/{rec.request_id}"
        request = pb.PrefillRequest(
            request_id=prefill_id,
            prompt_token_ids=tokens,
            requester=rt.name,
            kv_checksum=verify,
            model_id=rt.model.identity,
        )
        refused: list[tuple[str, PeerRefused]] = []

        def attempts():
            first = self.pool.order()
            yield from ((t, False) for t in first)
            # then the targets that were unreachable, once each, as soon as they reconnect
            again = [t for t, e in refused if e.code == grpc.StatusCode.UNAVAILABLE]
            yield from ((t, True) for t in again)

        for target, again in attempts():
            if again and not calls.wait_ready(self.pool.channel(target), context):
                continue
            with self.pool.use(target) as stub:
                rec.peer = target
                try:
                    called = time.monotonic()
                    resp = calls.prefill(stub, target, request, context)
                    # the call's wall time, queueing and gRPC included
                    self.latency.prefill_call.observe(time.monotonic() - called)
                except PeerRefused as exc:
                    if exc.code == grpc.StatusCode.UNAVAILABLE:
                        self.pool.mark_down(target)  # tried last until its health is SERVING
                    refused.append((target, exc))
                    continue
                received = rec.marks["prefilled"] = time.monotonic()
                rt.registry.transition(rec.request_id, RequestState.TRANSFERRING)
                try:
                    info = self._pull(
                        rec, resp.handle, local, received, target, context, held, stub
                    )
                    rec.marks["pulled"] = time.monotonic()
                    if verify:
                        info.kv_checksum = verify_kv(self.rt, rec.request_id, resp.handle, local)
                        rec.marks["verified"] = time.monotonic()
                except BaseException:
                    # fail the request now; the lease ends on this Release or on expiry
                    calls.release(stub, resp.handle.request_id, "pull failed")
                    raise
                calls.release(stub, resp.handle.request_id, "pulled")
                return info, resp.handle.first_token_id
        raise none_answered(list(dict(refused).values()))  # the last answer of each target

    def _call_timeout(self, context: grpc.ServicerContext) -> float:
        """``--request-timeout``, shortened to what is left of the client's own deadline."""
        return remaining(context, self.rt.cfg.request_timeout)

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
        check_peer_model(rt.model, h, target)
        if h.num_tokens != rec.num_prompt_tokens or n_src != blocks_needed(
            h.num_tokens, max(h.block_size, 1)
        ):
            raise RequestFailedError(  # a broken peer: its failure, not ours
                grpc.StatusCode.UNAVAILABLE,
                f"prefill {target} returned {n_src} blocks for {h.num_tokens} tokens "
                f"(sent {rec.num_prompt_tokens})",
            )
        if not 0 <= h.lease_seconds_left <= 3600:  # also refuses NaN
            raise RequestFailedError(
                grpc.StatusCode.UNAVAILABLE,
                f"prefill {target} returned a lease of {h.lease_seconds_left} s",
            )
        deadline = received + h.lease_seconds_left - LEASE_MARGIN_SECONDS
        # all attempts together, within the lease and the client's deadline
        client_left = remaining(context, cfg.transfer_timeout)
        until = min(deadline, time.monotonic() + client_left)
        dst = local[: blocks_needed(h.num_tokens, cfg.block_size)]
        # another block size: a token-space plan (only the prompt's tokens move)
        num_tokens = int(h.num_tokens) if h.block_size != cfg.block_size else None

        def aborted() -> bool:
            return rec.request_id in self._aborted or not context.is_active()

        attempts = 0
        while True:
            attempts += 1
            budget = until - time.monotonic()
            if budget <= 0 and attempts == 1:
                raise RequestFailedError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"prefill lease of {h.lease_seconds_left:.3f}s too short to pull"
                    if client_left >= cfg.transfer_timeout
                    else "the client's deadline passed before the KV pull",
                )
            try:
                # pull, or have the prefill push when reads from it are degraded (push.py)
                result = fetch(
                    self.endpoint, h, dst, stub, timeout=budget, aborted=aborted,
                    num_tokens=num_tokens,
                )  # fmt: skip
                break
            except PullError as exc:
                if not exc.aborted:  # a cancellation (counted by Generate) is no failure
                    rt.count_event("transfer_failures")
                quiet = exc.quiet()
                if not quiet:
                    held.append((dst, exc.quiet))
                if exc.aborted:
                    raise RequestFailedError(
                        grpc.StatusCode.CANCELLED, f"request aborted during the KV pull: {exc}"
                    ) from None
                if exc.permanent:  # e.g. an incompatible cache: retrying cannot help
                    raise RequestFailedError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"KV pull from {h.engine_name} refused: {exc}",
                    ) from None
                retry = exc.retryable and attempts <= cfg.pull_retries and not aborted()
                if not (quiet and retry and until - time.monotonic() > 0.1):
                    # out of time (the lease, --transfer-timeout or the client's deadline)
                    # whatever the step that ran out: DEADLINE_EXCEEDED
                    out_of_time = exc.timed_out or until - time.monotonic() <= 0.01
                    code = (
                        grpc.StatusCode.DEADLINE_EXCEEDED
                        if out_of_time
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
        rt.count_transfer(result.bytes, result.descriptors, result.seconds)
        rt.log.info(
            "kv pulled",
            extra={
                "request_id": rec.request_id,
                "peer": h.engine_name,
                "bytes": result.bytes,
                "descriptors": result.descriptors,
                "seconds": round(result.seconds, 6),
                "direction": result.direction,
                "post_s": round(result.phases[0], 6),
                "wait_s": round(result.phases[1], 6),
                "finish_s": round(result.phases[2], 6),
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

    def _release(
        self, stub: pb_grpc.KVBridgeServiceStub, prefill_id: str, reason: str = "pulled"
    ) -> None:
        """Free the prefill lease in the background, retried (the lease expires anyway)."""
        self.calls.release(stub, prefill_id, reason)

    def _stream(
        self,
        rec: RequestRecord,
        seq: Sequence,
        out: queue.SimpleQueue,
        context: grpc.ServicerContext,
        detok,
    ) -> Iterator[pb.GenerateResponse]:
        """Stream what the engine emits for ``seq`` until it finishes."""
        rt, rid = self.rt, rec.request_id
        while True:
            try:
                toks, finish, error = out.get(timeout=0.1)
            except queue.Empty:
                if not context.is_active() or rid in self._aborted:
                    self.engine.cancel(rid, "request aborted")
                continue
            while not finish:  # fell behind the engine: send what is queued at once
                try:
                    more, finish, error = out.get_nowait()
                except queue.Empty:
                    break
                toks = toks + more
            if finish == "cancelled":
                raise RequestFailedError(grpc.StatusCode.CANCELLED, error or "request aborted")
            if finish == "failed":
                raise RequestFailedError(grpc.StatusCode.INTERNAL, error or "decode failed")
            rec.num_generated_tokens += len(toks)
            rt.metrics.tokens_generated.inc(len(toks))
            yield pb.GenerateResponse(
                request_id=rid,
                token_ids=toks,
                text="".join(detok.push(t) for t in toks) + (detok.flush() if finish else ""),
                finish_reason=FINISH[finish],
            )
            if finish:
                return

    # ------------------------------------------------------- Release / Stats
    def Release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        """Abort a live generation; its blocks are freed when its stream stops."""
        rec = self.rt.registry.get(request.request_id)
        if rec is None or rec.state.final:
            return pb.ReleaseResponse(released=False)
        self._aborted.add(request.request_id)
        self.engine.cancel(request.request_id, f"request aborted: {request.reason or 'Release'}")
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

    def close(self) -> None:
        """Stop the engine loop (after the drain)."""
        self.engine.stop()

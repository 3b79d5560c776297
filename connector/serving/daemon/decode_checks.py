"""Checks of the decode daemon: a Generate request's sampling fields, a peer's handle,
the received KV against the prefill's checksum."""

from __future__ import annotations

import hmac
import random

import grpc
from kvbridge.connector.serving.daemon.checksum import kv_checksum
from kvbridge.connector.serving.daemon.status import RequestFailedError
from kvbridge.connector.serving.engine import SamplingParams
from kvbridge.connector.serving.model import blocks_needed
from kvbridge.connector.serving.model.identity import same_model
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb


def check_peer_model(model, h: pb.KVHandle, target: str) -> None:
    """Refuse KV from another model, and a first token outside our vocabulary."""
    if not same_model(h.model_id, model.identity):
        raise RequestFailedError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"model mismatch: prefill {target} serves {h.model_id or 'an unnamed model'}, "
            f"this decode daemon {model.identity}",
        )
    if not 0 <= h.first_token_id < model.cfg.vocab_size:
        raise RequestFailedError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"prefill {target} returned token id {h.first_token_id}, outside this model's "
            f"vocabulary [0, {model.cfg.vocab_size})",
        )


def sampling_params(request: pb.GenerateRequest, context: grpc.ServicerContext) -> SamplingParams:
    """Checked sampling fields of ``request`` (INVALID_ARGUMENT naming the bad one)."""
    t, p, k = request.temperature, request.top_p, request.top_k
    if not 0.0 <= t <= 100.0:  # also refuses NaN
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"temperature must lie in [0, 100], got {t}"
        )
    if not 0.0 <= p <= 1.0:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_p must lie in [0, 1], got {p}")
    if k < 0:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be >= 0, got {k}")
    seed = request.seed if request.HasField("seed") else random.getrandbits(64)
    return SamplingParams(temperature=t, top_p=p, top_k=k, seed=seed)


def verify_kv(rt, request_id: str, h: pb.KVHandle, local: list[int]) -> str:
    """Checksum the received KV; DATA_LOSS when it differs from the prefill's."""
    if not h.kv_checksum:
        raise RequestFailedError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"verify_kv: prefill {h.engine_name} returned no KV checksum",
        )
    dst = local[: blocks_needed(h.num_tokens, rt.cfg.block_size)]
    got = kv_checksum(rt.cache, dst, int(h.num_tokens))
    if not hmac.compare_digest(got, h.kv_checksum):
        rt.count_event("corrupt_transfers")
        rt.log.error(
            "received KV differs from the prefill's",
            extra={"request_id": request_id, "want": h.kv_checksum, "got": got},
        )
        raise RequestFailedError(
            grpc.StatusCode.DATA_LOSS,
            f"KV checksum mismatch: prefill {h.kv_checksum}, received {got}",
        )
    return got

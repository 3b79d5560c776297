"""Property-based fuzzing of every gRPC method of both daemons (hypothesis).

Raw random bytes, structured requests with adversarial fields (ids with control
characters, out-of-range token ids, NaN / huge leases, absurd lengths and counts)
and oversize messages. Every call gets either an answer or a gRPC status with a
message from an allowed set (never UNKNOWN, never INTERNAL); after every example
both daemons are SERVING, hold nothing they should not, and the poison bands
around both caches are unchanged (no byte outside the registered regions moved).
"""

from __future__ import annotations

import math

import grpc
import pytest
from faultkit import healthy, local_daemon, stats, wait_for
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

pytestmark = pytest.mark.faults

SERVICE = "/kvbridge.v1.KVBridgeService/"
MAX_NEW = 4
ANSWERS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Daemons:
    def __init__(self, tmp) -> None:
        self.prefill = local_daemon("prefill", "nixl", tmp, "fz-p", "--lease-seconds", "3")
        self.decode = local_daemon(
            "decode", "nixl", tmp, "fz-d", "--max-new-tokens", str(MAX_NEW),
            "--prefill", self.prefill.target, "--transfer-timeout", "5",
        )  # fmt: skip
        self.channels = {"prefill": self.prefill.channel(), "decode": self.decode.channel()}
        self.calls = 0

    def raw(self, role: str, method: str, payload: bytes):
        """Call ``method`` with raw request bytes; the response bytes or the RpcError."""
        ch = self.channels[role]
        self.calls += 1
        try:
            if method == "Generate":
                return b"".join(ch.unary_stream(SERVICE + method)(payload, timeout=30))
            return ch.unary_unary(SERVICE + method)(payload, timeout=30)
        except grpc.RpcError as exc:
            return exc

    def close(self) -> dict:
        for ch in self.channels.values():
            ch.close()
        return {p.name: p.terminate(20) for p in (self.decode, self.prefill)}


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    pytest.importorskip("nixl_cu12")
    d = Daemons(tmp_path_factory.mktemp("fuzz"))
    try:
        yield d
    finally:
        codes = d.close()
    assert all(c == 0 for c in codes.values()), codes


def _answered(result, method: str) -> None:
    if isinstance(result, grpc.RpcError):
        assert result.code() in ANSWERS, (method, result.code(), result.details())
        assert result.details(), f"{method}: {result.code()} without a message"


def _still_sound(d: Daemons) -> None:
    for proc in (d.prefill, d.decode):
        s = stats(_stub(d, proc))
        assert s.guard_band_bytes_changed == 0, f"{proc.name}: bytes outside the cache changed"
    assert healthy(d.prefill) and healthy(d.decode)


def _stub(d: Daemons, proc):
    from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

    return pb_grpc.KVBridgeServiceStub(d.channels["prefill" if proc is d.prefill else "decode"])


METHODS = ("Prefill", "Generate", "Release", "Stats")


@FUZZ
@given(role=st.sampled_from(["prefill", "decode"]), method=st.sampled_from(METHODS),
       payload=st.binary(max_size=512))  # fmt: skip
def test_random_bytes_to_every_method(daemons, role, method, payload):
    result = daemons.raw(role, method, payload)
    _answered(result, method)
    try:
        getattr(pb, f"{method}Request").FromString(payload)
    except Exception:  # undecodable bytes: INVALID_ARGUMENT naming the RPC
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, result
        assert f"not a valid {method}Request" in result.details()
    _release_everything(daemons)
    _still_sound(daemons)


request_ids = st.one_of(
    st.just(""), st.text(max_size=40), st.text(min_size=250, max_size=600),
    st.text(alphabet=st.characters(max_codepoint=31), min_size=1, max_size=5),
)  # fmt: skip
token_lists = st.one_of(
    st.lists(st.integers(1, 511), min_size=1, max_size=80),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20),
    st.lists(st.integers(0, 600), min_size=900, max_size=1100),  # near/over the cache size
)
leases = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 5))


@FUZZ
@given(rid=request_ids, tokens=token_lists, lease=leases, requester=request_ids,
       checksum=st.booleans())  # fmt: skip
def test_structured_prefill_requests(daemons, rid, tokens, lease, requester, checksum):
    req = pb.PrefillRequest(request_id=rid, prompt_token_ids=tokens, lease_seconds=lease,
                            requester=requester, kv_checksum=checksum)  # fmt: skip
    result = daemons.raw("prefill", "Prefill", req.SerializeToString())
    _answered(result, "Prefill")
    if not isinstance(result, grpc.RpcError):
        h = pb.PrefillResponse.FromString(result).handle
        assert len(h.block_ids) == -(-len(tokens) // 16) and len(set(h.block_ids)) == len(
            h.block_ids
        )
        assert 0 < h.lease_seconds_left <= (lease or 3.0) and bool(h.kv_checksum) == checksum
        assert all(0 <= t < 512 for t in tokens) and math.isfinite(lease) and lease >= 0
    _release_everything(daemons)
    _still_sound(daemons)


@FUZZ
@given(rid=request_ids, tokens=st.one_of(st.just([]), token_lists),
       prompt=st.text(max_size=200) | st.text(min_size=1500, max_size=1600),
       max_new=st.integers(-(2**31), 2**31 - 1) | st.integers(1, MAX_NEW),
       stop=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4),
       verify=st.booleans())  # fmt: skip
def test_structured_generate_requests(daemons, rid, tokens, prompt, max_new, stop, verify):
    req = pb.GenerateRequest(
        request_id=rid, prompt=prompt, prompt_token_ids=tokens, max_new_tokens=max_new,
        stop_token_ids=stop, verify_kv=verify,
    )  # fmt: skip
    result = daemons.raw("decode", "Generate", req.SerializeToString())
    _answered(result, "Generate")
    _release_everything(daemons)
    _still_sound(daemons)


@FUZZ
@given(role=st.sampled_from(["prefill", "decode"]), rid=request_ids, reason=st.text(max_size=300),
       finished=st.booleans())  # fmt: skip
def test_structured_release_and_stats(daemons, role, rid, reason, finished):
    r = daemons.raw(role, "Release", pb.ReleaseRequest(request_id=rid, reason=reason)
                    .SerializeToString())  # fmt: skip
    _answered(r, "Release")
    assert not isinstance(r, grpc.RpcError) and not pb.ReleaseResponse.FromString(r).released
    s = daemons.raw(role, "Stats", pb.StatsRequest(include_finished=finished).SerializeToString())
    assert not isinstance(s, grpc.RpcError)
    _still_sound(daemons)


def test_oversize_and_wrong_role_and_health(daemons):
    big = pb.GenerateRequest(prompt="x" * (5 << 20), max_new_tokens=1).SerializeToString()
    result = daemons.raw("decode", "Generate", big)
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (
        result.details()
    )
    for role, method in (("prefill", "Generate"), ("decode", "Prefill")):
        req = (pb.GenerateRequest if method == "Generate" else pb.PrefillRequest)(
            prompt_token_ids=[1, 2]
        )
        result = daemons.raw(role, method, req.SerializeToString())
        assert result.code() == grpc.StatusCode.UNIMPLEMENTED and "served by" in result.details()
    health = daemons.raw("decode", "../grpc.health.v1.Health/Check", b"")
    assert isinstance(health, grpc.RpcError)  # not a method: UNIMPLEMENTED, daemon fine
    assert health.code() == grpc.StatusCode.UNIMPLEMENTED
    ok = daemons.channels["decode"].unary_unary("/grpc.health.v1.Health/Check")(
        health_pb2.HealthCheckRequest().SerializeToString(), timeout=10
    )
    assert health_pb2.HealthCheckResponse.FromString(ok).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    _still_sound(daemons)
    assert daemons.calls >= 4 * 40  # the examples above really ran (reported in bench/README)


def _release_everything(d: Daemons) -> None:
    """End leases a successful fuzzed Prefill left (they would expire anyway)."""
    p = _stub(d, d.prefill)
    for r in stats(p, False).requests:
        p.Release(pb.ReleaseRequest(request_id=r.request_id), timeout=10)
    wait_for(lambda: stats(p, False).leased_blocks == 0, 10, "fuzzed leases released")
    wait_for(lambda: (s := stats(_stub(d, d.decode), False)).blocks_in_use == 0
             and not s.requests, 30, "fuzzed generations finished")  # fmt: skip

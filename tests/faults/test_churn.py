"""Churn against real daemons on loopback: cancelled clients, a hung prefill daemon,
many open streams, status codes. (A restarted prefill daemon: test_churn_restart.py.)

One prefill/decode pair serves the module (NIXL: nothing here depends on the engine):
the prefill leases for 30 s, so a lease that is not released shows for the rest of
the test; the decode calls its peers with ``--request-timeout 3`` and admits
``STREAMS`` generations at once.
"""

from __future__ import annotations

import os
import random
import signal
import time
from types import SimpleNamespace

import grpc
import pytest
from faultkit import (
    LAYOUTS,
    daemon_args,
    gen,
    in_thread,
    prompt_ids,
    reference_tokens,
    stats,
    wait_for,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbridge.connector.serving.daemon.health import LIVENESS_SERVICE
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

pytestmark = pytest.mark.faults

BACKEND = "nixl"
STREAMS = 120  # --max-requests of the decode daemon: all open at once
REQUEST_TIMEOUT = 3.0
S = grpc.StatusCode


def start_all(
    tmp, specs: list[tuple[str, str, list[str]]], up_only: tuple[str, ...] = ()
) -> list[DaemonProcess]:
    """Start daemons ``(role, name, extra args)`` together; wait until all are ready
    (those named in ``up_only`` only live: a decode daemon without a live prefill)."""
    procs = []
    for role, name, extra in specs:
        layout = LAYOUTS[BACKEND][0 if role == "prefill" else 1]
        args = daemon_args(BACKEND, layout, "--side-port", "0", *extra)
        procs.append(DaemonProcess(role, args, tmp, name).start())
    for p in procs:
        p.wait_ready(90, service=LIVENESS_SERVICE if p.name in up_only else "")
    return procs


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pytest.importorskip("nixl_cu12")
    tmp = tmp_path_factory.mktemp("churn")
    (prefill,) = start_all(tmp, [("prefill", "churn-p", ["--lease-seconds", "30"])])
    (decode,) = start_all(tmp, [("decode", "churn-d", [
        "--prefill", prefill.target, "--request-timeout", str(REQUEST_TIMEOUT),
        "--max-requests", str(STREAMS), "--num-blocks", "2000"])])  # fmt: skip
    chans = [prefill.channel(), decode.channel()]
    try:
        p, d = (pb_grpc.KVBridgeServiceStub(c) for c in chans)
        yield SimpleNamespace(prefill=prefill, decode=decode, p=p, d=d)
    finally:
        for c in chans:
            c.close()
        if prefill.proc.poll() is None:
            os.kill(prefill.proc.pid, signal.SIGCONT)
        codes = [p.terminate(20) for p in (decode, prefill)]
    assert codes == [0, 0]


def leased(p_stub) -> int:
    return stats(p_stub, False).leased_blocks


def test_cancelled_generations_leave_no_leases(pair):
    """Clients giving up at random points (before, during and after the prefill's
    computation) leave no lease behind: each is freed within about a second, none
    expires, and the next request is served."""
    p, d = pair.p, pair.d
    before = stats(p).counters
    rng = random.Random(12)
    calls = []
    for i in range(16):
        ids = prompt_ids(3, 100 + i)
        timeout = rng.choice([0.02, 0.05, 0.08, 0.12, 0.2, 0.3])
        calls.append(in_thread(gen, d, ids, 40, timeout=timeout))
    outcomes = [c.exception(60) for c in calls]
    assert sum(isinstance(e, grpc.RpcError) for e in outcomes) >= 6  # most ran out of time
    for e in outcomes:
        assert e is None or e.code() in (S.DEADLINE_EXCEEDED, S.CANCELLED), e
    took = wait_for(lambda: leased(p) == 0, 5, "leases of abandoned requests freed")
    # well before the 30 s lease (no expiry below): released, not expired
    assert took < 3.0, f"abandoned leases freed only after {took:.2f} s"
    after = stats(p).counters
    assert after.lease_expiries == before.lease_expiries
    ids = prompt_ids(2, 7)
    assert gen(d, ids, 4).token_ids == reference_tokens(ids, 4)


def test_release_before_the_lease_is_remembered_and_idempotent(pair):
    """The prefill daemon's Release, called the way a decode daemon does: before the
    lease exists it leaves a tombstone (that lease is never granted), twice is fine,
    an id whose request finished can be reused."""
    p = pair.p
    ids = prompt_ids(1, 5)

    def prefill_call(rid: str, timeout: float = 10):
        return p.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=ids,
                                           requester="test"), timeout=timeout)  # fmt: skip

    assert not p.Release(pb.ReleaseRequest(request_id="early"), timeout=5).released
    with pytest.raises(grpc.RpcError) as err:
        prefill_call("early")
    assert err.value.code() == S.CANCELLED and "released" in err.value.details()
    assert leased(p) == 0
    for _ in range(2):
        h = prefill_call("twice").handle
        assert leased(p) == len(h.block_ids)
        first = p.Release(pb.ReleaseRequest(request_id="twice"), timeout=5)
        again = p.Release(pb.ReleaseRequest(request_id="twice"), timeout=5)
        assert (first.released, again.released) == (True, False)  # then reused: no tombstone
    assert leased(p) == 0


def _timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def test_control_plane_answers_with_many_open_streams(pair):
    """With ``STREAMS`` Generate streams open (each holding a server worker), health,
    Stats and Release still answer at once, and one stream more is refused with
    RESOURCE_EXHAUSTED. (With a 32-worker pool they waited > 3 s: the Helm probe's
    timeout.)"""
    decode, d = pair.decode, pair.d
    chans = [decode.channel() for _ in range(4)]
    stubs = [pb_grpc.KVBridgeServiceStub(c) for c in chans]
    ids = prompt_ids(1, 3)
    streams = [
        stubs[i % 4].Generate(
            pb.GenerateRequest(request_id=f"open-{i}", prompt_token_ids=ids, max_new_tokens=200),
            timeout=120,
        )
        for i in range(STREAMS)
    ]
    try:
        wait_for(lambda: len(stats(d, False).requests) == STREAMS, 60, "all streams open")
        with pytest.raises(grpc.RpcError) as err:
            next(
                iter(
                    stubs[0].Generate(
                        pb.GenerateRequest(prompt_token_ids=ids, max_new_tokens=4), timeout=10
                    )
                )
            )
        assert err.value.code() == S.RESOURCE_EXHAUSTED and "max-requests" in err.value.details()
        health = health_pb2_grpc.HealthStub(chans[1])
        worst = {"health": 0.0, "stats": 0.0, "release": 0.0}
        calls = {
            "health": lambda i: health.Check(health_pb2.HealthCheckRequest(), timeout=5),
            "stats": lambda i: stats(stubs[2], False),
            "release": lambda i: stubs[3].Release(pb.ReleaseRequest(request_id=f"open-{i}"),
                                                  timeout=5),
        }  # fmt: skip
        for i in range(10):
            for what, call in calls.items():
                worst[what] = max(worst[what], _timed(lambda c=call, i=i: c(i)))
        assert len(stats(d, False).requests) >= STREAMS - 10  # still open while measured
        assert max(worst.values()) < 1.0, worst
    finally:
        for s in streams:
            s.cancel()
        for c in chans:
            c.close()
    wait_for(lambda: (s := stats(d, False)).blocks_in_use == 0 and not s.requests, 60,
             "streams ended and freed")  # fmt: skip
    assert stats(d).counters.cancellations >= STREAMS - 10


def test_hung_prefill_costs_one_request_timeout_and_no_lease(pair):
    """A SIGSTOPped prefill daemon: DEADLINE_EXCEEDED after ``--request-timeout``
    (not twice it: the Release to the hung peer runs in the background), a client
    deadline shorter than that is kept, and once the peer resumes, no lease is left."""
    prefill, p, d = pair.prefill, pair.p, pair.d
    before = stats(p).counters.lease_expiries
    os.kill(prefill.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            gen(d, prompt_ids(1, 21), 4, timeout=30)
        took = time.monotonic() - t0
        assert err.value.code() == S.DEADLINE_EXCEEDED, err.value.details()
        assert REQUEST_TIMEOUT - 0.2 < took < REQUEST_TIMEOUT + 1.5, took
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            gen(d, prompt_ids(1, 22), 4, timeout=1.0)
        assert err.value.code() == S.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.5  # the 1 s deadline, not the 3 s request timeout
    finally:
        os.kill(prefill.proc.pid, signal.SIGCONT)
    wait_for(lambda: leased(p) == 0 and stats(p, False).blocks_in_use == 0, 10,
             "no lease after the prefill resumed")  # fmt: skip
    assert stats(p).counters.lease_expiries == before
    ids = prompt_ids(2, 23)
    assert gen(d, ids, 3).token_ids == reference_tokens(ids, 3)


def test_status_codes_of_peer_failures(pair, tmp_path):
    """Capacity is RESOURCE_EXHAUSTED, an incompatible prefill cache (a
    misconfiguration) FAILED_PRECONDITION, a target that is down UNAVAILABLE within
    the deadline with its warnings rate-limited; garbage to the health service is
    INVALID_ARGUMENT, not INTERNAL; shutdown stays within --drain-timeout;
    cancellations are counted apart from failures. (A prefill daemon refusing the
    decode daemon's token: test_auth.py.)"""
    p, d = pair.p, pair.d
    # fill the prefill cache with leases held by a "peer" (this test), then ask
    held = []
    while True:
        try:
            held.append(
                p.Prefill(
                    pb.PrefillRequest(
                        request_id=f"hold-{len(held)}",
                        prompt_token_ids=prompt_ids(8, 1),
                        requester="test",
                    ),
                    timeout=10,
                )
            )
        except grpc.RpcError as exc:
            assert exc.code() == S.RESOURCE_EXHAUSTED
            break
    try:
        with pytest.raises(grpc.RpcError) as err:
            gen(d, prompt_ids(8, 2), 2, timeout=20)
        assert err.value.code() == S.RESOURCE_EXHAUSTED, err.value.details()
        assert "prefill cache full" in err.value.details()
    finally:
        for h in held:
            p.Release(pb.ReleaseRequest(request_id=h.handle.request_id), timeout=5)
    closed, odd_port = free_port(), free_port()
    daemons = start_all(tmp_path, [
        ("decode", "churn-down", ["--prefill", f"127.0.0.1:{closed}", "--drain-timeout", "1"]),
        ("prefill", "churn-odd", ["--num-layers", "2", "--grpc-port", str(odd_port)]),
        ("decode", "churn-odd-d", ["--prefill", f"127.0.0.1:{odd_port}"]),
    ], up_only=("churn-down",))  # fmt: skip
    down, _, odd_d = daemons
    try:
        with odd_d.channel() as ch, pytest.raises(grpc.RpcError) as err:
            gen(pb_grpc.KVBridgeServiceStub(ch), prompt_ids(1, 3), 2, timeout=20)
        assert err.value.code() == S.FAILED_PRECONDITION, err.value.details()
        # another model (two layers): refused by the model identity before any compute
        assert "model mismatch" in err.value.details(), err.value.details()
        with down.channel() as ch:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                gen(pb_grpc.KVBridgeServiceStub(ch), prompt_ids(1, 3), 2, timeout=20)
            assert err.value.code() == S.UNAVAILABLE, err.value.details()
            assert time.monotonic() - t0 < 5
            # many refusals in a burst: one warning line (rate-limited), not one each
            burst = [in_thread(gen, pb_grpc.KVBridgeServiceStub(ch), prompt_ids(1, 3), 2,
                               timeout=0.5) for _ in range(20)]  # fmt: skip
            assert all(isinstance(f.exception(10), grpc.RpcError) for f in burst)
            refusals = down.log_path.read_text().count("prefill target refused, trying next")
            assert 1 <= refusals <= 2, refusals
            garbage = ch.unary_unary("/grpc.health.v1.Health/Check")
            with pytest.raises(grpc.RpcError) as err:
                garbage(b"\xff\xff\xff\x07garbage", timeout=5)
            assert err.value.code() == S.INVALID_ARGUMENT, err.value.details()
            # shutdown within --drain-timeout, a call still in flight (waiting for the
            # target to come back) or not
            call = in_thread(gen, pb_grpc.KVBridgeServiceStub(ch), prompt_ids(1, 4), 2, timeout=20)
            time.sleep(0.5)
            t0 = time.monotonic()
            assert down.terminate(20) == 0
            # the drain (1 s), then closing the servers, the engine and the transfer agent
            # (~0.4 s here; 1.6 s on a loaded CI machine before its polls were shortened)
            assert time.monotonic() - t0 < 1.0 + 2.5
            assert isinstance(call.exception(10), grpc.RpcError)
    finally:
        codes = [x.terminate(20) for x in daemons]
    assert codes == [0] * len(daemons)
    # a client cancelling mid-stream: a cancellation, not a transfer failure
    c0 = stats(d).counters
    call = d.Generate(pb.GenerateRequest(prompt_token_ids=prompt_ids(1, 9),
                                         max_new_tokens=500), timeout=60)  # fmt: skip
    next(iter(call))
    call.cancel()
    wait_for(lambda: stats(d).counters.cancellations > c0.cancellations, 10, "cancellation counted")
    c1 = stats(d).counters
    assert c1.transfer_failures == c0.transfer_failures
    m = pair.decode.metrics()
    assert m["kvbridge_cancellations_total"] == c1.cancellations

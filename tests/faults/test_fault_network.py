"""Network faults on the prefill daemon's link while KV moves (real daemons, real engines).

A prefill daemon in a test namespace, a decode daemon outside; the veth between them
is cut (link down), made lossy (nftables random drop), slowed (tc tbf), and a pull
is aborted mid-way. Every request either delivers byte-exact KV (its checksum and
its tokens equal the monolithic reference) or fails with a clear status; afterwards
no block is held on either side, the guard bands around both caches are intact, no
helper thread is left behind, and requests succeed again.
"""

from __future__ import annotations

import time

import grpc
import pytest
from engines import BACKENDS, require
from faultkit import (
    CLEAN_FAILURES,
    NUM_BLOCKS,
    Pair,
    assert_clean,
    check_outcome,
    gen,
    in_thread,
    prompt_ids,
    record,
    reference_tokens,
    stats,
    wait_for,
)
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from netlab import NetLab, unavailable

pytestmark = [pytest.mark.faults, pytest.mark.netns]

TRANSFER_TIMEOUT = 3.0
LEASE = 8.0
# threads that come and go with load (gRPC workers, engine pools), not per request
POOL_PREFIXES = ("kvbridge-grpc", "kvbridge-release", "mc-", "Dummy", "ThreadPoolExecutor")


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request, tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(why)
    require(request.param)
    lab = NetLab()
    # no path probe: after a fault the peer is connected again under loss or a shaped
    # link, and the probe's transfers (megabytes, finishing in the background when
    # they outlast its budget) would compete with the pulls these tests time; the
    # probe has its own tests (tests/connector/test_path_probe.py, tests/e2e/test_e2e_push.py)
    decode_args = ("--transfer-timeout", str(TRANSFER_TIMEOUT), "--request-timeout", "4",
                   "--probe-bytes", "0")  # fmt: skip
    p = Pair(lab, request.param, tmp_path_factory.mktemp(f"net-{request.param}"),
             prefill_args=("--lease-seconds", str(LEASE)), decode_args=decode_args)  # fmt: skip
    try:
        p.start()
        yield p
    finally:
        codes = p.close()
        lab.close()
    assert all(c == 0 for c in codes.values()), codes


@pytest.fixture
def healthy_link(pair):
    """Each test leaves the link as it found it: up, unshaped, lossless."""
    yield pair.lab
    pair.lab.up()
    pair.lab.unshape()
    pair.lab.undrop()


def _run_batch(pair: Pair, tag: str, n: int, blocks: int, max_new: int = 3) -> list:
    prompts = [prompt_ids(blocks, seed=hash((tag, i)) % 10_000) for i in range(n)]
    futs = [in_thread(gen, pair.d, ids, max_new, f"{tag}-{i}", 60) for i, ids in
            enumerate(prompts)]  # fmt: skip
    return prompts, futs


def _outcomes(prompts, futs, max_new: int = 3) -> list[str]:
    out = []
    for ids, fut in zip(prompts, futs, strict=True):
        try:
            result = fut.result(timeout=90)
        except grpc.RpcError as exc:
            result = exc
        out.append(check_outcome(result, ids, max_new))
    return out


def _wait_transferring(pair: Pair, request_id: str = "") -> None:
    """Until ``request_id`` (or any request) is pulling KV on the decode daemon."""

    def pulling() -> bool:
        return any(
            r.state == pb.REQUEST_STATE_TRANSFERRING and request_id in ("", r.request_id)
            for r in stats(pair.d, False).requests
        )

    wait_for(pulling, 30, f"a pull in flight {request_id}", every=0.02)


def _eventually(pair: Pair, ids: list[int], n: int, within: float = 20.0, rid: str = ""):
    """A generation that succeeds within ``within`` s; every failed try is a clean one
    (after a fault the engine may first need to reconnect)."""
    deadline, tries = time.monotonic() + within, 0
    while True:
        tries += 1
        try:
            g = gen(pair.d, ids, n, f"{rid}{tries}" if rid else "", 60)
            break
        except grpc.RpcError as exc:
            assert exc.code() in CLEAN_FAILURES, exc.details()
            assert time.monotonic() < deadline, f"no recovery: {exc.details()}"
            time.sleep(0.5)
    assert g.token_ids == reference_tokens(ids, n)
    return g


def _recovers(pair: Pair, seed: int, within: float = 20.0) -> None:
    """Requests succeed again (the decode may first re-handshake / reconnect)."""
    _eventually(pair, prompt_ids(2, seed), 3, within)


def test_partition_during_transfers(pair, healthy_link):
    lab = healthy_link
    lab.shape("1mbit")  # four 4-block pulls: ~4 s on the wire
    prompts, futs = _run_batch(pair, "cut", 4, 4)
    _wait_transferring(pair)
    lab.down()
    time.sleep(TRANSFER_TIMEOUT + 0.5)
    lab.up()
    lab.unshape()
    results = _outcomes(prompts, futs)
    assert "failed" in results, "the partition hit no transfer"
    _recovers(pair, seed=11)
    assert_clean(pair, timeout=LEASE + 10)


def test_packet_loss_during_transfers(pair, healthy_link):
    lab = healthy_link
    lab.drop(10)
    prompts, futs = _run_batch(pair, "loss", 4, 3)
    results = _outcomes(prompts, futs)
    lab.undrop()
    assert results.count("ok") >= 1, results  # TCP retransmits: most get through
    _recovers(pair, seed=12)
    assert_clean(pair, timeout=LEASE + 10)


def _helper_threads(s: pb.StatsResponse) -> set[str]:
    return {n for n in s.thread_names if not n.startswith(POOL_PREFIXES)}


def test_slow_peer_timeouts_are_honoured_and_no_thread_is_stuck(pair, healthy_link):
    lab = healthy_link
    baseline = _helper_threads(stats(pair.d))
    lab.shape("64kbit")  # a 4-block pull would take ~16 s
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        gen(pair.d, prompt_ids(4, seed=13), 3, "slow")
    elapsed = time.monotonic() - t0
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert "timed out" in info.value.details()
    assert elapsed < TRANSFER_TIMEOUT + 3, f"the {TRANSFER_TIMEOUT} s timeout took {elapsed:.1f} s"
    # a client deadline shorter than the transfer timeout is honoured too
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        gen(pair.d, prompt_ids(4, seed=14), 3, "client-deadline", timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2.5
    # the server side lets go of the cancelled call well before its own transfer timeout
    wait_for(lambda: record(pair.d, "client-deadline").state == pb.REQUEST_STATE_FAILED,
             TRANSFER_TIMEOUT + 1, "the abandoned call is failed on the server")  # fmt: skip
    lab.unshape()
    wait_for(lambda: _helper_threads(stats(pair.d)) <= baseline and not
             stats(pair.d, False).requests, 15, "helper threads gone")  # fmt: skip
    assert_clean(pair, timeout=LEASE + 10)


def test_abort_mid_transfer_never_hands_out_blocks_an_engine_may_write(pair, healthy_link):
    lab = healthy_link
    lab.shape("200kbit")  # a 6-block pull: ~8 s on the wire
    ids = prompt_ids(6, seed=15)
    fut = in_thread(gen, pair.d, ids, 3, "abort-me", 60)
    _wait_transferring(pair, "abort-me")
    time.sleep(0.3)
    t0 = time.monotonic()
    assert pair.d.Release(pb.ReleaseRequest(request_id="abort-me"), timeout=10).released
    with pytest.raises(grpc.RpcError) as info:
        fut.result(timeout=30)
    assert info.value.code() == grpc.StatusCode.CANCELLED and "aborted" in info.value.details()
    assert time.monotonic() - t0 < 4.0, "the abort waited for the transfer"  # ~8 s on the wire
    s = stats(pair.d, False)
    held = s.quarantined_blocks
    # the engine still writes the 6 blocks (an in-flight transfer is never cancelled
    # under the engine, only abandoned to it): they stay out of the free list
    assert held == 6 and s.blocks_in_use >= held
    assert s.free_blocks == NUM_BLOCKS - s.blocks_in_use  # held blocks are not free
    if held:
        # meanwhile requests run on the other blocks: byte-exact, or a clean failure
        # where the still-running batch starves the slow link
        small = prompt_ids(1, seed=16)
        try:
            outcome = gen(pair.d, small, 3)
        except grpc.RpcError as exc:
            outcome = exc
        check_outcome(outcome, small, 3)
        s = stats(pair.d, False)
        assert s.free_blocks == NUM_BLOCKS - s.blocks_in_use >= 0
        assert s.blocks_in_use >= s.quarantined_blocks
    lab.unshape()
    wait_for(lambda: stats(pair.d, False).quarantined_blocks == 0, 20, "quarantine ends")
    # then one request takes every block of the decode cache, the once-quarantined too
    _eventually(pair, prompt_ids(NUM_BLOCKS - 1, seed=17), 16, rid="all-blocks-")
    assert_clean(pair, timeout=LEASE + 10)

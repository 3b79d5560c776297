"""Block allocator, leases, request state machine: the daemon's bookkeeping."""

from __future__ import annotations

import threading
import time

import pytest
from kvbridge.connector.serving.daemon.allocator import BlockAllocator, OutOfBlocksError
from kvbridge.connector.serving.daemon.leases import LeaseTable
from kvbridge.connector.serving.daemon.states import (
    InvalidTransitionError,
    RequestRegistry,
    RequestState,
)


def test_allocator_hands_out_distinct_blocks_and_checks_frees():
    a = BlockAllocator(8)
    x, y = a.allocate(3), a.allocate(5)
    assert len(set(x) | set(y)) == 8 and a.num_free == 0 and a.num_used == 8
    with pytest.raises(OutOfBlocksError, match="1 blocks requested, 0 of 8 free"):
        a.allocate(1)
    a.free(x)
    with pytest.raises(ValueError, match="not allocated"):
        a.free(x)  # double free
    with pytest.raises(ValueError, match="not allocated"):
        a.free([y[0], y[0]])  # duplicate ids in one call
    with pytest.raises(ValueError, match="not allocated"):
        a.free([99])
    assert a.num_free == 3  # failed frees changed nothing
    with pytest.raises(OutOfBlocksError, match="the cache has 8"):
        a.allocate(9)
    with pytest.raises(ValueError, match="positive"):
        a.allocate(0)


def test_allocator_waits_for_frees_with_a_timeout():
    a = BlockAllocator(2)
    held = a.allocate(2)
    t0 = time.monotonic()
    with pytest.raises(OutOfBlocksError):
        a.allocate(1, timeout=0.1)
    assert 0.08 < time.monotonic() - t0 < 2
    threading.Timer(0.05, a.free, args=(held[:1],)).start()
    assert a.allocate(1, timeout=5) == held[:1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leases_end_once_on_release_or_expiry():
    a, clock, ended = BlockAllocator(10), FakeClock(), []
    leases = LeaseTable(a, on_end=ended.append, clock=clock)
    l1 = leases.grant("r1", a.allocate(3), "decode-a", ttl=5)
    leases.grant("r2", a.allocate(4), "decode-b", ttl=1)
    assert leases.leased_blocks == 7 and a.num_free == 3
    with pytest.raises(ValueError, match="already holds"):
        leases.grant("r1", [], "x", ttl=1)
    with pytest.raises(ValueError, match="positive"):
        leases.grant("r3", [], "x", ttl=0)
    clock.now += 2
    expired = leases.expire_due()
    assert [lease.request_id for lease in expired] == ["r2"] and ended[-1].end_reason == "expired"
    assert a.num_free == 7
    assert leases.end("r1", "released").block_ids == l1.block_ids
    assert leases.end("r1", "released") is None  # second end is a no-op
    assert leases.end("r2", "notified") is None  # expired already
    assert a.num_free == 10 and leases.num_leases == 0
    assert [lease.end_reason for lease in ended] == ["expired", "released"]
    assert leases.wait_empty(0.01)


def test_lease_reaper_thread_expires_and_wait_empty_times_out():
    a = BlockAllocator(4)
    leases = LeaseTable(a)
    leases.grant("r", a.allocate(2), "peer", ttl=0.2)
    assert not leases.wait_empty(0.01)
    leases.start_reaper(interval=0.02)
    try:
        assert leases.wait_empty(5.0)
        assert a.num_free == 4
    finally:
        leases.stop_reaper()


def test_state_machine_allows_only_its_edges():
    reg = RequestRegistry(keep_finished=2)
    reg.add("a", 5)
    with pytest.raises(ValueError, match="already in flight"):
        reg.add("a")
    with pytest.raises(InvalidTransitionError, match="WAITING -> DECODING"):
        reg.transition("a", RequestState.DECODING)
    reg.transition("a", RequestState.TRANSFERRING)
    reg.transition("a", RequestState.DECODING)
    rec = reg.transition("a", RequestState.DONE)
    assert rec.history == [
        RequestState.WAITING,
        RequestState.TRANSFERRING,
        RequestState.DECODING,
        RequestState.DONE,
    ]
    with pytest.raises(InvalidTransitionError, match="not in flight"):
        reg.transition("a", RequestState.FAILED)
    assert not reg.fail("a", "late")  # final states are final
    reg.add("b")
    assert reg.fail("b", "boom") and reg.get("b").error == "boom"
    reg.add("c")
    reg.transition("c", RequestState.DONE)
    assert reg.get("a") is None  # only the last 2 finished are kept
    assert reg.counters == {"requests_total": 3, "requests_done": 2, "requests_failed": 1}
    assert reg.num_live == 0 and reg.wait_idle(0.01)
    reg.add("d")
    assert not reg.wait_idle(0.01)
    assert [r.request_id for r in reg.snapshot()] == ["d"]
    assert {r.request_id for r in reg.snapshot(include_finished=True)} == {"b", "c", "d"}


def test_prefill_pool_policies():
    from kvbridge.connector.serving.daemon.prefill_pool import PrefillPool

    a, b, c = "127.0.0.1:1", "127.0.0.2:2", "127.0.0.3:3"
    rr = PrefillPool([a, b, c], "round-robin")
    assert [rr.order()[0] for _ in range(4)] == [a, b, c, a]
    ll = PrefillPool([a, b, a], "least-loaded")
    assert ll.targets == [a, b]  # duplicates dropped
    with ll.use(a), ll.use(a):
        assert [ll.order()[0] for _ in range(3)] == [b] * 3  # the idle one first
        with ll.use(b), ll.use(b), ll.use(b):
            assert ll.order() == [a, b]
    assert sorted(ll.order()[0] for _ in range(4)) == [a, a, b, b]  # ties rotate
    assert ll.served() == {a: 2, b: 3}
    ll.mark_down(b)  # unavailable: tried last until a health check says SERVING
    assert [ll.order()[0] for _ in range(3)] == [a] * 3
    with pytest.raises(ValueError, match="--prefill"):
        PrefillPool([], "round-robin")
    with pytest.raises(ValueError, match="unknown prefill policy"):
        PrefillPool([a], "random")
    for pool in (rr, ll):
        pool.close()

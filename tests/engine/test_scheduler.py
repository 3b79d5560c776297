"""Admission by free blocks and the running set: join, leave, cancel, queueing."""

from __future__ import annotations

import threading
import time

import pytest
from kvbridge.connector.serving.daemon.allocator import BlockAllocator, OutOfBlocksError
from kvbridge.connector.serving.engine.scheduler import (
    Admission,
    AdmissionCancelledError,
    QueueFullError,
    RunningSet,
    Sequence,
)


def _waiter(adm: Admission, rid: str, n: int, out: dict, **kw) -> threading.Thread:
    def run() -> None:
        try:
            out[rid] = adm.acquire(rid, n, **kw)
        except Exception as exc:  # recorded for the assertions
            out[rid] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_queue(adm: Admission, n: int) -> None:
    deadline = time.monotonic() + 5
    while adm.num_waiting != n:
        assert time.monotonic() < deadline, f"queue never reached {n}"
        time.sleep(0.005)


def test_admits_at_once_when_blocks_are_free():
    alloc = BlockAllocator(8)
    adm = Admission(alloc, max_waiting=2)
    got = adm.acquire("a", 5)
    assert len(got) == 5 and alloc.num_free == 3 and adm.num_waiting == 0


def test_waits_in_fifo_order_until_blocks_are_freed():
    alloc = BlockAllocator(8)
    adm = Admission(alloc, max_waiting=4)
    first = adm.acquire("a", 6)
    out: dict = {}
    tb = _waiter(adm, "b", 5, out)
    _wait_queue(adm, 1)
    tc = _waiter(adm, "c", 1, out)  # would fit now (2 free) but must not overtake b
    _wait_queue(adm, 2)
    time.sleep(0.15)
    assert out == {} and alloc.num_free == 2
    adm.release(first)
    tb.join(5)
    tc.join(5)
    assert len(out["b"]) == 5 and len(out["c"]) == 1
    assert set(out["b"]).isdisjoint(out["c"]) and alloc.num_free == 2


def test_queue_bound_refuses_at_once():
    alloc = BlockAllocator(4)
    adm = Admission(alloc, max_waiting=1)
    held = adm.acquire("a", 4)
    out: dict = {}
    t = _waiter(adm, "b", 2, out)
    _wait_queue(adm, 1)
    t0 = time.monotonic()
    with pytest.raises(QueueFullError, match="already wait"):
        adm.acquire("c", 1)
    assert time.monotonic() - t0 < 2.0  # refused at once (waiting would never end)
    adm.release(held)
    t.join(5)
    assert len(out["b"]) == 2


def test_zero_bound_means_no_waiting():
    adm = Admission(BlockAllocator(2), max_waiting=0)
    adm.acquire("a", 2)
    with pytest.raises(QueueFullError):
        adm.acquire("b", 1)


def test_waiter_times_out_or_is_cancelled_and_leaves_the_queue():
    alloc = BlockAllocator(4)
    adm = Admission(alloc, max_waiting=4)
    held = adm.acquire("a", 4)
    with pytest.raises(OutOfBlocksError, match="after waiting"):
        adm.acquire("b", 1, timeout=0.1)
    assert adm.num_waiting == 0
    flag = threading.Event()
    out: dict = {}
    t = _waiter(adm, "c", 2, out, cancelled=flag.is_set)
    _wait_queue(adm, 1)
    flag.set()
    t.join(5)
    assert isinstance(out["c"], AdmissionCancelledError) and adm.num_waiting == 0
    adm.release(held)
    assert alloc.num_free == 4


def test_request_larger_than_the_cache_fails_without_waiting():
    adm = Admission(BlockAllocator(4), max_waiting=4)
    with pytest.raises(OutOfBlocksError, match="the cache has 4"):
        adm.acquire("a", 5)
    assert adm.num_waiting == 0


def test_frees_from_outside_are_seen_by_waiters():
    alloc = BlockAllocator(4)
    adm = Admission(alloc, max_waiting=4)
    held = adm.acquire("a", 4)
    out: dict = {}
    t = _waiter(adm, "b", 3, out)
    _wait_queue(adm, 1)
    alloc.free(held)  # e.g. the quarantine letting go: nobody pokes the admission
    t.join(5)
    assert len(out["b"]) == 3


def _seq(rid: str) -> Sequence:
    return Sequence(rid, [0], prompt_len=1, first_token=0, max_new=2)


def test_running_set_join_leave_keeps_rows_dense():
    rs = RunningSet(max_batch=3)
    seqs = [_seq(f"r{i}") for i in range(4)]
    for s in seqs:
        rs.join(s)
    cancels, joins = rs.take_changes()
    assert cancels == [] and joins == seqs[:3]  # the 4th waits for room
    for s in joins:
        rs.add(s)
    assert [s.slot for s in rs.active] == [0, 1, 2]
    moved = rs.remove(seqs[0])  # the last row fills row 0
    assert moved == 2 and rs.active == [seqs[2], seqs[1]] and seqs[2].slot == 0
    assert seqs[0].left.is_set() and seqs[0].slot == -1
    assert rs.remove(seqs[1]) is None and rs.active == [seqs[2]]
    _, joins = rs.take_changes()
    assert joins == [seqs[3]]
    with pytest.raises(ValueError, match="already running"):
        rs.join(seqs[2])


def test_running_set_cancel_active_and_joining():
    rs = RunningSet(max_batch=1)
    a, b = _seq("a"), _seq("b")
    rs.join(a)
    rs.join(b)
    _, joins = rs.take_changes()
    rs.add(joins[0])
    assert rs.cancel("b", "client left") and rs.cancel("a")
    assert not rs.cancel("zzz")
    cancels, joins = rs.take_changes()
    assert {(s.request_id, r) for s, r in cancels} == {("a", "cancelled"), ("b", "client left")}
    assert joins == []
    rs.remove(a)
    rs.drop_joining(b)
    assert rs.num_running == 0 and a.left.is_set() and b.left.is_set()
    rs.close()
    assert not rs.wait_for_work(0.01)
    with pytest.raises(RuntimeError, match="stopped"):
        rs.join(_seq("c"))


def test_cancelling_queued_sequences_frees_no_row():
    """A full batch: cancels of sequences still queued make no room for others."""
    rs = RunningSet(max_batch=2)
    seqs = [_seq(f"q{i}") for i in range(5)]
    for s in seqs:
        rs.join(s)
    _, joins = rs.take_changes()
    for s in joins:
        rs.add(s)
    assert rs.cancel("q2") and rs.cancel("q3")  # queued, never had a row
    cancels, joins = rs.take_changes()
    assert {s.request_id for s, _ in cancels} == {"q2", "q3"}
    assert joins == [] and len(rs.active) == 2  # q4 waits: the batch is still full
    assert rs.cancel("q0")  # a running one: its row is free at the same step
    cancels, joins = rs.take_changes()
    assert [s.request_id for s, _ in cancels] == ["q0"] and joins == [seqs[4]]

"""Mismatched peers, unknown peers, timeouts, dead peers, bad ids: clear errors, no hang.

Refusals are checked on both sides: the connecting agent raises, the refusing one
records the same reason. After every fault the agents keep working.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from xfer_harness import CacheCfg, PeerProcess, link, prepare, pull

BIG = dict(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=128)


def _refused(a, b, a_cfg, b_cfg, a_opts=None, b_opts=None):
    a_name, _ = prepare(a, "A", a_cfg, **(a_opts or {}))
    b_name, b_addr = prepare(b, "B", b_cfg, **(b_opts or {}))
    with pytest.raises(RuntimeError) as info:
        link(a, a_name, b_name, b_addr)
    rejected = b.call("rejected", b_name)
    assert rejected, "the refusing side recorded nothing"
    peer, reason = rejected[-1]
    assert peer == a_name
    return str(info.value), reason


def test_incompatible_head_dim_refused_on_both_sides(procs):
    a, b = procs
    msg, reason = _refused(
        a, b, CacheCfg("nhd", 1).with_(head_dim=16), CacheCfg("nhd", 2).with_(head_dim=8)
    )
    assert "IncompatiblePeerError" in msg and "incompatible KV cache" in msg
    assert "last dim" in reason and reason in msg


def test_tp_head_totals_refused(procs):
    a, b = procs
    msg, reason = _refused(
        a, b, CacheCfg("nhd", 3).with_(num_kv_heads=2), CacheCfg("nhd", 4).with_(num_kv_heads=2),
        a_opts={"tp_rank": 0, "tp_size": 2}, b_opts={"tp_size": 1},
    )  # fmt: skip
    assert "KV heads" in reason and "IncompatiblePeerError" in msg


def test_unknown_peer_and_bad_ids(procs):
    a, b = procs
    cfg = CacheCfg("packed", 5)
    a_name, _ = prepare(a, "A", cfg)
    with pytest.raises(RuntimeError, match=r"UnknownPeerError.*no peer 'nobody'"):
        a.call("read", a_name, "nobody", [0], [1], {})
    b_name, b_addr = prepare(b, "B", cfg.seeded(6))
    link(a, a_name, b_name, b_addr)
    with pytest.raises(RuntimeError, match="LayoutError"):
        a.call("read", a_name, b_name, [0, 99], [1, 2], {})  # id out of range
    with pytest.raises(RuntimeError, match="LayoutError"):
        a.call("read", a_name, b_name, [0, 1], [2], {})  # counts differ
    with pytest.raises(RuntimeError, match="LayoutError"):
        a.call("write", a_name, b_name, [0, 1], [3, 3], {})  # a block written twice
    pull(a, cfg.seeded(7, poison=8), b, cfg.seeded(6), [1, 2], [3, 4])  # still works


def test_stalled_transfer_times_out_reports_and_recovers(backend):
    """A frozen holder (SIGSTOP) stalls the read; it fails at its timeout, not later.

    NIXL runs over UCX's TCP transport here, where the target must progress
    (shared-memory reads complete without the target's CPU).
    """
    env = {"UCX_TLS": "tcp,self"} if backend == "nixl" else {}
    holder, reader = PeerProcess(backend, env=env), PeerProcess(backend, env=env)
    try:
        src = CacheCfg("packed", 9, kw=dict(BIG))
        dst = CacheCfg("packed", 10, poison=11, kw=dict(BIG))
        a_name, _ = prepare(reader, "A", dst)
        b_name, b_addr = prepare(holder, "B", src)
        link(reader, a_name, b_name, b_addr)
        ids = list(range(64))
        os.kill(holder.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            with pytest.raises(RuntimeError, match=r"TransferTimeoutError|TransferFailedError"):
                kw = {"timeout": 1.0, "request_id": "late"}
                reader.call("read", a_name, b_name, ids, ids, kw)
            assert time.perf_counter() - t0 < 10
        finally:
            os.kill(holder.proc.pid, signal.SIGCONT)
        notice = holder.call("notice", b_name, "late", 10.0)
        assert notice[1] == "failed"  # the holder learnt of it on the side channel
        time.sleep(1.0)  # let an abandoned engine batch drain before reusing the blocks
        pull(reader, dst, holder, src, ids, ids)
    finally:
        holder.close()
        reader.close()


def test_dead_peer_fails_within_timeout(backend, procs):
    a, _ = procs
    doomed = PeerProcess(backend)
    try:
        cfg = CacheCfg("nhd", 12, kw=dict(BIG))
        b_name, b_addr = prepare(doomed, "B", cfg)
        a_name, _ = prepare(a, "A", cfg.seeded(13, poison=14))
        link(a, a_name, b_name, b_addr)
        doomed.proc.kill()
        doomed.proc.join(10)
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match=r"TransferFailedError|TransferTimeoutError"):
            a.call("read", a_name, b_name, [0, 1, 2], [3, 4, 5], {"timeout": 5.0}, timeout=60)
        assert time.perf_counter() - t0 < 30
    finally:
        doomed.close()


def test_side_channel_unreachable_is_bounded(procs):
    a, _ = procs
    a_name, _ = prepare(a, "A", CacheCfg("nhd", 15))
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="PeerUnreachableError"):
        a.call("connect", a_name, "127.0.0.1:9", "ghost", 0.5)
    assert time.perf_counter() - t0 < 5

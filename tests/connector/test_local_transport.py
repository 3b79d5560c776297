"""The same-host transport with host memory (cross-memory attach between processes):
byte-exact pulls and pushes against torch truth, notifications after the data, the
automatic choice beside a network engine, refusals and a dead peer. Its CUDA IPC
path runs on a GPU (bench/gpu_transfer.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from engines import LOCAL_BACKEND, require
from kvbridge.connector.transfer.errors import HandshakeError
from kvbridge.connector.transfer.transport import MemRegion, create_transport
from kvbridge.connector.transfer.transport.local import cma_copy, host_identity
from xfer_harness import CacheCfg, PeerProcess, link, prepare, pull, push


@pytest.fixture(scope="module")
def local_procs():
    a, b = PeerProcess(LOCAL_BACKEND), PeerProcess(LOCAL_BACKEND)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("layout", ["nhd", "packed", "mla"])
def test_pull_and_push_byte_exact(local_procs, layout):
    a, b = local_procs
    src, dst = CacheCfg(layout, 1), CacheCfg(layout, 2, poison=3)
    nbytes, descriptors, _ = pull(a, dst, b, src, [3, 4, 5, 9], [0, 1, 2, 15])
    assert nbytes > 0 and descriptors > 0
    push(a, src.seeded(4), b, dst.seeded(5, poison=6), [0, 7, 8], [12, 1, 2])


def test_staged_head_slices_and_token_plans(local_procs):
    """Different TP ranks (head slices, staged) and a token-space plan move exactly."""
    a, b = local_procs
    src = CacheCfg("nhd", 7).with_(num_kv_heads=4)
    dst = CacheCfg("nhd", 8, poison=9).with_(num_kv_heads=2)
    _, _, staged = pull(
        a, dst, b, src, [1, 2, 3], [4, 5, 6], a_opts={"tp_rank": 1, "tp_size": 2},
        truth={"src_head_start": 2, "dst_head_start": 0, "num_heads": 2},
    )  # fmt: skip
    assert staged
    kw = {"num_tokens": 9}
    pull(a, CacheCfg("packed", 18, poison=19), b, CacheCfg("packed", 20), [1, 2, 3], [5, 6, 7],
         kw=kw, truth=kw)  # fmt: skip


def test_probe_reports_cma(local_procs):
    a, b = local_procs
    a_name, _ = prepare(a, "A", CacheCfg("nhd", 10))
    b_name, b_addr = prepare(b, "B", CacheCfg("nhd", 11))
    link(a, a_name, b_name, b_addr)
    r = a.call("paths", a_name, b_name)
    assert r["engine"] == LOCAL_BACKEND and r["transport"] == "cma"
    assert r["read_bps"] > 0 and r["write_bps"] > 0 and r["direction"] == "READ"


def test_auto_picks_local_beside_a_network_engine():
    """Both agents offer the local transport: same-host peers use it, byte-exact; with one
    side off, the network engine carries the same request."""
    backend = require("nixl")
    a, b = PeerProcess(backend), PeerProcess(backend)
    try:
        src, dst = CacheCfg("packed", 12), CacheCfg("packed", 13, poison=14)
        for a_local, engine in (("auto", LOCAL_BACKEND), ("off", backend)):
            opts = {"local": a_local}
            pull(a, dst, b, src, [0, 1, 2, 3], [8, 9, 10, 11], a_opts=opts,
                 b_opts={"local": "auto"})  # fmt: skip
            a_name = dst.agent_name("A", **opts)
            r = a.call("paths", a_name, src.agent_name("B", local="auto"))
            assert r["engine"] == engine, r
    finally:
        a.close()
        b.close()


def test_dead_peer_fails_fast(local_procs):
    a, _ = local_procs
    doomed = PeerProcess(LOCAL_BACKEND)
    try:
        cfg = CacheCfg("nhd", 15).with_(num_blocks=8)  # agents of their own
        b_name, b_addr = prepare(doomed, "B", cfg)
        a_name, _ = prepare(a, "A", cfg.seeded(16, poison=17))
        link(a, a_name, b_name, b_addr)
        doomed.proc.kill()
        doomed.proc.join(10)
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match=r"TransferFailedError.*ESRCH"):
            a.call("read", a_name, b_name, [0, 1], [2, 3], {"timeout": 5.0})
        assert time.perf_counter() - t0 < 5
    finally:
        doomed.close()


def test_other_host_refused_and_bounds_checked():
    t = create_transport(LOCAL_BACKEND, "t1")
    try:
        buf = np.zeros(4096, dtype=np.uint8)
        t.register_region(MemRegion(buf.ctypes.data, buf.nbytes))
        meta = json.loads(t.engine_metadata())
        assert meta["host"] == host_identity() and meta["regions"][0]["nbytes"] == 4096
        other = json.dumps({**meta, "host": "elsewhere"}).encode()
        assert not t.same_host(other) and t.same_host(t.engine_metadata())
        gpu = {**meta, "regions": [{**meta["regions"][0], "cuda": True}]}
        assert not t.same_host(json.dumps(gpu).encode())  # host <-> GPU: a network engine
        with pytest.raises(HandshakeError, match="not on this host"):
            t.add_peer("p", other, [MemRegion(buf.ctypes.data, 4096)])
        # a peer (this process) whose exported regions do not cover a descriptor
        small = json.dumps({**meta, "regions": [{**meta["regions"][0], "nbytes": 64}]})
        t.add_peer("p", small.encode(), [MemRegion(buf.ctypes.data, 4096)])
        with pytest.raises(Exception, match="outside the peer's exported regions"):
            t.post("READ", "p", [0], [0], [0], [1024], [128])
    finally:
        t.close()


def test_cma_copy_many_pieces_and_partial_runs():
    """More iovecs than one call takes, odd sizes: every byte lands where torch truth says."""
    import os

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    sizes = rng.integers(1, 300, 3000)
    offs = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    keep = offs + sizes <= src.size
    offs, sizes = offs[keep], sizes[keep]
    perm = rng.permutation(offs.size)
    dst_offs = offs[perm]  # scatter the runs elsewhere, same lengths
    dst_offs = np.concatenate(([0], np.cumsum(sizes[perm])[:-1]))
    cma_copy("READ", os.getpid(), dst.ctypes.data + dst_offs, src.ctypes.data + offs[perm],
             sizes[perm].astype(np.int64))  # fmt: skip
    expect = np.concatenate([src[o : o + n] for o, n in zip(offs[perm], sizes[perm], strict=True)])
    assert np.array_equal(dst[: expect.size], expect)

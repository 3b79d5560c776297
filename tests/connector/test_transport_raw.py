"""The transport layer on raw regions, real engines: descriptor arrays, bounds, notices.

Two transports of one engine in this process (loopback); random descriptor
arrays are checked byte-exact against numpy indexing, every other byte against
its poison; bad descriptors are refused before anything is posted.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
from engines import require
from kvbridge.connector.transfer.errors import (
    DescriptorError,
    TransferFailedError,
    UnknownPeerError,
)
from kvbridge.connector.transfer.transport import MemRegion, create_transport


@pytest.fixture
def pair(backend):
    gen = torch.Generator().manual_seed(7)
    bufs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in (40000, 70000)]
    t1, t2 = create_transport(backend, "raw-1"), create_transport(backend, "raw-2")
    r1 = t1.register_region(MemRegion(bufs[0].data_ptr(), bufs[0].numel()))
    r2 = t2.register_region(MemRegion(bufs[1].data_ptr(), bufs[1].numel()))
    t1.add_peer("raw-2", t2.engine_metadata(), [MemRegion(bufs[1].data_ptr(), bufs[1].numel())])
    t2.add_peer("raw-1", t1.engine_metadata(), [MemRegion(bufs[0].data_ptr(), bufs[0].numel())])
    yield t1, t2, bufs, (r1, r2)
    t1.close()
    t2.close()


def _disjoint(rng, size, count, max_len):
    """``count`` non-overlapping (offset, nbytes) in [0, size)."""
    cuts = np.sort(rng.choice(size // max_len, count, replace=False)) * max_len
    lens = rng.integers(1, max_len, count)
    return cuts.astype(np.int64), lens.astype(np.int64)


@pytest.mark.parametrize("op", ["READ", "WRITE"])
def test_random_descriptors_exact(pair, op):
    t1, t2, (b1, b2), _ = pair
    rng = np.random.default_rng(3)
    loff, lens = _disjoint(rng, b1.numel(), 37, 900)
    roff, _ = _disjoint(rng, b2.numel(), 37, 900)
    before1, before2 = b1.numpy().copy(), b2.numpy().copy()
    zeros = np.zeros(37, dtype=np.int64)
    x = t1.post(op, "raw-2", zeros, loff, zeros, roff, lens, notify=b'{"n": 1}')
    t1.wait(x, 10)
    src, dst = (before2, b1.numpy()) if op == "READ" else (before1, b2.numpy())
    so, do = (roff, loff) if op == "READ" else (loff, roff)
    expect = (before1 if op == "READ" else before2).copy()
    for s, d, n in zip(so, do, lens, strict=True):
        expect[d : d + n] = src[s : s + n]
    assert np.array_equal(dst, expect)  # moved bytes exact, all others untouched
    untouched = b2.numpy() if op == "READ" else b1.numpy()
    assert np.array_equal(untouched, before2 if op == "READ" else before1)
    got = []
    for _ in range(2000):
        got += t2.notifications()
        if got:
            break
        time.sleep(0.005)
    assert got == [("raw-1", b'{"n": 1}')]


def test_bad_descriptors_refused_before_posting(pair):
    t1, _, (b1, b2), _ = pair
    z = [0]
    cases = [
        (([1], z, z, z, [8]), "local region 1 does not exist"),
        ((z, [b1.numel() - 4], z, z, [8]), "outside local region 0"),
        ((z, z, z, [b2.numel() - 1], [2]), r"outside remote \(raw-2\) region 0"),
        ((z, [-1], z, z, [8]), "outside local region"),
        ((z, z, z, z, [0]), "outside local region"),
        ((z, [0, 1], z, z, [8]), "differ in length"),
        ((z, np.array([0.0]), z, z, [8]), "integer array"),
        (([], [], [], [], []), "no descriptors"),
    ]
    for args, msg in cases:
        with pytest.raises(DescriptorError, match=msg):
            t1.post("READ", "raw-2", *args)
    with pytest.raises(DescriptorError, match="op must be"):
        t1.post("COPY", "raw-2", z, z, z, z, [8])
    with pytest.raises(UnknownPeerError, match="unknown peer 'ghost'"):
        t1.post("READ", "ghost", z, z, z, z, [8])


def test_close_deregisters_and_refuses(backend):
    buf = torch.zeros(4096, dtype=torch.uint8)
    t = create_transport(backend, "raw-closing")
    idx = t.register_region(MemRegion(buf.data_ptr(), buf.numel()))
    t.deregister_region(idx)
    with pytest.raises(DescriptorError, match="not registered"):
        t.deregister_region(idx)
    t.close()
    t.close()  # idempotent
    with pytest.raises(TransferFailedError, match="closed"):
        t.post("READ", "x", [0], [0], [0], [0], [1])


def test_mooncake_peer_gone_before_posting_is_not_quarantined():
    """A session that refuses connections (a restarted or dead peer) fails the job
    before any engine call: its destination is quiet at once, not after the drain."""
    require("mooncake")
    buf = torch.zeros(4096, dtype=torch.uint8)
    t = create_transport("mooncake", "raw-gone", drain_seconds=900)
    try:
        t.register_region(MemRegion(buf.data_ptr(), buf.numel()))
        with socket.socket() as s:  # bound, not listening: connections are refused
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}".encode()
            t.add_peer("gone", dead, [MemRegion(1 << 20, 4096)])
            z = [0]
            x = t.post("READ", "gone", z, z, z, z, [64])
            with pytest.raises(TransferFailedError, match="refuses connections"):
                t.wait(x, 10)
        assert t.quiesced(x)
    finally:
        t.close()

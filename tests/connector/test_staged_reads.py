"""Staged reads learnt per layout pair: later reads skip the plan, stay exact and checked.

Two agents in one process on the same-host transport (host memory, cma); truth is
torch indexing on the logical views of both caches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvbridge.connector.transfer.agent import KVTransferAgent
from kvbridge.topology import LayoutError, TransferPlan
from kvbridge.topology.layouts import allocate

DIMS = dict(num_layers=2, num_kv_heads=4, head_dim=16, dtype=torch.bfloat16, device="cpu")


@pytest.fixture()
def agents():
    gen = torch.Generator().manual_seed(7)
    src = allocate("packed", num_blocks=24, block_size=8, generator=gen, **DIMS)
    dst = allocate("nhd", num_blocks=20, block_size=4, generator=gen, **DIMS)
    a = KVTransferAgent("holder", src, backend="local", side_channel_port=0)
    b = KVTransferAgent("puller", dst, backend="local", side_channel_port=0)
    try:
        yield src, dst, b, b.connect_to(a.side_channel_address)
    finally:
        b.close()
        a.close()


def _expect(src, dst, s_ids, d_ids, num_tokens):
    """Token t: source block s_ids[t // 8] slot t % 8 -> dst block d_ids[t // 4] slot t % 4."""
    for name, sviews in src.layers.items():
        for sv, dv in zip(sviews, dst.layers[name], strict=True):
            t = torch.arange(num_tokens)
            want = sv[torch.as_tensor(s_ids)[t // 8], t % 8]
            got = dv[torch.as_tensor(d_ids)[t // 4], t % 4]
            assert torch.equal(got, want), name


def test_second_read_of_a_fragmented_pair_builds_no_plan(agents, monkeypatch):
    src, dst, b, peer = agents
    calls = []
    real = TransferPlan.between.__func__

    def counting(cls, *args, **kw):
        calls.append(1)
        return real(cls, *args, **kw)

    monkeypatch.setattr(TransferPlan, "between", classmethod(counting))
    first = b.read_blocks(peer, [3, 5, 7], [1, 2, 9, 4, 6, 0], num_tokens=22)
    assert first.staged and len(calls) == 1
    _expect(src, dst, [3, 5, 7], [1, 2, 9, 4, 6, 0], 22)
    for p in dst.backing:  # fresh bytes at the destination, then another request
        p.view(torch.int16).random_(generator=torch.Generator().manual_seed(3))
    second = b.read_blocks(peer, [20, 2], [11, 17, 3, 12], num_tokens=13)
    assert second.staged and len(calls) == 1  # learnt: no plan built
    _expect(src, dst, [20, 2], [11, 17, 3, 12], 13)
    assert second.bytes > 0


def test_the_fast_path_still_refuses_bad_ids(agents):
    _, _, b, peer = agents
    b.read_blocks(peer, [3, 5], [1, 2, 9, 4], num_tokens=16)  # learn the pair
    with pytest.raises(LayoutError):
        b.read_blocks(peer, [3, 24], [1, 2, 9, 4], num_tokens=16)  # source id out of range
    with pytest.raises(LayoutError):
        b.read_blocks(peer, [3, 5], [1, 2, 9, 20], num_tokens=16)  # destination out of range
    with pytest.raises(LayoutError):
        b.read_blocks(peer, [3, 5], [1, 2, 9, 9], num_tokens=16)  # repeated destination
    with pytest.raises(LayoutError):
        b.read_blocks(peer, [3, 5], [1, 2, 9], num_tokens=16)  # too few destination blocks


def test_check_counts_the_tokens_between_moves():
    gen = torch.Generator().manual_seed(1)
    src = allocate("packed", num_blocks=8, block_size=8, generator=gen, **DIMS)
    dst = allocate("nhd", num_blocks=8, block_size=8, generator=gen, **DIMS)
    a = KVTransferAgent("s", src, backend="local").spec
    b = KVTransferAgent("d", dst, backend="local").spec
    assert TransferPlan.check(a, b, [1, 2], [3, 4]) == 16  # whole blocks
    assert TransferPlan.check(a, b, [1, 2], [3, 4], num_tokens=11) == 11
    plan = TransferPlan.between(a, b, np.array([1, 2]), np.array([3, 4]), num_tokens=11)
    per_token = plan.total_bytes // 11
    assert per_token * 11 == plan.total_bytes == 11 * 2 * 2 * 4 * 16 * 2  # layers K/V heads D

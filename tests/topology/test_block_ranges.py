"""block_ranges: exact bytes (torch-indexing truth) and descriptor counts, every layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kv_apply import ranges_mask, truth_block_mask
from kvbridge.topology import LayoutError, TransferTopology, layouts
from topology_reference import reference_block_ranges

SMALL = dict(num_layers=3, num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8,
             kv_lora_rank=16, rope_dim=8, page_bytes=96)  # fmt: skip
ID_SETS = {
    "run": [2, 3, 4, 5, 6],
    "scattered": [9, 0, 4, 11, 7],
    "mixed": [0, 1, 2, 5, 8, 9, 11],
    "all": list(range(12)),
}


def _cache(layout, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return layouts.allocate(layout, **{**SMALL, **kw}, generator=g)


@pytest.mark.parametrize("ids", list(ID_SETS))
@pytest.mark.parametrize(
    "pad", [(0, 0), (3, 0), (0, 5), (7, 2)], ids=["plain", "offset", "pad", "both"]
)
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_exact_bytes(layout, pad, ids):
    offset, block_pad = pad
    cache = _cache(layout, storage_offset=offset, block_pad=block_pad)
    topo = TransferTopology.from_caches(cache.layers)
    block_ids = ID_SETS[ids]
    br = topo.block_ranges(block_ids)
    got = ranges_mask(topo.spec(), cache.layers, br)
    want = truth_block_mask(cache.layers, block_ids)
    for ptr, mask in want.items():
        assert torch.equal(got[ptr], mask), f"{layout}: block_ranges bytes differ from the truth"
    assert br.total_bytes == sum(int(m.sum()) for m in want.values())
    ref = reference_block_ranges(topo.spec(), block_ids)
    assert len(br) == len(ref)  # the fast path is as coalesced as the sort-based one
    key = lambda r: sorted(
        zip(r.region.tolist(), r.offset.tolist(), r.nbytes.tolist(), strict=True)
    )
    assert key(br) == key(ref)


# ranges per layer for one consecutive run (no padding): contiguous blocks cost one
# range per region, kv_outer two (its K and V planes), nhd/hnd have 2 regions per layer
RUN_COST_PER_LAYER = {"nhd": 2, "hnd": 2, "packed": 1, "interleaved": 1, "kv_outer": 2,
                      "head_groups": 1, "mla": 1, "state": 1}  # fmt: skip


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_run_costs_one_range_per_region(layout):
    cache = _cache(layout, storage_offset=5)
    topo = TransferTopology.from_caches(cache.layers)
    br = topo.block_ranges(range(3, 10))
    if layout == "cross_layer":
        assert len(topo.regions) == 1 and len(br) == 1
    else:
        assert len(br) == SMALL["num_layers"] * RUN_COST_PER_LAYER[layout]
        per_region = np.bincount(br.region, minlength=len(topo.regions))
        assert (per_region == (2 if layout == "kv_outer" else 1)).all()
    # padding is never included: each padded block is its own range
    padded = TransferTopology.from_caches(_cache(layout, block_pad=3).layers)
    assert len(padded.block_ranges(range(3, 10))) == 7 * len(br)
    # two runs cost twice as much
    assert len(topo.block_ranges([0, 1, 2, 6, 7])) == 2 * len(br)


def test_kv_outer_full_cache_chains_planes():
    """All blocks of kv_outer: the K plane's run touches the V plane's: one range."""
    cache = _cache("kv_outer", num_layers=1)
    topo = TransferTopology.from_caches(cache.layers)
    br = topo.block_ranges(range(12))
    assert len(br) == 1 and br.total_bytes == topo.regions[0].nbytes


def test_order_does_not_matter_and_ids_forms():
    topo = TransferTopology.from_caches(_cache("packed").layers)
    a = topo.block_ranges([5, 3, 4])
    for ids in (np.array([3, 4, 5], dtype=np.int32), torch.tensor([4, 5, 3]), range(3, 6)):
        b = topo.block_ranges(ids)
        assert np.array_equal(a.offset, b.offset) and np.array_equal(a.nbytes, b.nbytes)
    assert len(topo.block_ranges([])) == 0


def test_addresses_match_tensors():
    cache = _cache("nhd", storage_offset=3)
    topo = TransferTopology.from_caches(cache.layers)
    br = topo.block_ranges([4])
    k = cache.layers["layer0"][0]
    assert int(br.addr(topo.spec())[0]) == k[4].data_ptr()
    assert int(br.nbytes[0]) == k[4].numel() * k.element_size()


def test_block_dim_moves_block_axis_front():
    """Raw (2, N, bs, H, D) kv_outer with block_dim=1 covers the same bytes as its unbound views."""
    cache = _cache("kv_outer", num_layers=1)
    k, v = cache.layers["layer0"]
    base = cache.backing[0]  # rebuild the raw (2, N, ...) view over the same storage
    full = base.as_strided((2, *k.shape), (v.storage_offset() - k.storage_offset(), *k.stride()),
                           k.storage_offset())  # fmt: skip
    a = TransferTopology.from_caches({"layer0": full}, block_dim=1)
    b = TransferTopology.from_caches(cache.layers)
    assert a.regions[0].addr == b.regions[0].addr and a.regions[0].nbytes == b.regions[0].nbytes
    for ids in ([1, 2, 3], [0, 5, 11]):
        ra, rb = a.block_ranges(ids), b.block_ranges(ids)
        assert np.array_equal(ra.offset, rb.offset) and np.array_equal(ra.nbytes, rb.nbytes)
    with pytest.raises(LayoutError, match="no block dimension 5"):
        TransferTopology.from_caches({"layer0": full}, block_dim=5)


def test_two_block_strides_in_one_allocation():
    """Layers with different block strides in one allocation: exact, via the sorted merge."""
    buf = torch.empty(12 * 64 + 12 * 96, dtype=torch.float16)
    a = buf[: 12 * 64].view(12, 4, 16)
    b = buf[12 * 64 :].view(12, 6, 16)
    layers = {"a": (a,), "b": (b,)}
    topo = TransferTopology.from_caches(layers)
    assert len(topo.regions) == 1
    for ids in ([0, 1, 2], [11, 3, 4, 7], list(range(12))):
        br = topo.block_ranges(ids)
        got, want = ranges_mask(topo.spec(), layers, br), truth_block_mask(layers, ids)
        assert all(torch.equal(got[p], m) for p, m in want.items())
    assert len(topo.block_ranges(range(12))) == 1  # a's plane touches b's


def test_state_views_and_mla_value_slice():
    """Typed views unpacked from one page, and MLA's V inside K, cost one range per run."""
    cache = _cache("state", page_bytes=96)
    parts = [((4, 4), torch.float32), ((8,), torch.float16), ((16,), torch.int8)]  # 64+16+16
    layers = {n: tuple(layouts.state_views(v[0], parts)) for n, v in cache.layers.items()}
    topo = TransferTopology.from_caches(layers)
    assert len(topo.regions) == 3 and len(topo.block_ranges(range(2, 9))) == 3
    mla = _cache("mla")
    layers = {n: (v[0], v[0][..., : SMALL["kv_lora_rank"]]) for n, v in mla.layers.items()}
    topo = TransferTopology.from_caches(layers)
    br = topo.block_ranges([4, 5, 6, 9])
    assert len(br) == 2 * 3
    got, want = ranges_mask(topo.spec(), layers, br), truth_block_mask(layers, [4, 5, 6, 9])
    assert all(torch.equal(got[p], m) for p, m in want.items())

"""Plans against torch-indexing truth: every layout, cross layouts, TP heads, block sizes.

Each test fills the source with fresh random data and poisons the destination,
applies the plan as raw byte copies and compares every destination byte with a
copy done by torch indexing on the logical views (see kv_apply.py).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from kv_apply import poison_, run_plan
from kvbridge.topology import TransferPlan, TransferTopology, layouts
from topology_reference import reference_plan

KW = dict(num_layers=2, num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8,
          kv_lora_rank=16, rope_dim=8, page_bytes=96)  # fmt: skip
PAIRS = {
    "run": ([2, 3, 4, 5], [6, 7, 8, 9]),
    "scattered": ([11, 0, 7, 3], [1, 9, 4, 10]),
    "runs_both_sides": ([0, 1, 2, 8, 9], [3, 4, 5, 0, 1]),
    "src_run_dst_scattered": ([4, 5, 6, 7], [9, 2, 11, 0]),
}
_seed = itertools.count(1)


def _cache(layout, **kw):
    g = torch.Generator().manual_seed(next(_seed))
    return layouts.allocate(layout, **{**KW, **kw}, generator=g)


def _pair(a, b, skw=None, dkw=None):
    src, dst = _cache(a, **(skw or {})), _cache(b, **(dkw or {}))
    poison_(dst.layers, next(_seed))
    return src.layers, dst.layers


@pytest.mark.parametrize("ids", list(PAIRS))
@pytest.mark.parametrize("pad", [(0, 0), (5, 3)], ids=["plain", "offset_pad"])
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_identical_layouts(layout, pad, ids):
    s_ids, d_ids = PAIRS[ids]
    src, dst = _pair(layout, layout, dict(storage_offset=pad[0], block_pad=pad[1]))
    plan = run_plan(src, dst, s_ids, d_ids)
    assert not plan.fragmented
    ref = run_plan(src, _pair(layout, layout)[1], s_ids, d_ids, planner=reference_plan)
    assert plan.num_descriptors == ref.num_descriptors


@pytest.mark.parametrize("layout", [x for x in layouts.LAYOUTS if x != "cross_layer"])
def test_identical_run_costs(layout):
    """A run present on both sides costs one descriptor per region pair (two for kv_outer)."""
    src, dst = _pair(layout, layout)
    plan = run_plan(src, dst, range(2, 9), range(4, 11))
    regions = len(TransferTopology.from_caches(src).regions)
    assert plan.num_descriptors == regions * (2 if layout == "kv_outer" else 1)
    # whole blocks: plan.mean_descriptor_bytes is seven blocks of a region
    assert plan.total_bytes == 7 * sum(
        v[0].numel() * v.element_size() for views in src.values() for v in views
    )


def test_cross_layer_run_is_one_descriptor():
    src, dst = _pair("cross_layer", "cross_layer")
    assert run_plan(src, dst, range(2, 9), range(4, 11)).num_descriptors == 1


@pytest.mark.parametrize(("a", "b"), list(itertools.product(layouts.GQA_LAYOUTS, repeat=2)))
def test_cross_layouts(a, b):
    s_ids, d_ids = PAIRS["runs_both_sides"]
    src, dst = _pair(a, b, dict(storage_offset=3, block_pad=2), dict(num_blocks=14, block_pad=1))
    plan = run_plan(src, dst, s_ids, d_ids)
    ref = run_plan(src, _pair(a, b, dkw=dict(num_blocks=14, block_pad=1))[1], s_ids, d_ids,
                   planner=reference_plan)  # fmt: skip
    assert plan.num_descriptors == ref.num_descriptors


def test_packed_to_separate_kv_lines_up_per_row():
    """packed <-> nhd: byte runs line up per (token, head) row of head_dim elements."""
    src, dst = _pair("packed", "nhd", dkw=dict(num_blocks=12))
    plan = run_plan(src, dst, [1, 2], [5, 6])
    row = KW["head_dim"] * 2
    assert (plan.nbytes == row).all()
    assert plan.num_descriptors == 2 * 2 * 2 * KW["block_size"] * KW["num_kv_heads"]
    assert plan.fragmented and plan.fragmentation > 4
    # with one head, a packed block's K rows are 2*D apart and nhd's K rows D apart:
    # still one descriptor per row (runs line up only per row)
    s1, d1 = _pair("packed", "nhd", dict(num_kv_heads=1), dict(num_kv_heads=1))
    assert run_plan(s1, d1, [0], [0]).num_descriptors == 2 * 2 * KW["block_size"]


TP = [
    # (src heads, dst heads, src_head_start, dst_head_start, num_heads)
    (4, 2, 2, 0, None),  # decode rank 1 of TP=2 reads heads [2, 4) of a TP=1 prefill
    (4, 2, 0, 0, 2),
    (2, 4, 0, 2, None),  # TP=1 decode reads prefill rank 1 of 2 into heads [2, 4)
    (4, 4, 1, 2, 2),
]


@pytest.mark.parametrize("tp", TP, ids=lambda t: "-".join(map(str, t)))
@pytest.mark.parametrize(("a", "b"), [("nhd", "nhd"), ("hnd", "hnd"), ("packed", "nhd"),
                                      ("hnd", "head_groups"), ("interleaved", "kv_outer"),
                                      ("head_groups", "head_groups"), ("nhd", "hnd")])  # fmt: skip
def test_tp_head_ranges(a, b, tp):
    hs, hd, s0, d0, nh = tp
    src, dst = _pair(a, b, dict(num_kv_heads=hs, storage_offset=2), dict(num_kv_heads=hd))
    plan = run_plan(src, dst, [3, 4, 5, 9], [0, 1, 2, 7], src_head_start=s0, dst_head_start=d0,
                    num_heads=nh)  # fmt: skip
    n = nh or min(hs - s0, hd - d0)
    assert plan.total_bytes == 2 * 2 * 4 * KW["block_size"] * n * KW["head_dim"] * 2


def test_head_slice_fragmentation_flags():
    """A head slice of NHD shatters into per-token pieces; of HND it stays per block."""
    nhd = _pair("nhd", "nhd", dict(num_kv_heads=8, head_dim=64, block_size=16),
                dict(num_kv_heads=4, head_dim=64, block_size=16))  # fmt: skip
    p = run_plan(*nhd, range(4), range(4), src_head_start=4)
    assert p.fragmented and p.num_descriptors == 2 * 2 * 4 * 16
    hnd = _pair("hnd", "hnd", dict(num_kv_heads=8, head_dim=64, block_size=16),
                dict(num_kv_heads=4, head_dim=64, block_size=16))  # fmt: skip
    q = run_plan(*hnd, range(4), range(4), src_head_start=4)
    # one piece per block (half of each source block), for every block, layer and view
    assert not q.fragmented and q.num_descriptors == 2 * 2 * 4
    assert q.mean_descriptor_bytes == 4 * 16 * 64 * 2
    assert p.total_bytes == q.total_bytes


BLOCK_SIZES = [(16, 32), (32, 16), (16, 8), (8, 16), (16, 16), (4, 6)]


@pytest.mark.parametrize(("bs_s", "bs_d"), BLOCK_SIZES, ids=lambda x: str(x))
@pytest.mark.parametrize(("a", "b"), [("nhd", "nhd"), ("hnd", "hnd"), ("packed", "nhd"),
                                      ("mla", "mla"), ("kv_outer", "interleaved")])  # fmt: skip
@pytest.mark.parametrize("num_tokens", [1, 37, 64])
def test_block_size_mismatch_token_space(a, b, bs_s, bs_d, num_tokens):
    rng = np.random.default_rng(bs_s * 100 + bs_d + num_tokens)
    n = 20
    kw = dict(num_kv_heads=2, head_dim=8, num_blocks=n, kv_lora_rank=8, rope_dim=8)
    src, dst = _pair(a, b, dict(kw, block_size=bs_s, storage_offset=1), dict(kw, block_size=bs_d))
    s_ids = rng.permutation(n)[: -(-num_tokens // bs_s)]
    d_ids = rng.permutation(n)[: -(-num_tokens // bs_d)]
    plan = run_plan(src, dst, s_ids, d_ids, num_tokens=num_tokens)
    ref = run_plan(src, _pair(a, b, dkw=dict(kw, block_size=bs_d))[1], s_ids, d_ids,
                   num_tokens=num_tokens, planner=reference_plan)  # fmt: skip
    assert plan.num_descriptors == ref.num_descriptors
    per_token = {"mla": 16, "state": 0}.get(a, 2 * 2 * 8) * 2
    assert plan.total_bytes == KW["num_layers"] * num_tokens * per_token


def test_token_space_consecutive_blocks_merge():
    """16 -> 32 with consecutive ids on both sides: one descriptor per region for nhd."""
    src, dst = _pair("nhd", "nhd", dict(block_size=16), dict(block_size=32))
    plan = run_plan(src, dst, [2, 3, 4, 5], [6, 7], num_tokens=64)
    assert plan.num_descriptors == 4
    # non-consecutive destination blocks: one cut per destination block
    plan = run_plan(src, _pair("nhd", "nhd", dkw=dict(block_size=32))[1], [2, 3, 4, 5], [7, 1],
                    num_tokens=64)  # fmt: skip
    assert plan.num_descriptors == 8


def test_plan_accepts_topologies_and_reports():
    src, dst = _pair("packed", "packed")
    s, d = TransferTopology.from_caches(src), TransferTopology.from_caches(dst)
    plan = TransferPlan.between(s, d, [1, 2], [3, 4])
    assert plan.num_descriptors == 2 and "2 descriptors" in repr(plan)
    k_src, k_dst = src["layer0"][0], dst["layer0"][0]
    assert k_src[1].data_ptr() in plan.src_addr(s.spec()).tolist()
    assert k_dst[3].data_ptr() in plan.dst_addr(d.spec()).tolist()
    empty = TransferPlan.between(s, d, [], [])
    assert empty.num_descriptors == 0 and empty.total_bytes == 0 and not empty.fragmented

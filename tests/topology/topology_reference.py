"""The general path: expand every piece of every unit, then a sort-based merge.

No tiling tricks and no templates: slower, but simple enough to trust. The
property tests check the fast path against it; it is also the fallback the
expansion uses for templates flagged ``canonical``.
"""

from __future__ import annotations

import numpy as np
from kvbridge.topology.analysis import footprint
from kvbridge.topology.block_ranges import BlockRanges
from kvbridge.topology.expand import unit_offsets
from kvbridge.topology.ids import as_block_ids, sorted_unique
from kvbridge.topology.intervals import canonical, element_pieces
from kvbridge.topology.pairing import HeadRange, PairGeom, identity_pairs, plan_pairs
from kvbridge.topology.plan import TransferPlan
from kvbridge.topology.spec import TopologySpec


def reference_block_ranges(spec: TopologySpec, block_ids) -> BlockRanges:
    footprint(spec)
    ids = as_block_ids(block_ids, spec.num_blocks, "block_ranges")
    sorted_unique(ids, "block_ranges")
    sreg, soff, nb, _, _ = _expand_all(identity_pairs(spec), ids, ids, None)
    region, offset, nbytes = canonical(sreg, soff, nb)
    return BlockRanges(region, offset, nbytes)


def reference_plan(
    src: TopologySpec,
    dst: TopologySpec,
    src_block_ids,
    dst_block_ids,
    num_tokens: int | None = None,
    src_head_start: int = 0,
    dst_head_start: int = 0,
    num_heads: int | None = None,
) -> TransferPlan:
    """Same contract as ``TransferPlan.between`` (errors are checked there first)."""
    fast = TransferPlan.between(
        src,
        dst,
        src_block_ids,
        dst_block_ids,
        num_tokens,
        src_head_start,
        dst_head_start,
        num_heads,
    )
    s_ids = as_block_ids(src_block_ids, src.num_blocks, "source")
    d_ids = as_block_ids(dst_block_ids, dst.num_blocks, "destination")
    heads = HeadRange(src_head_start, dst_head_start, num_heads)
    pairs = plan_pairs(src, dst, num_tokens is not None, heads)
    sreg, soff, nb, dreg, doff = canonical(*_expand_all(pairs, s_ids, d_ids, num_tokens))
    return TransferPlan(sreg, soff, dreg, doff, nb, fragmentation=fast.fragmentation)


def _expand_all(pairs: list[PairGeom], s_ids, d_ids, num_tokens):
    out = []
    for p in pairs:
        s, d, n = element_pieces(p.sizes, p.src_strides, p.dst_strides, p.itemsize)
        su = unit_offsets(s_ids, p.src_unit, num_tokens) + p.src_offset
        du = unit_offsets(d_ids, p.dst_unit, num_tokens) + p.dst_offset
        k = su.size * s.size
        out.append(
            (
                np.full(k, p.src_region, dtype=np.int64),
                np.add.outer(su, s).ravel(),
                np.tile(n, su.size),
                np.full(k, p.dst_region, dtype=np.int64),
                np.add.outer(du, d).ravel(),
            )
        )
    return tuple(np.concatenate(a) for a in zip(*out, strict=True))

"""Per-spec analysis, cached by layout hash: the block footprint and the alias check.

The footprint of a spec is its identity template: each view against itself in
block mode. It drives ``block_ranges`` and proves that no two blocks share a
byte (views of one allocation that alias the same bytes for different blocks
are a ``LayoutError``).
"""

from __future__ import annotations

import itertools

import numpy as np
from kvbridge.topology.errors import LayoutError
from kvbridge.topology.intervals import I64, element_pieces, union_pieces
from kvbridge.topology.pairing import PairGeom, identity_pairs
from kvbridge.topology.spec import TopologySpec
from kvbridge.topology.template import TEMPLATES, Template, build_template

_ALIAS_CHUNK = 1 << 22  # pairs of intervals examined per numpy step
_PAIRWISE_MAX = 4096  # above this many intervals, compare by residue classes instead


def footprint(spec: TopologySpec) -> Template:
    """The identity template of ``spec`` (validated and alias-checked once per layout)."""
    return TEMPLATES.get(("footprint", spec.layout_hash), lambda: _build_footprint(spec))


def _build_footprint(spec: TopologySpec) -> Template:
    spec.validate()
    tpl = build_template(identity_pairs(spec), token_mode=False, check_dst=False)
    _check_aliasing(tpl, spec.num_blocks)
    return tpl


def _check_aliasing(tpl: Template, num_blocks: int) -> None:
    m = tpl.merged
    spans: dict[int, list] = {}  # region -> [(lo, hi, class)]
    for c in range(m.class_key.size):
        sel = m.cls == c
        lo_s, n = m.src[sel], m.nbytes[sel]
        stride = m.units[m.class_key[c]][0].block_stride
        if _blocks_overlap(lo_s, lo_s + n, stride, num_blocks):
            _raise_alias(m.class_pairs[c], num_blocks)
        lo, hi = int(lo_s.min()), int((lo_s + n).max()) + (num_blocks - 1) * stride
        spans.setdefault(int(m.class_sreg[c]), []).append((lo, hi, c))
    for region, items in spans.items():  # several block strides in one region
        items.sort()
        for (_, hi, c1), (lo, _, c2) in itertools.pairwise(items):
            if lo < hi:
                a, b = m.class_pairs[c1][0], m.class_pairs[c2][0]
                raise LayoutError(
                    f"layer {a.layer!r} view {a.view} and layer {b.layer!r} view {b.view} use "
                    f"different block strides ({a.src_unit.block_stride} and "
                    f"{b.src_unit.block_stride} bytes) over the same bytes of region {region}"
                )


def _blocks_overlap(lo: np.ndarray, hi: np.ndarray, stride: int, num_blocks: int) -> bool:
    """Whether the intervals ``[lo, hi)`` of block 0 meet those of any block k in [1, N)."""
    if num_blocks < 2 or lo.size == 0:
        return False
    if int(hi.max()) - int(lo.min()) <= stride:
        return False
    if ((hi - lo) > stride).any():  # longer than a stride: meets its own copy in block 1
        return True
    if lo.size <= _PAIRWISE_MAX:
        return _pairs_overlap(lo, hi, lo, hi, stride, num_blocks)
    # bytes x and y collide iff x = y (mod stride) and 1 <= |x // s - y // s| < N: split
    # each interval into residue ranges of one quotient, group overlapping residues
    q, r = np.divmod(lo, stride)
    end = r + (hi - lo)
    wrap = end > stride
    r_lo = np.concatenate((r, np.zeros(int(wrap.sum()), dtype=I64)))
    r_hi = np.concatenate((np.minimum(end, stride), end[wrap] - stride))
    quo = np.concatenate((q, q[wrap] + 1))
    order = np.argsort(r_lo, kind="stable")
    r_lo, r_hi, quo = r_lo[order], r_hi[order], quo[order]
    reach = np.maximum.accumulate(r_hi)
    starts = np.flatnonzero(np.concatenate(([True], r_lo[1:] >= reach[:-1])))
    ends = np.append(starts[1:], r_lo.size)
    for a, b in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
        if _residues_clash(r_lo[a:b], r_hi[a:b], quo[a:b], num_blocks):
            return True
    return False


def _residues_clash(r_lo, r_hi, quo, num_blocks) -> bool:
    step = max(1, _ALIAS_CHUNK // r_lo.size)
    for i in range(0, r_lo.size, step):
        sl = slice(i, i + step)
        meet = (r_lo[sl, None] < r_hi[None, :]) & (r_lo[None, :] < r_hi[sl, None])
        dq = np.abs(quo[sl, None] - quo[None, :])
        if (meet & (dq >= 1) & (dq < num_blocks)).any():
            return True
    return False


def _pairs_overlap(lo_a, hi_a, lo_b, hi_b, stride, num_blocks) -> bool:
    step = max(1, _ALIAS_CHUNK // lo_b.size)
    for i in range(0, lo_a.size, step):
        a_i, b_i = lo_a[i : i + step, None], hi_a[i : i + step, None]
        # block k shifts interval j by k*stride; it meets interval i iff
        # lo_i - hi_j < k*stride < hi_i - lo_j
        kmin = np.maximum((a_i - hi_b[None, :]) // stride + 1, 1)
        kmax = np.minimum(-((lo_b[None, :] - b_i) // stride) - 1, num_blocks - 1)
        if (kmin <= kmax).any():
            return True
    return False


def _raise_alias(pairs: list[PairGeom], num_blocks: int) -> None:
    def extent(p: PairGeom):
        s, _, n = element_pieces(p.sizes, p.src_strides, p.src_strides, p.itemsize)
        _, s, _, n = union_pieces(np.zeros(s.size, dtype=I64), s + p.src_offset, s, n)
        return s, s + n

    spans = [extent(p) for p in pairs]
    for p, (lo, hi) in zip(pairs, spans, strict=True):
        if _blocks_overlap(lo, hi, p.src_unit.block_stride, num_blocks):
            raise LayoutError(
                f"layer {p.layer!r} view {p.view}: blocks overlap (block stride "
                f"{p.src_unit.block_stride} bytes, a block spans {int(hi.max() - lo.min())} bytes)"
            )
    for i, (p, (lo1, hi1)) in enumerate(zip(pairs, spans, strict=True)):
        for q, (lo2, hi2) in zip(pairs[i + 1 :], spans[i + 1 :], strict=True):
            lo, hi = np.concatenate((lo1, lo2)), np.concatenate((hi1, hi2))
            if _blocks_overlap(lo, hi, p.src_unit.block_stride, num_blocks):
                raise LayoutError(
                    f"layer {p.layer!r} view {p.view} and layer {q.layer!r} view {q.view} "
                    "alias the same bytes for different blocks"
                )
    raise LayoutError(f"views of layers {sorted({p.layer for p in pairs})} alias across blocks")

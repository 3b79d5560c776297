"""``TransferPlan``: descriptor arrays that move selected blocks between two topologies.

Every descriptor is contiguous on both sides; copying each source range onto its
destination range moves exactly the selected blocks (tokens, heads) of every
layer and nothing else. See docs/architecture.md for the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kvbridge.topology.analysis import footprint
from kvbridge.topology.errors import LayoutError
from kvbridge.topology.expand import expand
from kvbridge.topology.ids import as_block_ids, count_runs, sorted_unique
from kvbridge.topology.pairing import HeadRange, plan_pairs
from kvbridge.topology.spec import TopologySpec
from kvbridge.topology.template import TEMPLATES, Template, build_template

#: A plan is ``fragmented`` when it needs this many times more descriptors than
#: reading the same source blocks whole would ...
FRAGMENTATION_LIMIT = 4.0
#: ... and its descriptors average fewer bytes than this.
SMALL_DESCRIPTOR_BYTES = 16 << 10


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """int64 arrays of equal length, one entry per descriptor (offsets from region bases)."""

    src_region: np.ndarray
    src_offset: np.ndarray
    dst_region: np.ndarray
    dst_offset: np.ndarray
    nbytes: np.ndarray
    #: descriptors per descriptor of a plan reading the same source blocks whole
    fragmentation: float = 1.0

    @property
    def num_descriptors(self) -> int:
        return int(self.nbytes.size)

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    @property
    def mean_descriptor_bytes(self) -> float:
        return self.total_bytes / self.num_descriptors if self.num_descriptors else 0.0

    @property
    def fragmented(self) -> bool:
        """True when descriptors are too small and many to move efficiently.

        The agent may then read whole source blocks into a staging buffer with the
        source's layout and relayout locally.
        """
        return (
            self.fragmentation > FRAGMENTATION_LIMIT
            and self.mean_descriptor_bytes < SMALL_DESCRIPTOR_BYTES
        )

    def src_addr(self, src: TopologySpec) -> np.ndarray:
        return src.region_addrs[self.src_region] + self.src_offset

    def dst_addr(self, dst: TopologySpec) -> np.ndarray:
        return dst.region_addrs[self.dst_region] + self.dst_offset

    def __repr__(self) -> str:
        return (
            f"TransferPlan({self.num_descriptors} descriptors, {self.total_bytes} bytes, "
            f"fragmentation {self.fragmentation:.2f}{', fragmented' if self.fragmented else ''})"
        )

    @classmethod
    def between(
        cls,
        src: TopologySpec,
        dst: TopologySpec,
        src_block_ids,
        dst_block_ids,
        num_tokens: int | None = None,
        src_head_start: int = 0,
        dst_head_start: int = 0,
        num_heads: int | None = None,
    ) -> TransferPlan:
        """Plan moving ``src_block_ids`` of ``src`` onto ``dst_block_ids`` of ``dst``.

        Block mode (``num_tokens=None``): ``src_block_ids[i]`` lands in
        ``dst_block_ids[i]``, all tokens; block sizes must match. Token mode: the
        ids are each side's block table of one token sequence of ``num_tokens``
        tokens (token ``t`` in slot ``t % bs`` of block ``ids[t // bs]``); block
        sizes may differ. Head ranges apply to 4-D views: destination heads
        ``[dst_head_start, dst_head_start + num_heads)`` receive source heads
        ``[src_head_start, ...)``. ``src``/``dst`` are specs or topologies.
        """
        src, dst, heads, s_ids, d_ids = _checked(
            src, dst, src_block_ids, dst_block_ids, src_head_start, dst_head_start, num_heads
        )
        src_fp = footprint(src)
        if num_tokens is None:
            s_sorted, d_ids = _block_pairs(src, dst, s_ids, d_ids, heads)
            arrays = expand(_template(src, dst, False, heads), s_sorted, d_ids)
            used = s_sorted
        else:
            arrays, used = _token_plan(src, dst, s_ids, d_ids, num_tokens, heads)
        sreg, soff, nb, dreg, doff = arrays
        ideal = src_fp.num_tiling * count_runs(used) + src_fp.num_other * used.size
        return cls(sreg, soff, dreg, doff, nb, fragmentation=nb.size / ideal if ideal else 1.0)

    @staticmethod
    def check(
        src: TopologySpec,
        dst: TopologySpec,
        src_block_ids,
        dst_block_ids,
        num_tokens: int | None = None,
        src_head_start: int = 0,
        dst_head_start: int = 0,
        num_heads: int | None = None,
    ) -> int:
        """Every check ``between`` makes (``LayoutError`` where it would raise), without
        building descriptors; returns the tokens moved (whole blocks in block mode)."""
        src, dst, heads, s_ids, d_ids = _checked(
            src, dst, src_block_ids, dst_block_ids, src_head_start, dst_head_start, num_heads
        )
        if num_tokens is None:
            _block_pairs(src, dst, s_ids, d_ids, heads)
            bs = _block_size(_template(src, dst, True, heads), 0, "source")
            return int(s_ids.size) * bs
        return _token_checks(src, dst, s_ids, d_ids, num_tokens, heads)[3]


def _checked(src, dst, src_block_ids, dst_block_ids, src_head_start, dst_head_start, num_heads):
    """Both specs, the head range and both id arrays, checked (in range, int64)."""
    src, dst = _as_spec(src, "source"), _as_spec(dst, "destination")
    footprint(src)
    footprint(dst)
    heads = HeadRange(src_head_start, dst_head_start, num_heads)
    s_ids = as_block_ids(src_block_ids, src.num_blocks, "source")
    d_ids = as_block_ids(dst_block_ids, dst.num_blocks, "destination")
    return src, dst, heads, s_ids, d_ids


def _block_pairs(src, dst, s_ids, d_ids, heads) -> tuple[np.ndarray, np.ndarray]:
    """Block mode: source ids sorted (unique) with their destination ids (unique)."""
    if s_ids.size != d_ids.size:
        raise LayoutError(f"{s_ids.size} source block ids but {d_ids.size} destination block ids")
    _template(src, dst, False, heads)  # the pairing is possible
    s_sorted, order = sorted_unique(s_ids, "source")
    d_ids = d_ids if order is None else d_ids[order]
    sorted_unique(d_ids, "destination")
    return s_sorted, d_ids


def _as_spec(x, what: str) -> TopologySpec:
    if isinstance(x, TopologySpec):
        return x
    spec = getattr(x, "spec", None)
    if callable(spec):
        return spec()
    raise LayoutError(
        f"{what}: expected a TopologySpec or TransferTopology, got {type(x).__name__}"
    )


def _template(src: TopologySpec, dst: TopologySpec, token_mode: bool, heads: HeadRange) -> Template:
    key = ("plan", src.layout_hash, dst.layout_hash, token_mode, heads)
    return TEMPLATES.get(
        key, lambda: build_template(plan_pairs(src, dst, token_mode, heads), token_mode, True)
    )


def _token_checks(src, dst, s_ids, d_ids, num_tokens, heads):
    """Token mode: the template, both block sizes and ``num_tokens``, checked."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
        raise LayoutError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    num_tokens = int(num_tokens)
    if num_tokens < 0:
        raise LayoutError(f"num_tokens must be >= 0, got {num_tokens}")
    tpl = _template(src, dst, True, heads)
    s_bs, d_bs = _block_size(tpl, 0, "source"), _block_size(tpl, 1, "destination")
    for ids, bs, what in ((s_ids, s_bs, "source"), (d_ids, d_bs, "destination")):
        need = -(-num_tokens // bs)
        if ids.size != need:
            raise LayoutError(
                f"{what}: {num_tokens} tokens in blocks of {bs} need {need} block ids, "
                f"got {ids.size}"
            )
        sorted_unique(ids, what)
    return tpl, s_bs, d_bs, num_tokens


def _token_plan(src, dst, s_ids, d_ids, num_tokens, heads):
    tpl, s_bs, d_bs, num_tokens = _token_checks(src, dst, s_ids, d_ids, num_tokens, heads)
    used = np.sort(s_ids)
    if s_bs != d_bs:
        return expand(tpl, s_ids, d_ids, num_tokens), used
    # same block size: whole blocks in block mode, the partial last block in token mode
    full = num_tokens // s_bs
    order = np.argsort(s_ids[:full], kind="stable")
    parts = [expand(_template(src, dst, False, heads), s_ids[:full][order], d_ids[:full][order])]
    if num_tokens % s_bs:
        parts.append(expand(tpl, s_ids[full:], d_ids[full:], num_tokens % s_bs))
    return tuple(np.concatenate(a) for a in zip(*parts, strict=True)), used


def _block_size(tpl: Template, side: int, what: str) -> int:
    sizes = {units[side].block_size for units in tpl.merged.units}
    if len(sizes) != 1:
        raise LayoutError(f"{what}: views have different block sizes {sorted(sizes)}")
    return sizes.pop()


__all__ = ["TransferPlan"]

"""Match the views of two specs and reduce each pair to a strided index space.

A *unit* is what the block ids address: a whole block (block mode) or one token
(token mode, used when the block sizes differ). For each (layer, view) pair this
module returns the per-unit index space (sizes, strides on both sides, byte
offsets of its first element) and how each side steps from unit to unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbridge.topology.errors import LayoutError
from kvbridge.topology.spec import TopologySpec, ViewSpec


@dataclass(frozen=True)
class UnitGeom:
    """How one side addresses a unit: block stride, token stride (bytes), tokens per block."""

    block_stride: int
    token_stride: int = 0
    block_size: int = 1

    @property
    def step(self) -> int:
        """Byte distance between consecutive units when they are contiguous."""
        return self.token_stride if self.token_stride else self.block_stride


@dataclass(frozen=True)
class HeadRange:
    """Destination heads ``[dst_start, dst_start + num)`` get source heads ``[src_start, ...)``."""

    src_start: int = 0
    dst_start: int = 0
    num: int | None = None

    def kwargs(self) -> dict:
        """As ``TransferPlan.between`` keywords."""
        return {
            "src_head_start": self.src_start,
            "dst_head_start": self.dst_start,
            "num_heads": self.num,
        }


@dataclass(frozen=True)
class PairGeom:
    """One (layer, view) pair reduced to a per-unit strided copy."""

    layer: str
    view: int
    src_region: int
    dst_region: int
    src_offset: int  # bytes from region base to the pair's first element of unit 0
    dst_offset: int
    sizes: tuple[int, ...]
    src_strides: tuple[int, ...]  # elements
    dst_strides: tuple[int, ...]
    itemsize: int
    src_unit: UnitGeom
    dst_unit: UnitGeom


def identity_pairs(spec: TopologySpec) -> list[PairGeom]:
    """Every view against itself in block mode (the footprint used by block_ranges)."""
    out = []
    for layer in spec.layers:
        for i, v in enumerate(layer.views):
            unit = UnitGeom(v.block_stride)
            out.append(
                PairGeom(layer.name, i, v.region, v.region, v.offset, v.offset, v.shape[1:],
                         v.strides[1:], v.strides[1:], v.itemsize, unit, unit)
            )  # fmt: skip
    return out


def plan_pairs(
    src: TopologySpec, dst: TopologySpec, token_mode: bool, heads: HeadRange
) -> list[PairGeom]:
    """Pair the views of ``src`` and ``dst`` layer by layer; raises ``LayoutError``."""
    dst_layers = {layer.name: layer for layer in dst.layers}
    src_names = {layer.name for layer in src.layers}
    missing = [n for n in dst_layers if n not in src_names]
    if missing:
        raise LayoutError(f"layer {missing[0]!r} exists on the destination but not on the source")
    out = []
    for layer in src.layers:
        peer = dst_layers.get(layer.name)
        if peer is None:
            raise LayoutError(
                f"layer {layer.name!r} exists on the source but not on the destination"
            )
        if len(peer.views) != len(layer.views):
            raise LayoutError(
                f"layer {layer.name!r}: {len(layer.views)} views on the source, "
                f"{len(peer.views)} on the destination"
            )
        for i, (sv, dv) in enumerate(zip(layer.views, peer.views, strict=True)):
            out.append(
                _pair(f"layer {layer.name!r} view {i}", layer.name, i, sv, dv, token_mode, heads)
            )
    return out


def _pair(
    where: str, name: str, i: int, sv: ViewSpec, dv: ViewSpec, token_mode: bool, heads: HeadRange
) -> PairGeom:
    if sv.dtype != dv.dtype or sv.itemsize != dv.itemsize:
        raise LayoutError(f"{where}: dtype mismatch (source {sv.dtype}, destination {dv.dtype})")
    if len(sv.shape) != len(dv.shape):
        raise LayoutError(
            f"{where}: rank mismatch (source {len(sv.shape)}-D {sv.shape}, "
            f"destination {len(dv.shape)}-D {dv.shape})"
        )
    ndim = len(sv.shape)
    if sv.shape[-1] != dv.shape[-1]:
        what = "head_dim" if ndim == 4 else "last dim"
        raise LayoutError(
            f"{where}: {what} mismatch (source {sv.shape[-1]}, destination {dv.shape[-1]})"
        )
    s_off, d_off = sv.offset, dv.offset
    s_sizes, d_sizes = list(sv.shape), list(dv.shape)
    if ndim == 4:  # (blocks, tokens, heads, head_dim): apply the head range
        nh = _resolve_heads(where, sv.shape[2], dv.shape[2], heads)
        s_off += heads.src_start * sv.strides[2] * sv.itemsize
        d_off += heads.dst_start * dv.strides[2] * dv.itemsize
        s_sizes[2] = d_sizes[2] = nh
    first = 1
    if token_mode:
        if ndim not in (3, 4):
            raise LayoutError(
                f"{where}: a {ndim}-D view has no token dim; token-space plans need "
                "(blocks, tokens, dim) or (blocks, tokens, heads, head_dim) views"
            )
        first = 2
        s_unit, d_unit = _token_unit(sv), _token_unit(dv)
    else:
        if ndim >= 3 and sv.shape[1] != dv.shape[1]:
            raise LayoutError(
                f"{where}: block sizes differ (source {sv.shape[1]} tokens, destination "
                f"{dv.shape[1]}); pass num_tokens to plan in token space"
            )
        s_unit, d_unit = UnitGeom(sv.block_stride), UnitGeom(dv.block_stride)
    if s_sizes[first:] != d_sizes[first:]:
        raise LayoutError(
            f"{where}: per-unit shapes differ (source {tuple(sv.shape[first:])}, "
            f"destination {tuple(dv.shape[first:])})"
        )
    return PairGeom(
        layer=name,
        view=i,
        src_region=sv.region,
        dst_region=dv.region,
        src_offset=s_off,
        dst_offset=d_off,
        sizes=tuple(s_sizes[first:]),
        src_strides=sv.strides[first:],
        dst_strides=dv.strides[first:],
        itemsize=sv.itemsize,
        src_unit=s_unit,
        dst_unit=d_unit,
    )


def _token_unit(v: ViewSpec) -> UnitGeom:
    # with one token per block, the next token is in the next block
    step = v.block_stride if v.shape[1] == 1 else v.strides[1] * v.itemsize
    return UnitGeom(v.block_stride, step, v.shape[1])


def _resolve_heads(where: str, src_heads: int, dst_heads: int, heads: HeadRange) -> int:
    a, b = heads.src_start, heads.dst_start
    if a < 0 or b < 0:
        raise LayoutError(f"{where}: negative head start (source {a}, destination {b})")
    num = heads.num
    if num is None:
        if a == 0 and b == 0 and src_heads != dst_heads:
            raise LayoutError(
                f"{where}: head counts differ (source {src_heads}, destination {dst_heads}); "
                "pass src_head_start / dst_head_start / num_heads"
            )
        num = min(src_heads - a, dst_heads - b)
    if num < 1 or a + num > src_heads or b + num > dst_heads:
        raise LayoutError(
            f"{where}: head range out of bounds: source heads [{a}, {a + num}) of {src_heads}, "
            f"destination heads [{b}, {b + num}) of {dst_heads}"
        )
    return num

"""Wire structs of a topology (msgspec): what a peer needs to plan against us.

Addresses are bytes; strides are elements; ``ViewSpec.offset`` is the byte offset
of the view's element ``[0, ...]`` from its region's base. Views are in logical
order with the block dim first (see docs/architecture.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property

import msgspec
import numpy as np
from kvbridge.topology.describe import ViewInfo
from kvbridge.topology.errors import LayoutError

SPEC_VERSION = 1


class Region(msgspec.Struct, frozen=True):
    """One registrable span of memory: a backing allocation's bytes that views touch."""

    index: int
    addr: int
    nbytes: int
    device: str
    layers: tuple[str, ...] = ()


class ViewSpec(msgspec.Struct, frozen=True, array_like=True):
    """Geometry of one logical view: ``(num_blocks, ...)`` with strides in elements."""

    region: int
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    itemsize: int

    @property
    def block_stride(self) -> int:
        """Bytes between consecutive blocks."""
        return self.strides[0] * self.itemsize

    @property
    def extent(self) -> int:
        """Bytes from element ``[0, ...]`` to the end of the last element."""
        last = sum((n - 1) * s for n, s in zip(self.shape, self.strides, strict=False))
        return (last + 1) * self.itemsize


class LayerSpec(msgspec.Struct, frozen=True, array_like=True):
    name: str
    views: tuple[ViewSpec, ...]


class TopologySpec(msgspec.Struct, frozen=True, dict=True):
    """Everything a peer needs to plan transfers against a topology.

    ``compat_hash``: what every peer must share (layer names, dtypes, view ranks,
    trailing dims such as head_dim). ``layout_hash``: the full geometry, without
    addresses; equal hashes mean byte-identical blocks.
    """

    version: int
    num_blocks: int
    regions: tuple[Region, ...]
    layers: tuple[LayerSpec, ...]
    compat_hash: str = ""
    layout_hash: str = ""

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> TopologySpec:
        """Decode and validate (version, hashes, geometry); raises ``LayoutError``."""
        try:
            spec = msgspec.msgpack.decode(data, type=cls)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise LayoutError(f"malformed topology spec: {exc}") from None
        spec.validate()
        return spec

    @classmethod
    def build(cls, num_blocks: int, regions: Sequence[Region], layers: Sequence[LayerSpec]):
        """A spec with its hashes filled in (not yet validated)."""
        regions, layers = tuple(regions), tuple(layers)
        return cls(
            version=SPEC_VERSION,
            num_blocks=num_blocks,
            regions=regions,
            layers=layers,
            compat_hash=_hash(_compat_key(layers)),
            layout_hash=_hash(_layout_key(num_blocks, regions, layers)),
        )

    @cached_property
    def region_addrs(self) -> np.ndarray:
        """Base address of each region (int64), for ``addr = region_addrs[r] + offset``."""
        return np.array([r.addr for r in self.regions], dtype=np.int64)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def validate(self) -> None:
        """Raise ``LayoutError`` unless the spec is self-consistent and in bounds."""
        if self.version != SPEC_VERSION:
            raise LayoutError(
                f"topology spec version {self.version} is not supported (expected {SPEC_VERSION})"
            )
        if self.num_blocks < 1:
            raise LayoutError(f"topology spec has {self.num_blocks} blocks")
        if not self.layers:
            raise LayoutError("topology spec has no layers")
        for i, r in enumerate(self.regions):
            if r.index != i or r.nbytes <= 0 or r.addr < 0:
                raise LayoutError(
                    f"region {i}: bad index/addr/nbytes ({r.index}, {r.addr}, {r.nbytes})"
                )
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise LayoutError("topology spec has duplicate layer names")
        for layer in self.layers:
            if not layer.views:
                raise LayoutError(f"layer {layer.name!r}: no views")
            for i, v in enumerate(layer.views):
                check_view(f"layer {layer.name!r} view {i}", v, self.num_blocks, self.regions)
        if self.compat_hash != _hash(_compat_key(self.layers)):
            raise LayoutError("topology spec compat_hash does not match its layers")
        if self.layout_hash != _hash(_layout_key(self.num_blocks, self.regions, self.layers)):
            raise LayoutError("topology spec layout_hash does not match its geometry")


def check_view(where: str, v: ViewSpec, num_blocks: int, regions: Sequence[Region]) -> None:
    """Geometry checks shared by spec building and decoding."""
    if len(v.shape) < 2 or len(v.strides) != len(v.shape):
        raise LayoutError(f"{where}: needs a block dim plus per-block dims (shape {v.shape})")
    if any(s < 0 for s in v.strides):
        d = next(i for i, s in enumerate(v.strides) if s < 0)
        raise LayoutError(f"{where}: negative stride ({v.strides[d]}) in dim {d}")
    if any(n <= 0 for n in v.shape[1:]):
        raise LayoutError(f"{where}: empty per-block shape {v.shape[1:]}")
    if v.shape[0] != num_blocks:
        raise LayoutError(f"{where}: {v.shape[0]} blocks, other views have {num_blocks}")
    if num_blocks > 1 and v.strides[0] == 0:
        raise LayoutError(f"{where}: zero stride in the block dim (every block aliases block 0)")
    if v.itemsize <= 0:
        raise LayoutError(f"{where}: itemsize {v.itemsize}")
    if not 0 <= v.region < len(regions):
        raise LayoutError(f"{where}: region {v.region} does not exist")
    if v.offset < 0 or v.offset + v.extent > regions[v.region].nbytes:
        raise LayoutError(
            f"{where}: bytes [{v.offset}, {v.offset + v.extent}) lie outside region "
            f"{v.region} ({regions[v.region].nbytes} bytes)"
        )


def build_spec(layers: Sequence[tuple[str, Sequence[ViewInfo]]]) -> TopologySpec:
    """Regions and geometry from described views; raises ``LayoutError``."""
    names = [name for name, _ in layers]
    if len(set(names)) != len(names):
        raise LayoutError("duplicate layer names")
    views = [v for _, vs in layers for v in vs]
    num_blocks = views[0].shape[0]
    for v in views:
        if v.shape[0] != num_blocks:
            raise LayoutError(
                f"layer {v.layer!r} view {v.index}: {v.shape[0]} blocks, but layer "
                f"{views[0].layer!r} view {views[0].index} has {num_blocks}"
            )
    # one span per storage, in first-appearance order
    spans: dict[tuple, list] = {}
    for v in views:
        lo, hi = v.addr, v.addr + v.extent
        if v.storage in spans:
            s = spans[v.storage]
            s[0], s[1] = min(s[0], lo), max(s[1], hi)
        else:
            spans[v.storage] = [lo, hi, v.device, len(spans)]
    # merge storages whose spans overlap (same device); keep first-appearance order
    groups = sorted(spans.values(), key=lambda s: (s[2], s[0]))
    merged: list[list] = []
    for lo, hi, dev, order in groups:
        if merged and merged[-1][2] == dev and lo < merged[-1][1]:
            m = merged[-1]
            m[1], m[3] = max(m[1], hi), min(m[3], order)
        else:
            merged.append([lo, hi, dev, order])
    merged.sort(key=lambda m: m[3])
    region_of = {}
    for key, (lo, _hi, dev, _) in spans.items():
        region_of[key] = next(i for i, m in enumerate(merged) if m[2] == dev and m[0] <= lo < m[1])
    touching: list[list[str]] = [[] for _ in merged]
    for v in views:
        r = region_of[v.storage]
        if not touching[r] or touching[r][-1] != v.layer:
            touching[r].append(v.layer)
    regions = tuple(
        Region(index=i, addr=m[0], nbytes=m[1] - m[0], device=m[2], layers=tuple(touching[i]))
        for i, m in enumerate(merged)
    )
    layer_specs = []
    for name, vs in layers:
        specs = []
        for v in vs:
            r = region_of[v.storage]
            vs_ = ViewSpec(
                region=r,
                offset=v.addr - regions[r].addr,
                shape=v.shape,
                strides=v.strides,
                dtype=v.dtype,
                itemsize=v.itemsize,
            )
            check_view(f"layer {name!r} view {v.index}", vs_, num_blocks, regions)
            specs.append(vs_)
        layer_specs.append(LayerSpec(name=name, views=tuple(specs)))
    return TopologySpec.build(num_blocks, regions, layer_specs)


def _compat_key(layers: Sequence[LayerSpec]) -> tuple:
    return tuple(
        (layer.name, tuple((v.dtype, v.itemsize, len(v.shape), v.shape[-1]) for v in layer.views))
        for layer in layers
    )


def _layout_key(num_blocks: int, regions: Sequence[Region], layers: Sequence[LayerSpec]) -> tuple:
    return (
        num_blocks,
        tuple(r.nbytes for r in regions),
        tuple(
            (
                layer.name,
                tuple(
                    (v.region, v.offset, v.shape, v.strides, v.dtype, v.itemsize)
                    for v in layer.views
                ),
            )
            for layer in layers
        ),
    )


def _hash(key: tuple) -> str:
    return hashlib.sha256(msgspec.msgpack.encode((SPEC_VERSION, key))).hexdigest()[:32]

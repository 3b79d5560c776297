"""``KVCache`` and ``allocate``: build a random-filled cache in any registered layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from kvbridge.topology.layouts.registry import get_layout


@dataclass
class KVCache:
    """A paged KV cache: its allocations and the per-layer logical views."""

    layout: str
    backing: list[torch.Tensor]
    layers: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return next(iter(self.layers.values()))[0].shape[0]

    @property
    def block_size(self) -> int:
        return next(iter(self.layers.values()))[0].shape[1]

    def kv(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(k, v)`` views the decode kernel takes for ``layer``."""
        return get_layout(self.layout).kv(self.layers[layer], self.meta)


def _strided(
    shape: Sequence[int],
    block_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
    storage_offset: int,
    block_pad: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-major tensor of ``shape`` whose ``block_dim`` stride carries ``block_pad``
    extra elements, placed ``storage_offset`` elements into a fresh flat buffer.

    Returns ``(view, flat_buffer)``; the buffer is filled with random data.
    """
    shape = list(shape)
    strides = [0] * len(shape)
    acc = 1
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = acc
        acc *= shape[d]
        if d == block_dim:
            strides[d] += block_pad
            acc = strides[d] * shape[d]
    numel = storage_offset + sum((s - 1) * st for s, st in zip(shape, strides, strict=True)) + 1
    flat = torch.empty(numel, dtype=dtype, device=device)
    fill_random_(flat, generator)
    return flat.as_strided(shape, strides, storage_offset), flat


def fill_random_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``t`` (any dtype) with fresh random bits-level data; never zeros."""
    if t.dtype.is_floating_point and t.element_size() >= 2 and t.dtype != torch.float8_e4m3fn:
        return t.normal_(generator=generator)
    raw = t.view(torch.uint8)
    raw.copy_(
        torch.randint(0, 256, raw.shape, dtype=torch.uint8, device=t.device, generator=generator)
    )
    if t.dtype == torch.float8_e4m3fn:  # avoid NaN encodings (0x7f / 0xff)
        raw.bitwise_and_(0x7E)
    return t


def allocate(
    layout: str,
    *,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int = 1,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    storage_offset: int = 0,
    block_pad: int = 0,
    kv_lora_rank: int = 512,
    rope_dim: int = 64,
    page_bytes: int = 4096,
    generator: torch.Generator | None = None,
) -> KVCache:
    """Allocate a cache in a registered ``layout`` filled with random data."""
    lay = get_layout(layout)
    kw = dict(
        dtype=dtype,
        device=device,
        storage_offset=storage_offset,
        block_pad=block_pad,
        generator=generator,
    )
    cache = KVCache(layout=layout, backing=[])

    def new(shape: Sequence[int], block_dim: int = 0, **over) -> torch.Tensor:
        view, flat = _strided(shape, block_dim, **{**kw, **over})
        cache.backing.append(flat)
        return view

    dims = dict(
        n=num_blocks,
        bs=block_size,
        h=num_kv_heads,
        d=head_dim,
        kv_lora_rank=kv_lora_rank,
        rope_dim=rope_dim,
        page_bytes=page_bytes,
    )
    cache.layers = lay.all_views(new, dims, [f"layer{i}" for i in range(num_layers)])
    if lay.family == "mla":
        cache.meta["kv_lora_rank"] = kv_lora_rank
    return cache

"""Allocate paged KV caches in every DESIGN.md layout.

Each layout returns the backing allocations and, per layer, the *logical views*
an attention backend uses. View conventions (the contract the topology, the
kernels and the transports share):

* GQA/MHA layouts: ``(k, v)``, each in logical order
  ``(num_blocks, block_size, num_kv_heads, head_dim)`` with whatever strides the
  physical layout gives (never copied, never made contiguous).
* ``mla``: ``(latent,)`` of shape ``(num_blocks, block_size, kv_lora_rank + rope_dim)``;
  ``mla_kv_views`` turns it into the kernel's ``k``/``v`` (V = first ``kv_lora_rank``
  columns of K).
* ``state``: ``(page,)`` of shape ``(num_blocks, page_bytes)`` int8 (Mamba-style
  state pages); ``state_views`` unpacks a page into typed state views.

``storage_offset`` (elements) and ``block_pad`` (elements of padding after each
block) give layout 9 on top of any other layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

GQA_LAYOUTS = ("nhd", "hnd", "packed", "interleaved", "kv_outer", "head_groups", "cross_layer")
LAYOUTS = (*GQA_LAYOUTS, "mla", "state")


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
        views = self.layers[layer]
        if self.layout == "mla":
            return mla_kv_views(views[0], self.meta["kv_lora_rank"])
        if self.layout == "state":
            raise ValueError("state pages have no K/V views")
        return views[0], views[1]


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
    """Allocate a cache in ``layout`` (one of ``LAYOUTS``) filled with random data."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown KV layout {layout!r}; supported: {', '.join(LAYOUTS)}")
    n, bs, h, d = num_blocks, block_size, num_kv_heads, head_dim
    kw = dict(
        dtype=dtype,
        device=device,
        storage_offset=storage_offset,
        block_pad=block_pad,
        generator=generator,
    )
    cache = KVCache(layout=layout, backing=[])
    names = [f"layer{i}" for i in range(num_layers)]

    def new(shape: Sequence[int], block_dim: int = 0, **over) -> torch.Tensor:
        view, flat = _strided(shape, block_dim, **{**kw, **over})
        cache.backing.append(flat)
        return view

    if layout == "cross_layer":
        x = new((n, num_layers, 2, bs, h, d))
        for i, name in enumerate(names):
            cache.layers[name] = (x[:, i, 0], x[:, i, 1])
        return cache
    for name in names:
        if layout == "nhd":
            views = (new((n, bs, h, d)), new((n, bs, h, d)))
        elif layout == "hnd":
            views = (new((n, h, bs, d)).transpose(1, 2), new((n, h, bs, d)).transpose(1, 2))
        elif layout == "packed":
            kv = new((n, h, bs, 2 * d))
            views = tuple(kv.transpose(1, 2).split(d, -1))
        elif layout == "interleaved":
            views = tuple(new((n, 2, bs, h, d)).unbind(1))
        elif layout == "kv_outer":
            views = tuple(new((2, n, bs, h, d), block_dim=1).unbind(0))
        elif layout == "head_groups":
            x = new((n, 2 * h, bs, d))
            views = (x[:, :h].transpose(1, 2), x[:, h:].transpose(1, 2))
        elif layout == "mla":
            views = (new((n, bs, kv_lora_rank + rope_dim)),)
        else:  # state
            views = (new((n, page_bytes), dtype=torch.int8),)
        cache.layers[name] = views
    if layout == "mla":
        cache.meta["kv_lora_rank"] = kv_lora_rank
    return cache


def mla_kv_views(latent: torch.Tensor, kv_lora_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel views of an MLA latent buffer: K (N, bs, 1, rank+rope), V = K[..., :rank]."""
    k = latent.unsqueeze(2)
    return k, k[..., :kv_lora_rank]


def state_views(
    page: torch.Tensor, parts: Sequence[tuple[Sequence[int], torch.dtype]]
) -> list[torch.Tensor]:
    """Unpack ``(num_blocks, page_bytes)`` int8 pages into typed per-block state views.

    ``parts`` lists ``(shape_per_block, dtype)``; each part starts at the next byte
    offset aligned to its element size. Views alias the page (no copy).
    """
    out, off = [], 0
    n, page_bytes = page.shape
    for shape, dtype in parts:
        size = torch.empty((), dtype=dtype).element_size()
        off = -(-off // size) * size
        count = math.prod(shape)
        if off + count * size > page_bytes:
            raise ValueError("state parts do not fit in the page")
        if page.stride(0) % size or page.storage_offset() % size:
            raise ValueError("page stride/offset not aligned to the state dtype")
        t = torch.empty(0, dtype=dtype, device=page.device).set_(
            page.untyped_storage(),
            (page.storage_offset() + off) // size,
            (n, *shape),
            (page.stride(0) // size, *_row_major(shape)),
        )
        out.append(t)
        off += count * size
    return out


def _row_major(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))

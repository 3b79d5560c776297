"""Typed views over layout allocations: MLA's K/V and state pages (no copies)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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

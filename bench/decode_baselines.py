"""Baselines a user would otherwise pick for paged decode, for bench/decode.py.

* ``flex_paged``: PyTorch FlexAttention's paged path: the physical cache seen as one
  long sequence ``(1, H, num_blocks * block_size, D)`` (a view of an NHD cache) and
  a ``BlockMask`` whose KV blocks are the pages of each sequence (what
  ``torch.nn.attention.experimental._paged_attention`` builds). Full pages only.
* ``sdpa_gather``: gather each sequence's pages into a dense ``(B, H, S, D)`` tensor
  and run ``scaled_dot_product_attention`` (works for any layout).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def sdpa_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> Callable[[], torch.Tensor]:
    """SDPA over the gathered cache (all sequences of ``seq_len`` tokens)."""
    bs = k.shape[1]
    pages = seq_len // bs
    ids = block_table[:, :pages].to(torch.int64)
    b = q.shape[0]
    mqa = k.shape[2] == 1  # MQA/MLA: heads become query rows of one KV head (no repeat)
    q4 = q.unsqueeze(1) if mqa else q.unsqueeze(2)

    def run() -> torch.Tensor:
        kg = k[ids].reshape(b, pages * bs, k.shape[2], k.shape[3]).transpose(1, 2)
        vg = v[ids].reshape(b, pages * bs, v.shape[2], v.shape[3]).transpose(1, 2)
        o = F.scaled_dot_product_attention(q4, kg, vg, scale=scale, enable_gqa=not mqa)
        return o.squeeze(1) if mqa else o.squeeze(2)

    return run


def flex_paged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> Callable[[], torch.Tensor]:
    """FlexAttention over the physical cache with a paged BlockMask (compiled).

    Needs K and V whose (block, slot) dims merge into one token dim (NHD-like views).
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    n, bs, h, _ = k.shape
    b = q.shape[0]
    pages = seq_len // bs
    kv_num = torch.full((b, 1, 1), pages, dtype=torch.int32, device=q.device)
    idx = torch.zeros((b, 1, 1, n), dtype=torch.int32, device=q.device)
    idx[:, 0, 0, :pages] = block_table[:, :pages].to(torch.int32)
    mask = BlockMask.from_kv_blocks(kv_num, idx, BLOCK_SIZE=(128, bs), seq_lengths=(1, n * bs))
    k1 = k.view(1, n * bs, h, k.shape[3]).transpose(1, 2)
    v1 = v.view(1, n * bs, h, v.shape[3]).transpose(1, 2)
    assert k1.data_ptr() == k.data_ptr() and v1.data_ptr() == v.data_ptr()
    fn = torch.compile(flex_attention, dynamic=False)
    q4 = q.unsqueeze(2)

    def run() -> torch.Tensor:
        return fn(q4, k1, v1, block_mask=mask, scale=scale, enable_gqa=True).squeeze(2)

    return run

"""PyTorch reference backend of ``paged_decode`` (also the CPU path).

For each sequence it gathers only the blocks the sequence needs from the strided
K/V views (advanced indexing on the views: no copy of the cache, no
``.contiguous()``), upcasts to fp32, applies the fp8 scales, and runs a plain
fp32 softmax attention. Query head ``j`` attends with KV head ``j // group``.
"""

from __future__ import annotations

import torch

from .checks import DecodeProblem, scale_operand


def torch_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    p: DecodeProblem,
    k_scale: object,
    v_scale: object,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write attention of every sequence into ``out`` (B, Hq, Dv); return ``out``."""
    ks = scale_operand(k_scale, q.device)
    vs = scale_operand(v_scale, q.device)
    hkv, g, bs = p.num_kv_heads, p.group, p.block_size
    lens = seq_lens.tolist()
    for b, length in enumerate(lens):
        if length == 0:
            out[b].zero_()
            continue
        n_pages = -(-length // bs)
        ids = block_table[b, :n_pages].to(torch.int64)
        k = k_cache[ids].reshape(n_pages * bs, hkv, p.head_dim_qk)[:length]
        v = v_cache[ids].reshape(n_pages * bs, hkv, p.head_dim_v)[:length]
        k = k.to(torch.float32) * ks
        v = v.to(torch.float32) * vs
        qg = q[b].to(torch.float32).reshape(hkv, g, p.head_dim_qk)
        scores = torch.einsum("hgd,thd->hgt", qg, k) * p.scale
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgt,thd->hgd", probs, v)
        out[b].copy_(o.reshape(p.num_q_heads, p.head_dim_v))
    return out

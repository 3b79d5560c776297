"""PyTorch reference backend of ``paged_decode`` (also the CPU path).

For each sequence it gathers only the blocks its queries can see (from the first
block of the window, if any, to its length) from the strided K/V views (advanced
indexing on the views: no copy of the cache, no ``.contiguous()``), upcasts to
fp32, applies the fp8 scales and runs a masked fp32 softmax attention: query
token ``t`` sits at position ``p = len - T + t`` and sees keys ``j <= p`` (and
``j > p - window``). Query head ``h`` attends with KV head ``h // group``.
"""

from __future__ import annotations

import torch
from kvbridge.kernels.checks import DecodeProblem, scale_operand


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
    """Write attention of every sequence into ``out`` ((B, [T,] Hq, Dv)); return ``out``."""
    ks = scale_operand(k_scale, q.device)
    vs = scale_operand(v_scale, q.device)
    hkv, g, bs, t_new, win = p.num_kv_heads, p.group, p.block_size, p.tokens, p.window
    q4 = q if p.multi else q.unsqueeze(1)
    o4 = out if p.multi else out.unsqueeze(1)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            o4[b].zero_()
            continue
        lo = max(0, length - t_new - win + 1) if win else 0
        first, n_pages = lo // bs, -(-length // bs)
        ids = block_table[b, first:n_pages].to(device=q.device, dtype=torch.int64)
        span = slice(lo - first * bs, length - first * bs)
        k = k_cache[ids].reshape(-1, hkv, p.head_dim_qk)[span].to(torch.float32) * ks
        v = v_cache[ids].reshape(-1, hkv, p.head_dim_v)[span].to(torch.float32) * vs
        pos = torch.arange(length - t_new, length, device=q.device)[:, None]  # (T, 1)
        j = torch.arange(lo, length, device=q.device)[None, :]  # (1, L)
        seen = (j <= pos) & (j > pos - win) if win else j <= pos
        qg = q4[b].to(torch.float32).reshape(t_new, hkv, g, p.head_dim_qk)
        scores = torch.einsum("thgd,jhd->thgj", qg, k) * p.scale
        scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row seeing nothing: zeros
        o = torch.einsum("thgj,jhd->thgd", probs, v)
        o4[b].copy_(o.reshape(t_new, p.num_q_heads, p.head_dim_v))
    return out

"""Ground truth and case builders for the paged decode tests.

``brute_force`` is independent of both backends: it picks every token through the
logical views with per-token indexing (``view[block, slot]``) and computes
softmax attention in float64.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from kvbridge.topology.layouts import allocate

TOLERANCE = {  # relative L2 error vs float64; measured ~1e-7 / 1e-4 / 2e-3 (fp8: 4e-3)
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


@dataclass
class DecodeCase:
    """Inputs of one ``paged_decode`` call plus the cache that owns the views."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    k_scale: float | torch.Tensor | None = None
    v_scale: float | torch.Tensor | None = None
    cache: object = None
    seed: int = 0
    window: int | None = None

    def kwargs(self) -> dict:
        return dict(k_scale=self.k_scale, v_scale=self.v_scale, window=self.window)

    def out_shape(self) -> tuple[int, ...]:
        return (*self.q.shape[:-1], self.v.shape[3])


def brute_force(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Float64 attention over the logical views, query token by query token.

    ``q`` (B, Hq, D) or (B, T, Hq, D): token ``i`` of T is at position
    ``len - T + i`` and sees the keys ``j`` with ``pos - window < j <= pos``.
    """
    multi = q.dim() == 4
    q4 = (q if multi else q.unsqueeze(1)).cpu().to(torch.float64)
    b_, n_tok, hq, dqk = q4.shape
    bs, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    scale = 1.0 / math.sqrt(dqk) if scale is None else scale
    ks = 1.0 if k_scale is None else float(k_scale)
    vs = 1.0 if v_scale is None else float(v_scale)
    out = torch.zeros(b_, n_tok, hq, dv, dtype=torch.float64)
    kv_head = torch.arange(hq) // g
    kc, vc, table = k.cpu(), v.cpu(), block_table.cpu().to(torch.int64)
    for b in range(b_):
        length = int(seq_lens[b])
        for i in range(n_tok if length else 0):
            pos = length - n_tok + i
            first = max(0, pos - window + 1) if window else 0
            t = torch.arange(first, pos + 1)
            blk, slot = table[b][t // bs], t % bs
            kk = kc[blk, slot].to(torch.float64) * ks  # (L, Hkv, Dqk), token by token
            vv = vc[blk, slot].to(torch.float64) * vs
            s = torch.einsum("hd,thd->ht", q4[b, i], kk[:, kv_head]) * scale
            w = torch.exp(s - s.max(dim=1, keepdim=True).values)
            w = w / w.sum(dim=1, keepdim=True)
            out[b, i] = torch.einsum("ht,thd->hd", w, vv[:, kv_head])
    return out if multi else out[:, 0]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has NaN)."""
    o = out.detach().cpu().to(torch.float64)
    if not torch.isfinite(o).all():
        return math.inf
    return float((o - ref).norm() / ref.norm().clamp_min(1e-30))


def make_case(
    layout: str,
    *,
    seq_lens: list[int],
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    kv_dtype: torch.dtype | None = None,
    storage_offset: int = 0,
    block_pad: int = 0,
    num_layers: int = 1,
    layer: int = 0,
    kv_lora_rank: int = 512,
    rope_dim: int = 64,
    strided_q: bool = False,
    extra_blocks: int = 3,
    table_pad_pages: int = 1,
    device: str = "cpu",
    seed: int | None = None,
    tokens: int | None = None,
    window: int | None = None,
) -> DecodeCase:
    """A random cache in ``layout`` with a shuffled block table padded with -1.

    ``tokens``: q is (B, T, Hq, D) (strided_q then also permutes T and Hq in memory).
    """
    seed = seed if seed is not None else secrets.randbelow(2**31)  # fresh data every run
    gen = torch.Generator().manual_seed(seed)
    # layouts.fill_random_ draws fp8/int bits on the CPU, so a CUDA generator fails
    # there: on a GPU the cache comes from the global RNG (fresh data either way).
    dev_gen = gen if torch.device(device).type == "cpu" else None
    kv_dtype = kv_dtype or dtype
    pages = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages) + extra_blocks
    cache = allocate(
        layout,
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=1 if layout == "mla" else num_kv_heads,
        head_dim=head_dim,
        dtype=kv_dtype,
        device=device,
        storage_offset=storage_offset,
        block_pad=block_pad,
        kv_lora_rank=kv_lora_rank,
        rope_dim=rope_dim,
        generator=dev_gen,
    )
    k, v = cache.kv(f"layer{layer}")
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(pages, default=0) + table_pad_pages
    table = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    dqk = k.shape[3]
    extra = 8 if strided_q else 0
    if tokens is None:
        q = torch.randn(len(seq_lens), num_q_heads, dqk + extra, generator=gen)
    else:
        q = torch.randn(len(seq_lens), num_q_heads, tokens, dqk + extra, generator=gen)
        q = q.transpose(1, 2) if strided_q else q.transpose(1, 2).contiguous()
    q = q.to(device=device, dtype=dtype)[..., :dqk]  # strided_q: a non-contiguous view
    case = DecodeCase(
        q=q,
        k=k,
        v=v,
        block_table=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cache=cache,
        seed=seed,
        window=window,
    )
    if kv_dtype == torch.float8_e4m3fn:
        case.k_scale, case.v_scale = 0.02, 0.05
    return case


def check_case(case: DecodeCase, out: torch.Tensor, tol: float | None = None) -> float:
    """Assert ``out`` matches the brute force; return the relative error."""
    ref = brute_force(case.q, case.k, case.v, case.block_table, case.seq_lens, None,
                      case.k_scale, case.v_scale, case.window)  # fmt: skip
    tol = tol if tol is not None else TOLERANCE[case.q.dtype]
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:g} (make_case seed={case.seed})"
    for b, n in enumerate(case.seq_lens.tolist()):
        if n == 0:
            assert (out[b] == 0).all(), f"sequence {b} has seq_len 0 but a non-zero output"
    return err

"""The model's GPU fast path: fused projections and three Triton kernels.

A decode step of the bench model (16 layers, batch 64) ran about 40 kernels a layer
on an H200, 690 in all, and spent 1.2 of its 2.8 ms in the small elementwise ones
(RMSNorm's casts and reductions, rope's slices and concatenations, the two K/V
index writes). On CUDA, ``LlamaModel`` instead runs per layer: RMSNorm (one kernel),
one q/k/v GEMM, rope + K/V store (one kernel), attention, the o GEMM, residual add +
RMSNorm (one kernel), one gate/up GEMM, SiLU * up (one kernel), the down GEMM.

Numerics follow the torch path (and transformers): RMSNorm and rope tables in
float32, each product rounded to the model dtype where torch rounds it. On an H200
(bench/model_fused.py) RMSNorm and SiLU * up are bit-equal to the torch ops in
bf16; rope differs by one bf16 rounding in about a quarter of the elements. The
fused q/k/v and gate/up weights are the layer's own tensors concatenated once, the
originals becoming views of them (no second copy in memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, xo_ptr, n_cols, sx, sr, sy, sxo, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    if HAS_RES:  # x + residual, rounded to the dtype as torch's add is
        r = tl.load(res_ptr + row * sr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * sxo + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    h = (xf * (1.0 / tl.sqrt(var + eps))).to(y_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * h.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * sy + cols, y, mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, sgu, so, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gu_ptr + row * sgu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * sgu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * so + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_half(x1, x2, c, s, dt: tl.constexpr):
    """Rotate-half rope with torch's roundings: ``x * cos + rotate_half(x) * sin``."""
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    a1 = (x1f * c).to(dt).to(tl.float32)
    b1 = (-(x2f * s)).to(dt).to(tl.float32)
    a2 = (x2f * c).to(dt).to(tl.float32)
    b2 = (x1f * s).to(dt).to(tl.float32)
    return (a1 + b1).to(dt), (a2 + b2).to(dt)


@triton.jit
def _rope_store_kernel(
    qkv_ptr, cos_ptr, sin_ptr, blk_ptr, slot_ptr, q_ptr, k_ptr, kc_ptr, vc_ptr,
    sqkv, scs, sq0, sq1, sk0, sk1, kc0, kc1, kc2, vc0, vc1, vc2,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
    BHQ: tl.constexpr, BHKV: tl.constexpr, BHALF: tl.constexpr, WRITE_K: tl.constexpr,
):  # fmt: skip
    """One token: rope its q heads (into ``q``) and k heads with the token's cos/sin row
    (both halves equal: the first is read), store k and v into the cache views at
    (block, slot) through their strides (last stride 1); k also into ``k``."""
    t = tl.program_id(0).to(tl.int64)
    dt: tl.constexpr = q_ptr.dtype.element_ty
    d = tl.arange(0, BHALF)
    dmask = d < HALF
    c = tl.load(cos_ptr + t * scs + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * scs + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    row = qkv_ptr + t * sqkv
    hq = tl.arange(0, BHQ)[:, None]
    m = (hq < HQ) & dmask[None, :]
    col = hq * (2 * HALF) + d[None, :]
    q1, q2 = _rope_half(tl.load(row + col, mask=m), tl.load(row + col + HALF, mask=m), c, s, dt)
    qo = q_ptr + t * sq0 + hq * sq1 + d[None, :]
    tl.store(qo, q1, mask=m)
    tl.store(qo + HALF, q2, mask=m)
    hk = tl.arange(0, BHKV)[:, None]
    mk = (hk < HKV) & dmask[None, :]
    kcol = HQ * 2 * HALF + hk * (2 * HALF) + d[None, :]
    k1, k2 = _rope_half(tl.load(row + kcol, mask=mk), tl.load(row + kcol + HALF, mask=mk), c, s, dt)
    vcol = kcol + HKV * 2 * HALF
    v1 = tl.load(row + vcol, mask=mk)
    v2 = tl.load(row + vcol + HALF, mask=mk)
    b = tl.load(blk_ptr + t).to(tl.int64)
    sl = tl.load(slot_ptr + t).to(tl.int64)
    ko = kc_ptr + b * kc0 + sl * kc1 + hk * kc2 + d[None, :]
    tl.store(ko, k1, mask=mk)
    tl.store(ko + HALF, k2, mask=mk)
    vo = vc_ptr + b * vc0 + sl * vc1 + hk * vc2 + d[None, :]
    tl.store(vo, v1, mask=mk)
    tl.store(vo + HALF, v2, mask=mk)
    if WRITE_K:
        kk = k_ptr + t * sk0 + hk * sk1 + d[None, :]
        tl.store(kk, k1, mask=mk)
        tl.store(kk + HALF, k2, mask=mk)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x'), x')`` with ``x' = x + residual`` (or ``x``); rows of ``(T, H)``."""
    t, n = x.shape
    y = torch.empty_like(x)
    xo = torch.empty_like(x) if residual is not None else x
    if t:
        r = residual if residual is not None else x
        _rms_norm_kernel[(t,)](
            x, r, weight, y, xo, n, x.stride(0), r.stride(0), y.stride(0), xo.stride(0), eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
            num_warps=4 if n <= 4096 else 8,
        )  # fmt: skip
    return y, xo


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a ``(T, 2 I)`` gate/up projection, ``(T, I)``."""
    t, n2 = gate_up.shape
    n = n2 // 2
    out = gate_up.new_empty(t, n)
    block = min(triton.next_power_of_2(n), 2048)
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, block))](
            gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
        )
    return out


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: tuple[int, int, int],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blk: torch.Tensor,
    slot: torch.Tensor,
    want_k: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rope q and k of a ``(T, (Hq + 2 Hkv) D)`` projection, write k and v into the
    cache views at ``(blk[t], slot[t])``; ``(q (T, Hq, D), roped k (T, Hkv, D) or None)``.
    ``cos``/``sin``: the model's rope tables ``(T, 1, D)`` (``rope.rope_tables``, built
    by torch once per forward: the same values as the torch path).

    The cache views are ``(blocks, block_size, Hkv, D)`` with any strides but a unit
    last one (every layout of ``kvbridge.topology.layouts``); offsets are int64."""
    hq, hkv, d = heads
    t = qkv.shape[0]
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or d % 2:
        raise ValueError("rope_store needs unit-stride head dims and an even head_dim")
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("rope_store needs cos and sin tables of one unit-stride layout")
    q = qkv.new_empty(t, hq, d)
    k = qkv.new_empty(t, hkv, d) if want_k else q
    if t:
        half = d // 2
        kc, vc = k_cache.stride(), v_cache.stride()
        _rope_store_kernel[(t,)](
            qkv, cos, sin, blk, slot, q, k, k_cache, v_cache,
            qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            kc[0], kc[1], kc[2], vc[0], vc[1], vc[2],
            HQ=hq, HKV=hkv, HALF=half, BHQ=triton.next_power_of_2(hq),
            BHKV=triton.next_power_of_2(hkv), BHALF=triton.next_power_of_2(half),
            WRITE_K=want_k, num_warps=4,
        )  # fmt: skip
    return q, (k if want_k else None)


def fuse_weights(layers) -> list[tuple]:
    """Per layer ``(wqkv, bqkv, w_gate_up, b_gate_up)``: each pair or triple concatenated
    once, the layer's own fields replaced by views of the result (no second copy)."""
    out = []
    for lw in layers:
        wqkv = torch.cat((lw.wq, lw.wk, lw.wv))
        nq, nk = lw.wq.shape[0], lw.wk.shape[0]
        lw.wq, lw.wk, lw.wv = wqkv[:nq], wqkv[nq : nq + nk], wqkv[nq + nk :]
        bqkv = None
        if lw.bq is not None:
            bqkv = torch.cat((lw.bq, lw.bk, lw.bv))
            lw.bq, lw.bk, lw.bv = bqkv[:nq], bqkv[nq : nq + nk], bqkv[nq + nk :]
        wgu = torch.cat((lw.w_gate, lw.w_up))
        nf = lw.w_gate.shape[0]
        lw.w_gate, lw.w_up = wgu[:nf], wgu[nf:]
        bgu = None
        if lw.b_gate is not None:
            bgu = torch.cat((lw.b_gate, lw.b_up))
            lw.b_gate, lw.b_up = bgu[:nf], bgu[nf:]
        out.append((wqkv, bqkv, wgu, bgu))
    return out

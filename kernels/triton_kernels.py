"""Triton kernels of the stride-aware paged decode (flash-decoding, two stages).

Stage 1: one program per (row tile, sequence, split). The rows of a KV head are
its (query token, query head) pairs, ``row = t * group + h``; a row tile is up
to ``BLOCK_H`` of them, so each K/V tile is loaded once for all the heads and
all the T new tokens and scored with ``tl.dot`` (MLA: 128 heads share one latent;
multi-token decode: T tokens share the same KV). Token ``t`` of T sits at position
``p = len - T + t`` and sees keys ``j <= p`` (``CAUSAL``) and ``j > p - window``
(``WINDOW``); a tile walks only the key range its rows can see, so blocks wholly
outside the window are never read. The
program walks its split's tokens ``BLOCK_N`` at a time: token ``t`` lives in slot
``t % PAGE`` of block ``block_table[b, t // PAGE]``; every address is
``block * stride_b + slot * stride_t + head * stride_h + d`` computed in int64 from
strides passed at run time (never from the shape). K is read in two column
chunks: ``[0, DA)`` and an optional tail ``[DA, DA + DT)`` (MLA rope part); with
``V_SHARED`` the first chunk is also V (MLA: V = first 512 latent columns), so
the latent is read once. ``DV_TILES > 1`` splits the output columns over that
many programs (each recomputes the scores) to bound the fp32 accumulator's
registers (MLA: 128 heads x 512 columns). Online softmax in fp32, base 2.

Stage 2 merges the splits' normalised partial outputs by their log-sum-exp; a
split (or sequence) with no tokens has lse = -inf and weight 0, and a row whose
weights are all 0 is written as zeros (never 0/0). With one split stage 1
writes the output directly. With ``FUSED`` the merge runs inside stage 1 (one
launch): each split counts itself on an int32 counter per (row tile, sequence)
and the last to arrive merges (``_merge_if_last``) and resets the counter to 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Ints that change from call to call: no value specialisation (no recompiles).
# Cache strides keep Triton's divisible-by-16 specialisation, which is what lets
# it emit 16-byte loads; a stride of any other value is still correct.
_STAGE1_DYNAMIC = [
    "num_blocks", "max_pages", "stride_btb", "tokens_per_split", "group", "n_tok", "window",
]  # fmt: skip


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` accumulated in place (no second fp32 tile in registers).

    With UPCAST the operands go to fp32 first (exact for bf16/fp16): Triton's CPU
    interpreter multiplies bf16 bit patterns as integers otherwise.
    """
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc, input_precision=PRECISION)
    return r


@triton.jit(do_not_specialize=_STAGE1_DYNAMIC)
def paged_decode_stage1(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_ptr,
    o_ptr,
    lse_ptr,
    ks_ptr,
    vs_ptr,
    out_ptr,
    sem_ptr,
    qk_scale,
    k_scale,
    v_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lt,
    stride_lh,
    stride_fb,
    stride_ft,
    stride_fh,
    num_blocks,
    max_pages,
    tokens_per_split,
    group,
    n_tok,
    window,
    PAGE: tl.constexpr,
    HEAD_TILES: tl.constexpr,
    DV_TILES: tl.constexpr,
    DA: tl.constexpr,
    DT: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    V_SHARED: tl.constexpr,
    DIRECT: tl.constexpr,
    K_SCALE_PTR: tl.constexpr,
    V_SCALE_PTR: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    FUSED: tl.constexpr,
):
    pid_h = tl.program_id(0) // DV_TILES
    dv_tile = tl.program_id(0) % DV_TILES
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    kvh = (pid_h // HEAD_TILES).to(tl.int64)
    r0 = (pid_h % HEAD_TILES) * BLOCK_H
    rows = r0 + tl.arange(0, BLOCK_H)  # row = token * group + head in group
    n_rows = n_tok * group
    h_mask = rows < n_rows
    tok = (rows // group).to(tl.int64)
    heads = kvh * group + (rows % group).to(tl.int64)

    # Sequence bounds: clamp to the table's capacity, so nothing past it is read.
    seq_len = tl.load(seq_ptr + b).to(tl.int64)
    cap = max_pages.to(tl.int64) * PAGE
    seq_len = tl.minimum(tl.maximum(seq_len, 0), cap)
    pos = seq_len - n_tok + tok  # each row's own position (sees keys <= pos)
    hi = seq_len
    if CAUSAL:  # the tile's last token sees up to its position
        t_hi = (tl.minimum(r0 + BLOCK_H, n_rows) - 1) // group
        hi = tl.maximum(tl.minimum(seq_len - n_tok + t_hi + 1, seq_len), 0)
    lo = hi * 0
    if WINDOW:  # the tile's first token sees from pos - window + 1
        lo = tl.maximum(seq_len - n_tok + r0 // group - window + 1, 0)
    start = (lo // BLOCK_N) * BLOCK_N + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, hi)

    cdt = q_ptr.dtype.element_ty
    offs_da = tl.arange(0, BLOCK_DA)
    da_mask = offs_da < DA
    q_rows = q_ptr + b * stride_qb + tok[:, None] * stride_qt + heads[:, None] * stride_qh
    q_a = tl.load(q_rows + offs_da[None, :], mask=h_mask[:, None] & da_mask[None, :], other=0.0)
    if DT > 0:
        offs_dt = tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt < DT
        q_t = tl.load(
            q_rows + DA + offs_dt[None, :], mask=h_mask[:, None] & dt_mask[None, :], other=0.0
        )
    offs_dv = dv_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV

    if K_SCALE_PTR:  # noqa: SIM108
        qk_scale = qk_scale * tl.load(ks_ptr).to(tl.float32)
    else:
        qk_scale = qk_scale * k_scale

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    bt_row = bt_ptr + b * stride_btb
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = (offs_n < end) & (offs_n >= lo)
        page = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        n_mask = n_mask & (page >= 0) & (page < num_blocks)
        slot = (offs_n % PAGE).to(tl.int64)
        k_row = page * stride_kb + slot * stride_kt
        k_a = tl.load(
            k_head + k_row[:, None] + offs_da[None, :],
            mask=n_mask[:, None] & da_mask[None, :],
            other=0.0,
        ).to(cdt)
        qk = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        qk = _mma(q_a, tl.trans(k_a), qk, PRECISION, UPCAST)
        if DT > 0:
            k_t = tl.load(
                k_head + k_row[:, None] + DA + offs_dt[None, :],
                mask=n_mask[:, None] & dt_mask[None, :],
                other=0.0,
            ).to(cdt)
            qk = _mma(q_t, tl.trans(k_t), qk, PRECISION, UPCAST)
        seen = n_mask[None, :]
        if CAUSAL:
            seen = seen & (offs_n[None, :] <= pos[:, None])
        if WINDOW:
            seen = seen & (offs_n[None, :] > pos[:, None] - window)
        qk = tl.where(seen, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_SHARED:
            v = k_a
        else:
            v_row = page * stride_vb + slot * stride_vt
            v = tl.load(
                v_head + v_row[:, None] + offs_dv[None, :],
                mask=n_mask[:, None] & dv_mask[None, :],
                other=0.0,
            ).to(cdt)
        acc = _mma(p.to(cdt), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    if V_SCALE_PTR:  # noqa: SIM108
        vs = tl.load(vs_ptr).to(tl.float32)
    else:
        vs = v_scale
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc * (vs / l_safe)[:, None]
    o_rows = o_ptr + b * stride_ob + tok * stride_ot + heads * stride_oh
    o_ptrs = o_rows[:, None] + offs_dv[None, :]
    o_mask = h_mask[:, None] & dv_mask[None, :]
    if DIRECT:
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs + split * stride_os, o, mask=o_mask)
        lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
        l_rows = lse_ptr + b * stride_lb + tok * stride_lt + heads * stride_lh
        tl.store(l_rows + split, lse, mask=h_mask)
        if FUSED:  # the last split of this row tile to finish merges all of them
            f_rows = out_ptr + b * stride_fb + tok * stride_ft + heads * stride_fh
            _merge_if_last(o_ptrs, l_rows, f_rows[:, None] + offs_dv[None, :], o_mask, h_mask,
                           sem_ptr + b * tl.num_programs(0) + tl.program_id(0), stride_os,
                           BLOCK_H, BLOCK_DV)  # fmt: skip


@triton.jit
def _merge_if_last(po_ptrs, l_rows, out_ptrs, o_mask, h_mask, counter, stride_os,
                   BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr):  # fmt: skip
    """Split-K reduce inside stage 1: count this split's partials as written; the last
    split to arrive merges every split's partial output by log-sum-exp into ``out`` and
    resets the counter to 0 for the next launch on the stream.

    The partials of other programs are read through L2 (``.cg``) after an acquire on
    the counter; this program's stores are released by the barrier + acq_rel atomic.
    """
    n_split = tl.num_programs(2)
    tl.debug_barrier()  # every thread's partial stores precede the (one-thread) release
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == n_split - 1:
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        for s in range(0, n_split):
            ls = tl.load(l_rows + s, mask=h_mask, other=float("-inf"), cache_modifier=".cg")
            m = tl.maximum(m, ls)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        den = tl.zeros([BLOCK_H], tl.float32)
        num = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        for s in range(0, n_split):
            ls = tl.load(l_rows + s, mask=h_mask, other=float("-inf"), cache_modifier=".cg")
            w = tl.where(ls > float("-inf"), tl.exp2(ls - m_safe), 0.0)
            po = tl.load(po_ptrs + s * stride_os, mask=o_mask, other=0.0, cache_modifier=".cg")
            num += po * w[:, None]
            den += w
        o = tl.where(den[:, None] > 0.0, num / tl.where(den > 0.0, den, 1.0)[:, None], 0.0)
        tl.store(out_ptrs, o.to(out_ptrs.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["num_splits", "num_heads"])
def paged_decode_stage2(
    po_ptr,
    lse_ptr,
    out_ptr,
    stride_pb,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lt,
    stride_lh,
    stride_ob,
    stride_ot,
    stride_oh,
    num_splits,
    num_heads,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    t = (tl.program_id(0) // num_heads).to(tl.int64)
    h = (tl.program_id(0) % num_heads).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    po_ptr += t * stride_pt
    lse_ptr += t * stride_lt
    out_ptr += t * stride_ot
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    lse = tl.load(
        lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf")
    )
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m_safe), 0.0)
    denom = tl.sum(w, 0)
    po = tl.load(
        po_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_dv[None, :],
        mask=s_mask[:, None] & dv_mask[None, :],
        other=0.0,
    )
    num = tl.sum(po * w[:, None], 0)
    o = tl.where(denom > 0.0, num / tl.where(denom > 0.0, denom, 1.0), 0.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_dv,
        o.to(out_ptr.dtype.element_ty),
        mask=dv_mask,
    )

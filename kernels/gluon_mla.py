"""MLA decode for Hopper in Gluon (Triton's explicit-layout dialect): wgmma, cp.async ring.

The MLA shape (one latent head, ``Dqk = 576 = 512 + 64`` rope columns, ``Dv = 512``
= the first latent columns, many query heads) is compute-bound at decode: every
query head scores and sums the same latent pages. One program owns ``BLOCK_H = 64``
query rows (heads, or (token, head) pairs for T > 1) x one split of the sequence
and runs 8 warps (two warpgroups):

- its Q tile (64 x 512 and 64 x 64) sits in shared memory for the whole walk;
- the latent pages stream through a ring of ``NUM_STAGES`` shared-memory buffers
  (``BLOCK_N`` keys x 512 and x 64) by ``cp.async`` with computed addresses
  (``block * stride_b + slot * stride_t + d``, int64, any strides, masked rows
  zero-filled), issued ``NUM_STAGES - 1`` tiles ahead;
- ``S = Q K^T`` is one warpgroup MMA chain (each warpgroup 32 of the 64 keys, no
  duplicated work), softmax in fp32 registers (base 2), ``P`` shared with both
  warpgroups by a layout conversion, ``O += P V`` with ``V`` = the first 512
  columns of the *same* shared-memory tile (the latent is read once), each
  warpgroup accumulating 256 of the 512 output columns (128 fp32 registers/thread);
- the ``P V`` MMA of tile i stays in flight into the next iteration, through the
  wait for tile i+1's copies, and retires before tile i+1's score MMAs are issued
  (``PV_OVERLAP``, the earlier schedule, keeps it in flight under those too, but then
  ptxas serialises every wgmma of the kernel: warning C7514); then its slot is
  refilled while the scores compute.

Same arguments, masks, positions (T > 1 causal, window) and output contract as
``triton_kernels.paged_decode_stage1`` (one split writes ``out``, several write
partial outputs and log-sum-exps for its stage 2). Requires sm_90 (wgmma), 16-bit
q and a cache of the same dtype, or a float8_e4m3fn cache (``KV8``), 8 warps.

Schedule options (constexprs ``ONE_ID``, ``PV_WAIT``, ``P_SMEM``, ``LAZY_L``, ``DUP_S``,
``PV_OVERLAP``: ``TritonConfig`` fields); ``triton_config.gluon_mla_config`` turns on
``ONE_ID`` + ``P_SMEM`` for 16-bit latents, ``ONE_ID`` (+ ``DUP_S`` at T = 1) for fp8.

fp8 latent (``KV8``): the ring holds fp8 pages (half the bytes per key, so 32-key
tiles fit 4 deep); each landed tile is widened to q's dtype into one of two
shared-memory tiles that both MMAs read (the other one may still be under the
previous tile's ``P V``), and ``k_scale`` / ``v_scale`` fold into the softmax scale
and the output as in the portable kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

# the CTA-wide barrier: ``thread_barrier`` in triton 3.5/3.6, ``barrier`` from 3.7
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_DYNAMIC = ["num_blocks", "max_pages", "stride_btb", "tokens_per_split", "group", "n_tok", "window"]


@gluon.jit
def _load_ids(bt_row, n0, lo, end, PAGE: gl.constexpr, BLOCK_N: gl.constexpr, L: gl.constexpr):
    """Block ids of keys [n0, n0 + BLOCK_N) (-1 outside [lo, end)), in layout ``L``."""
    offs = n0 + gl.arange(0, BLOCK_N, layout=L)
    return gl.load(bt_row + offs // PAGE, mask=(offs < end) & (offs >= lo), other=-1)


@gluon.jit
def _tile_id(bt_row, n0, end, PAGE: gl.constexpr):
    """The block id of the tile at key ``n0`` (one block holds the tile), -1 past ``end``."""
    return gl.load(bt_row + n0 // PAGE, mask=n0 < end, other=-1)


@gluon.jit
def _issue_tile(ka_buf, kt_buf, k_head, pg_a, pg_t, n0, num_blocks, stride_kb, stride_kt,
                PAGE: gl.constexpr, DA: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr,
                LD_A: gl.constexpr, LD_T: gl.constexpr):  # fmt: skip
    """cp.async the latent rows of keys [n0, n0 + BLOCK_N) into one ring slot (block ids
    ``pg_a``/``pg_t``, loaded an iteration earlier); rows on a block id outside the cache
    (-1: outside the walk) are zero-filled, not read."""
    offs_a = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD_A))
    ok_a = (pg_a >= 0) & (pg_a < num_blocks)
    row_a = pg_a.to(gl.int64) * stride_kb + (offs_a % PAGE).to(gl.int64) * stride_kt
    cols_a = gl.arange(0, DA, layout=gl.SliceLayout(0, LD_A))
    cp.async_copy_global_to_shared(
        ka_buf, k_head + row_a[:, None] + cols_a[None, :], mask=ok_a[:, None]
    )
    offs_t = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD_T))
    ok_t = (pg_t >= 0) & (pg_t < num_blocks)
    row_t = pg_t.to(gl.int64) * stride_kb + (offs_t % PAGE).to(gl.int64) * stride_kt
    cols_t = DA + gl.arange(0, DT, layout=gl.SliceLayout(0, LD_T))
    cp.async_copy_global_to_shared(
        kt_buf, k_head + row_t[:, None] + cols_t[None, :], mask=ok_t[:, None]
    )
    cp.commit_group()


@gluon.jit
def _issue_tile1(ka_buf, kt_buf, k_head, pg, n0, lo, end, num_blocks, stride_kb, stride_kt,
                 PAGE: gl.constexpr, DA: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr,
                 LD_A: gl.constexpr, LD_T: gl.constexpr):  # fmt: skip
    """``_issue_tile`` for a tile inside one block (``ONE_ID``): one scalar block id ``pg``,
    one scalar base address; rows outside [lo, end) or on an invalid id are zero-filled
    (``stride_kt`` may be a constexpr: then the row offsets are constants)."""
    okb = (pg >= 0) & (pg < num_blocks)
    base = k_head + gl.where(okb, pg, 0).to(gl.int64) * stride_kb + (n0 % PAGE) * stride_kt
    ra = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD_A))
    ok_a = (n0 + ra < end) & (n0 + ra >= lo) & okb
    cols_a = gl.arange(0, DA, layout=gl.SliceLayout(0, LD_A))
    cp.async_copy_global_to_shared(ka_buf, base + (ra * stride_kt)[:, None] + cols_a[None, :],
                                   mask=ok_a[:, None])  # fmt: skip
    rt = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD_T))
    ok_t = (n0 + rt < end) & (n0 + rt >= lo) & okb
    cols_t = DA + gl.arange(0, DT, layout=gl.SliceLayout(0, LD_T))
    cp.async_copy_global_to_shared(kt_buf, base + (rt * stride_kt)[:, None] + cols_t[None, :],
                                   mask=ok_t[:, None])  # fmt: skip
    cp.commit_group()


@gluon.jit(do_not_specialize=_DYNAMIC)
def mla_decode_hopper(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_ptr, o_ptr, lse_ptr, ks_ptr, vs_ptr, out_ptr, sem_ptr,
    qk_scale, k_scale, v_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_btb,
    stride_ob, stride_ot, stride_oh, stride_os, stride_lb, stride_lt, stride_lh,
    stride_fb, stride_ft, stride_fh, num_blocks, max_pages, tokens_per_split, group, n_tok, window,
    PAGE: gl.constexpr, HEAD_TILES: gl.constexpr, DV_TILES: gl.constexpr,
    DA: gl.constexpr, DT: gl.constexpr, DV: gl.constexpr,
    BLOCK_DA: gl.constexpr, BLOCK_DT: gl.constexpr, BLOCK_DV: gl.constexpr,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, V_SHARED: gl.constexpr,
    DIRECT: gl.constexpr, K_SCALE_PTR: gl.constexpr, V_SCALE_PTR: gl.constexpr,
    CAUSAL: gl.constexpr, WINDOW: gl.constexpr, PRECISION: gl.constexpr,
    UPCAST: gl.constexpr, FUSED: gl.constexpr, NUM_STAGES: gl.constexpr, DUP_S: gl.constexpr,
    KV8: gl.constexpr, PV_OVERLAP: gl.constexpr,
    ONE_ID: gl.constexpr, PV_WAIT: gl.constexpr, P_SMEM: gl.constexpr, LAZY_L: gl.constexpr,
):  # fmt: skip
    """One program: 64 query rows x one split. Schedule options
    (bench/decode_mla_sweep.py times them):
    ONE_ID: one scalar block id per tile (needs PAGE % BLOCK_N == 0), fewer registers;
    PV_WAIT: P V retires at the end of its own iteration (no wgmma in flight over the
    loop's back edge: without dup scores ptxas then keeps the wgmma pipelined, C7515);
    P_SMEM: P reaches the P V MMA through shared memory (needs PV_WAIT);
    LAZY_L: row sums kept per element, reduced once after the walk."""
    gl.static_assert(BLOCK_H == 64)
    gl.static_assert(not FUSED)  # several splits: the portable stage 2 merges them
    gl.static_assert(not ONE_ID or PAGE % BLOCK_N == 0)  # one block holds each tile
    gl.static_assert(DA == DV)
    # -- layouts (8 warps: two warpgroups) --
    if DUP_S:  # both warpgroups compute all of S: row reductions stay inside a warp
        S_L: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, BLOCK_N, 16]
        )
    else:  # each warpgroup scores half of the keys (no duplicated MMA work)
        S_L: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16]
        )
    O_L: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, DV // 2, 16]
    )
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    if KV8:  # 16 fp8 elements = one 16-byte cp.async
        LD_A: gl.constexpr = gl.BlockedLayout([1, 16], [1, 32], [8, 1], [1, 0])
        LD_T: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [8, 1], [1, 0])
        SH8: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    else:
        LD_A: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])
        LD_T: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    SH: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
    COL_S: gl.constexpr = gl.SliceLayout(0, S_L)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
    cdt: gl.constexpr = q_ptr.dtype.element_ty

    pid_h = gl.program_id(0)
    b = gl.program_id(1).to(gl.int64)
    split = gl.program_id(2).to(gl.int64)
    kvh = (pid_h // HEAD_TILES).to(gl.int64)
    r0 = (pid_h % HEAD_TILES) * BLOCK_H
    n_rows = n_tok * group

    seq_len = gl.load(seq_ptr + b).to(gl.int64)
    cap = max_pages.to(gl.int64) * PAGE
    seq_len = gl.minimum(gl.maximum(seq_len, 0), cap)
    hi = seq_len
    if CAUSAL:  # the tile's last token sees up to its position
        t_hi = (gl.minimum(r0 + BLOCK_H, n_rows) - 1) // group
        hi = gl.maximum(gl.minimum(seq_len - n_tok + t_hi + 1, seq_len), 0)
    lo = hi * 0
    if WINDOW:  # the tile's first token sees from pos - window + 1
        lo = gl.maximum(seq_len - n_tok + r0 // group - window + 1, 0)
    start = (lo // BLOCK_N) * BLOCK_N + split * tokens_per_split
    end = gl.minimum(start + tokens_per_split, hi)
    n_iter = gl.maximum(gl.cdiv(end - start, BLOCK_N), 0).to(gl.int32)

    # -- Q tile -> shared memory (once) --
    rows_l = r0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LD_A))
    q_rows = (q_ptr + b * stride_qb + (rows_l // group).to(gl.int64) * stride_qt
              + (kvh * group + (rows_l % group).to(gl.int64)) * stride_qh)  # fmt: skip
    ok_l = rows_l < n_rows
    cols_a = gl.arange(0, DA, layout=gl.SliceLayout(0, LD_A))
    q_a = gl.load(q_rows[:, None] + cols_a[None, :], mask=ok_l[:, None], other=0.0)
    qa_smem = gl.allocate_shared_memory(cdt, [BLOCK_H, DA], SH, q_a)
    rows_t = r0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LD_T))
    q_rows_t = (q_ptr + b * stride_qb + (rows_t // group).to(gl.int64) * stride_qt
                + (kvh * group + (rows_t % group).to(gl.int64)) * stride_qh)  # fmt: skip
    cols_t = DA + gl.arange(0, DT, layout=gl.SliceLayout(0, LD_T))
    q_t = gl.load(q_rows_t[:, None] + cols_t[None, :], mask=(rows_t < n_rows)[:, None], other=0.0)
    qt_smem = gl.allocate_shared_memory(cdt, [BLOCK_H, DT], SH, q_t)

    if KV8:  # fp8 pages land in the ring, then are widened into a double-buffered tile
        kdt: gl.constexpr = k_ptr.dtype.element_ty
        ka_ring = gl.allocate_shared_memory(kdt, [NUM_STAGES, BLOCK_N, DA], SH8)
        kt_ring = gl.allocate_shared_memory(kdt, [NUM_STAGES, BLOCK_N, DT], SH8)
        kb_a = gl.allocate_shared_memory(cdt, [2, BLOCK_N, DA], SH)
        kb_t = gl.allocate_shared_memory(cdt, [2, BLOCK_N, DT], SH)
    else:
        ka_ring = gl.allocate_shared_memory(cdt, [NUM_STAGES, BLOCK_N, DA], SH)
        kt_ring = gl.allocate_shared_memory(cdt, [NUM_STAGES, BLOCK_N, DT], SH)
    k_head = k_ptr  # one latent head (kvh == 0): no head stride in the copy addresses
    bt_row = bt_ptr + b * stride_btb
    SL_A: gl.constexpr = gl.SliceLayout(1, LD_A)
    SL_T: gl.constexpr = gl.SliceLayout(1, LD_T)
    for s in gl.static_range(NUM_STAGES - 1):  # prologue: the first tiles in flight
        n_s = start + s * BLOCK_N
        if ONE_ID:
            _issue_tile1(ka_ring.index(s), kt_ring.index(s), k_head,
                         _tile_id(bt_row, n_s, end, PAGE), n_s, lo, end, num_blocks, stride_kb,
                         stride_kt, PAGE, DA, DT, BLOCK_N, LD_A, LD_T)  # fmt: skip
        else:
            _issue_tile(ka_ring.index(s), kt_ring.index(s), k_head,
                        _load_ids(bt_row, n_s, lo, end, PAGE, BLOCK_N, SL_A),
                        _load_ids(bt_row, n_s, lo, end, PAGE, BLOCK_N, SL_T), n_s, num_blocks,
                        stride_kb, stride_kt, PAGE, DA, DT, BLOCK_N, LD_A, LD_T)  # fmt: skip
    # block ids of the next tile to fetch, loaded one iteration ahead of their use
    n_s = start + (NUM_STAGES - 1) * BLOCK_N
    if ONE_ID:
        ids_a = _tile_id(bt_row, n_s, end, PAGE)
        ids_t = ids_a
    else:
        ids_a = _load_ids(bt_row, n_s, lo, end, PAGE, BLOCK_N, SL_A)
        ids_t = _load_ids(bt_row, n_s, lo, end, PAGE, BLOCK_N, SL_T)

    if K_SCALE_PTR:  # noqa: SIM108
        qk_scale = qk_scale * gl.load(ks_ptr).to(gl.float32)
    else:
        qk_scale = qk_scale * k_scale

    rows_s = r0 + gl.arange(0, BLOCK_H, layout=ROW_S)
    pos = seq_len - n_tok + (rows_s // group).to(gl.int64)  # each row's own position
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW_S)
    l_i = gl.full([BLOCK_H], 0.0, gl.float32, ROW_S)
    if PV_WAIT:  # retired in its own iteration: a plain tensor
        acc = gl.zeros([BLOCK_H, DV], gl.float32, O_L)
    else:
        acc = warpgroup_mma_init(gl.zeros([BLOCK_H, DV], gl.float32, O_L))  # an async accumulator
    s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_L)
    if LAZY_L:
        l_2d = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_L)
    if P_SMEM:
        gl.static_assert(PV_WAIT)  # P of tile i is overwritten after every P V of i-1 retired
        if BLOCK_N >= 64:
            SH_P: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                      rank=2)  # fmt: skip
        else:
            SH_P: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=BLOCK_N * 2,
                                                      element_bitwidth=16, rank=2)  # fmt: skip
        p_smem = gl.allocate_shared_memory(cdt, [BLOCK_H, BLOCK_N], SH_P)
    for i in range(n_iter):
        slot = i % NUM_STAGES
        n0 = start + i * BLOCK_N
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=COL_S)
        seen = (offs_n < end) & (offs_n >= lo)
        if (DUP_S or ONE_ID) and PAGE % BLOCK_N == 0:  # the tile lies in one block: one id
            pg1 = gl.load(bt_row + n0 // PAGE)
            seen = seen & (pg1 >= 0) & (pg1 < num_blocks)
        else:
            pg = gl.load(bt_row + offs_n // PAGE, mask=seen, other=-1)
            seen = seen & (pg >= 0) & (pg < num_blocks)
        cp.wait_group(NUM_STAGES - 2)  # tile i has landed (this thread's copies)
        fence_async_shared()
        _cta_barrier()  # ... and every thread's
        if KV8:  # widen to q's dtype (the scales are folded into qk_scale and v_scale);
            # buffer i % 2 was last read by P V of tile i-2, retired in iteration i-1
            ka = kb_a.index(i % 2)
            kt = kb_t.index(i % 2)
            ka.store(ka_ring.index(slot).load(LD_A).to(cdt))
            kt.store(kt_ring.index(slot).load(LD_T).to(cdt))
            fence_async_shared()  # generic-proxy stores, read next by wgmma
            _cta_barrier()
        else:
            ka = ka_ring.index(slot)
            kt = kt_ring.index(slot)
        if not PV_OVERLAP and not PV_WAIT:  # P V of tile i-1 retires before the scores'
            # MMAs are issued: one in flight across them makes ptxas serialise every wgmma (C7514)
            acc = warpgroup_mma_wait(0, deps=(acc,))
        s_tok = warpgroup_mma(qa_smem, ka.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(qt_smem, kt.permute((1, 0)), s_tok, is_async=True)
        # groups in flight: (PV_OVERLAP: P V of tile i-1, then) the two Q K^T of tile i;
        # once P V retires, tile i-1's slot is free: fetch tile i + NUM_STAGES - 1 into it
        # while the scores are still being computed
        if PV_OVERLAP and not PV_WAIT:
            acc = warpgroup_mma_wait(2, deps=(acc,))
        nxt = i + NUM_STAGES - 1
        if ONE_ID:
            _issue_tile1(ka_ring.index(nxt % NUM_STAGES), kt_ring.index(nxt % NUM_STAGES), k_head,
                         ids_a, start + nxt * BLOCK_N, lo, end, num_blocks, stride_kb, stride_kt,
                         PAGE, DA, DT, BLOCK_N, LD_A, LD_T)  # fmt: skip
            ids_a = _tile_id(bt_row, start + (nxt + 1) * BLOCK_N, end, PAGE)
        else:
            _issue_tile(ka_ring.index(nxt % NUM_STAGES), kt_ring.index(nxt % NUM_STAGES), k_head,
                        ids_a, ids_t, start + nxt * BLOCK_N, num_blocks, stride_kb, stride_kt,
                        PAGE, DA, DT, BLOCK_N, LD_A, LD_T)  # fmt: skip
            ids_a = _load_ids(bt_row, start + (nxt + 1) * BLOCK_N, lo, end, PAGE, BLOCK_N, SL_A)
            ids_t = _load_ids(bt_row, start + (nxt + 1) * BLOCK_N, lo, end, PAGE, BLOCK_N, SL_T)
        qk = warpgroup_mma_wait(0, deps=(s_tok,))
        ok = gl.expand_dims(seen, 0)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= pos[:, None])
        if WINDOW:
            ok = ok & (offs_n[None, :] > pos[:, None] - window)
        qk = gl.where(ok, qk * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        if LAZY_L:
            l_2d = l_2d * alpha[:, None] + p
        else:
            l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
        if P_SMEM:
            p_smem.store(p.to(cdt))
            fence_async_shared()
            _cta_barrier()
            acc = warpgroup_mma(p_smem, ka, acc, is_async=True)
        else:
            p_op = gl.convert_layout(p.to(cdt), P_L)
            acc = warpgroup_mma(p_op, ka, acc, is_async=True)
        if PV_WAIT:
            acc = warpgroup_mma_wait(0, deps=(acc,))
    if not PV_WAIT:
        acc = warpgroup_mma_wait(0, deps=(acc,))
    cp.wait_group(0)
    if LAZY_L:
        l_i = gl.sum(l_2d, 1)

    if V_SCALE_PTR:  # noqa: SIM108
        vs = gl.load(vs_ptr).to(gl.float32)
    else:
        vs = v_scale
    has = l_i > 0.0
    l_safe = gl.where(has, l_i, 1.0)
    o = acc * gl.convert_layout(vs / l_safe, ROW_O)[:, None]
    rows_o = r0 + gl.arange(0, BLOCK_H, layout=ROW_O)
    tok_o = (rows_o // group).to(gl.int64)
    heads_o = kvh * group + (rows_o % group).to(gl.int64)
    o_rows = o_ptr + b * stride_ob + tok_o * stride_ot + heads_o * stride_oh
    offs_dv = gl.arange(0, DV, layout=gl.SliceLayout(0, O_L))
    o_ptrs = o_rows[:, None] + offs_dv[None, :]
    o_mask = (rows_o < n_rows)[:, None]
    if DIRECT:
        gl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=o_mask)
    else:
        gl.store(o_ptrs + split * stride_os, o, mask=o_mask)
        lse = gl.where(has, m_i + gl.log2(l_safe), float("-inf"))
        tok_s = (rows_s // group).to(gl.int64)
        heads_s = kvh * group + (rows_s % group).to(gl.int64)
        l_ptrs = lse_ptr + b * stride_lb + tok_s * stride_lt + heads_s * stride_lh + split
        gl.store(l_ptrs, lse, mask=rows_s < n_rows)

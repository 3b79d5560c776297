"""Launching the Triton paged decode: grid, split-K workspace, kernel arguments.

``triton_paged_decode`` takes the views exactly as given and passes their data
pointers and strides to the kernels: the cache is never copied. The only
scratch memory is the split-K workspace, ``B * T * Hq * splits * (Dv + 1)`` fp32 (one
tensor), and only when the plan has more than one split (otherwise stage 1 writes
``out`` and stage 2 is not launched). The portable kernel merges its splits itself
(``FUSED``: one launch): the last split of a row tile to finish reduces, counted on
int32 counters that the kernel leaves at zero. Workspace and counters are kept per
(device, stream) and reused by the next launch on that stream, so calls on different
streams never share them (during CUDA graph capture: fresh ones, the counters' memset
captured).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import triton
from kvbridge.kernels.checks import DecodeProblem, PagedDecodeError, scale_operand
from kvbridge.kernels.triton_config import (
    MAX_SPLITS,
    TritonConfig,
    ctas_per_sm,
    default_config,
    gluon_mla_config,
    num_sms,
    pick_splits,
)
from kvbridge.kernels.triton_fastlaunch import launch
from kvbridge.kernels.triton_kernels import paged_decode_stage1, paged_decode_stage2

LOG2E = 1.4426950408889634
MAX_DV = 512
MAX_TAIL = 128
LAST_LAUNCH: dict = {}  # the last stage-1 compiled kernel and grid (for benchmarks)
_OCCUPANCY: dict[tuple, int | None] = {}  # resident programs per SM, by kernel variant
_PLANS: dict[tuple, LaunchPlan] = {}  # (problem, config, device) -> plan
_SCRATCH: dict[tuple, dict] = {}  # (device index, raw stream) -> workspace, counters, views
MAX_KEPT_WS = 16 * 2**20  # fp32 elements of split-K workspace kept per stream (64 MiB)


def is_interpreted() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(paged_decode_stage1, InterpretedFunction)


def support_error(p: DecodeProblem) -> str | None:
    """Why the Triton kernel cannot run ``p``, or None when it can."""
    dqk, dv = p.head_dim_qk, p.head_dim_v
    ok = dv % 8 == 0 and dqk % 8 == 0 and 16 <= dv <= MAX_DV and dv <= dqk <= dv + MAX_TAIL
    if ok:
        return None
    return (
        f"the Triton backend supports head_dim_v a multiple of 8 in [16, {MAX_DV}] and "
        f"head_dim_qk a multiple of 8 in [head_dim_v, head_dim_v + {MAX_TAIL}] (e.g. 64, 80, "
        f"96, 128, 256, and MLA 576/512); got head_dim_qk={dqk}, head_dim_v={dv}; use "
        "backend='torch'"
    )


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about a launch that depends only on the problem and the config."""

    grid: tuple[int, int, int]
    stage1: object  # the Gluon Hopper MLA kernel, or None: the portable stage 1
    splits: int
    per_split: int
    variant: tuple  # occupancy key without the DIRECT flag
    meta: dict = field(hash=False, compare=False)  # stage-1 constexprs
    stage2: dict = field(hash=False, compare=False)  # stage-2 constexprs
    kernels: dict = field(default_factory=dict, hash=False, compare=False)  # fast launches
    static: dict | None = field(default=None, hash=False, compare=False)  # see _static


def _static(p: DecodeProblem, plan: LaunchPlan) -> dict:
    """What every launch of ``plan`` passes unchanged (built once, on the first call)."""
    b, t, h, dv, s = p.batch, p.tokens, p.num_q_heads, p.head_dim_v, plan.splits
    consts = {
        (kp, vp): {**plan.meta, "K_SCALE_PTR": kp, "V_SCALE_PTR": vp}
        for kp in (False, True)
        for vp in (False, True)
    }
    return dict(
        direct=plan.meta["DIRECT"],
        po_numel=b * t * h * s * dv,
        ws_numel=b * t * h * s * (dv + 1),  # partial outputs, then their log-sum-exps
        s_po=(t * h * s * dv, h * s * dv, s * dv, dv),
        s_lse=(t * h * s, h * s, s),
        qk_scale=p.scale * LOG2E,
        ints=(p.num_blocks, p.max_pages, plan.per_split, p.group, p.tokens, p.window),
        consts=consts,
        grid2=(t * h, b),
        occupancy_known=False,
        fused=plan.meta["FUSED"] and not plan.meta["DIRECT"],
        counters=plan.grid[0] * plan.grid[1],  # one per (row tile program, sequence)
        dev=_device_index(plan),
    )


def _plan(p: DecodeProblem, cfg: TritonConfig, device: torch.device) -> tuple[LaunchPlan, bool]:
    """The launch plan and whether it may be cached (its split count is final)."""
    dqk, dv = p.head_dim_qk, p.head_dim_v
    block_dv = max(16, triton.next_power_of_2(math.ceil(dv / max(1, int(cfg.dv_tiles)))))
    dv_tiles = math.ceil(dv / block_dv)
    shared = p.v_shares_k and dv_tiles == 1  # V is K[..., :dv]: read the latent once
    da, dt = (dv, dqk - dv) if dqk > dv else (dqk, 0)
    head_tiles = math.ceil(p.group * p.tokens / cfg.block_h)
    programs = p.num_kv_heads * head_tiles * p.batch * dv_tiles
    variant = (device, dataclasses.replace(cfg, num_splits=None), da, dt, dv, p.block_size)
    variant += (p.q_dtype, p.kv_dtype, shared, p.tokens > 1, p.window > 0)
    final = True
    if cfg.num_splits is not None:
        splits = max(1, min(int(cfg.num_splits), MAX_SPLITS))
    else:
        occ = (_OCCUPANCY.get((*variant, True)), _OCCUPANCY.get((*variant, False)))
        if cfg.kernel == "gluon":
            occ = (1, 1)  # ~220 KiB of shared memory per program: one per SM
        # final once a launch of this variant told its occupancy (the other: guessed)
        final = device.type != "cuda" or occ != (None, None)
        sms = num_sms(device.index or 0) if device.type == "cuda" else 4
        splits = pick_splits(p, programs, sms, cfg.block_n, occ)
    # keys one tile may walk: the table's capacity, or its window (+ block_n: the
    # walk starts at the window's first key rounded down to a block_n multiple)
    span = max(p.key_span() + (cfg.block_n - 1 if p.window else 0), 1)
    per_split = math.ceil(max(cfg.block_n, math.ceil(span / splits)) / cfg.block_n) * cfg.block_n
    splits = max(1, math.ceil(span / per_split))
    meta = dict(
        PAGE=p.block_size,
        HEAD_TILES=head_tiles,
        DV_TILES=dv_tiles,
        DA=da,
        DT=dt,
        DV=dv,
        BLOCK_DA=max(16, triton.next_power_of_2(da)),
        BLOCK_DT=max(16, triton.next_power_of_2(dt)) if dt else 16,
        BLOCK_DV=block_dv,
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        V_SHARED=shared,
        DIRECT=splits == 1,
        CAUSAL=p.tokens > 1,
        WINDOW=p.window > 0,
        PRECISION="ieee" if p.q_dtype == torch.float32 else "tf32",
        UPCAST=is_interpreted(),
        FUSED=cfg.fuse_reduce and cfg.kernel != "gluon" and splits > 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    stage1 = None  # the portable kernel (looked up at launch)
    if cfg.kernel == "gluon":
        from kvbridge.kernels import gluon_mla

        stage1 = gluon_mla.mla_decode_hopper
        meta.update(NUM_STAGES=cfg.num_stages, DUP_S=cfg.dup_scores, num_stages=1,
                    KV8=p.kv_dtype == torch.float8_e4m3fn, PV_OVERLAP=cfg.pv_overlap,
                    ONE_ID=cfg.one_id and p.block_size % cfg.block_n == 0,
                    PV_WAIT=cfg.pv_wait or cfg.p_smem, P_SMEM=cfg.p_smem,
                    LAZY_L=cfg.lazy_l)  # fmt: skip
    stage2 = dict(
        DV=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4,
    )  # fmt: skip
    grid = (p.num_kv_heads * head_tiles * dv_tiles, p.batch, splits)
    return LaunchPlan(grid, stage1, splits, per_split, variant, meta, stage2), final


def _device_index(plan: LaunchPlan) -> int:
    dev = plan.variant[0]
    return (dev.index or 0) if dev.type == "cuda" else 0


def _scratch(st: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split-K workspace (partial outputs, their log-sum-exps) and zeroed int32
    counters of one launch. On CUDA they are kept per (device, current stream) and
    reused by the next launch on that stream (stream order: it starts after this one
    ends; the kernel leaves the counters at zero); fresh during CUDA graph capture (the
    counters' memset is captured), on the CPU (interpreter) and for workspaces over
    ``MAX_KEPT_WS`` elements."""
    n_ws, n_po = st["ws_numel"], st["po_numel"]
    n_sem = st["counters"] if st["fused"] else 1
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        po = torch.empty(n_ws, dtype=torch.float32, device=device)
        return po, po[n_po:], torch.zeros(n_sem, dtype=torch.int32, device=device)
    idx = device.index or 0
    key = (idx, torch._C._cuda_getCurrentRawStream(idx))
    kept = _SCRATCH.get(key)
    if kept is None:
        kept = _SCRATCH[key] = dict(ws=None, sem=None, views={})
    views = kept["views"].get((n_ws, n_po, n_sem))
    if views is not None:
        return views
    if kept["sem"] is None or kept["sem"].numel() < n_sem:
        kept["sem"] = torch.zeros(max(n_sem, 4096), dtype=torch.int32, device=device)
        kept["views"].clear()
    if n_ws > MAX_KEPT_WS:
        po = torch.empty(n_ws, dtype=torch.float32, device=device)
        return po, po[n_po:], kept["sem"]
    if kept["ws"] is None or kept["ws"].numel() < n_ws:
        kept["ws"] = torch.empty(max(n_ws, 2**16), dtype=torch.float32, device=device)
        kept["views"].clear()
    ws = kept["ws"]
    views = kept["views"][(n_ws, n_po, n_sem)] = (ws, ws[n_po:], kept["sem"])
    return views


def triton_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    p: DecodeProblem,
    k_scale: object,
    v_scale: object,
    out: torch.Tensor,
    config: TritonConfig | None = None,
) -> torch.Tensor:
    """Run the kernel(s) into ``out`` ((B, [T,] Hq, Dv)); return ``out``."""
    key = (p, config, q.device)
    plan = _PLANS.get(key)
    if plan is None:
        err = support_error(p)
        if err:
            raise PagedDecodeError(err)
        if p.batch == 0:
            return out
        cfg = config or default_config(p)
        if cfg.block_h < 16 or cfg.block_n < 16:
            raise PagedDecodeError("TritonConfig.block_h and block_n must be >= 16 (tl.dot)")
        plan, final = _plan(p, cfg, q.device)
        if final:
            if len(_PLANS) > 4096:
                _PLANS.clear()
            _PLANS[key] = plan
    if k_scale is None and v_scale is None:  # the common case, without the calls below
        ks = vs = 1.0
        ks_ptr = vs_ptr = False
    else:
        ks, vs = scale_operand(k_scale, q.device), scale_operand(v_scale, q.device)
        ks_ptr, vs_ptr = isinstance(ks, torch.Tensor), isinstance(vs, torch.Tensor)  # read there
    st = plan.static
    if st is None:
        st = _static(p, plan)
        object.__setattr__(plan, "static", st)  # a frozen dataclass's lazy field
    o_st = out.stride()
    o_st = (o_st[0], o_st[1], o_st[2]) if p.multi else (o_st[0], 0, o_st[1])
    if st["direct"]:
        po = lse = sem = out  # lse and the counters unused
        s_po, s_lse = (*o_st, 0), (0, 0, 0)
    else:
        po, lse, sem = _scratch(st, q.device)
        s_po, s_lse = st["s_po"], st["s_lse"]
    qst = q.stride()
    args = (
        q, k_cache, v_cache, block_table, seq_lens, po, lse,
        ks if ks_ptr else q, vs if vs_ptr else q, out, sem,
        st["qk_scale"], 1.0 if ks_ptr else ks, 1.0 if vs_ptr else vs,
        *(qst[:3] if p.multi else (qst[0], 0, qst[1])),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        *s_po, *s_lse, *o_st, *st["ints"],
    )  # fmt: skip
    consts = st["consts"][(ks_ptr, vs_ptr)]
    dev = st["dev"]
    kernel = launch(plan.stage1 or paged_decode_stage1, plan.kernels, plan.grid, args, consts, dev)
    if not st["occupancy_known"]:
        occ_key = (*plan.variant, st["direct"])
        if occ_key not in _OCCUPANCY:
            _OCCUPANCY[occ_key] = ctas_per_sm(kernel, plan.meta["num_warps"])
        st["occupancy_known"] = True
    LAST_LAUNCH.update(stage1=kernel, grid=plan.grid, splits=plan.splits)
    if not st["direct"] and not st["fused"]:
        args2 = (po, lse, out, *s_po, *s_lse, *o_st, plan.splits, p.num_q_heads)
        launch(paged_decode_stage2, plan.kernels, st["grid2"], args2, plan.stage2, dev)
    return out


def gluon_mla_support_error(p: DecodeProblem, device: torch.device) -> str | None:
    """Why the Hopper MLA kernel (``gluon_mla.py``) cannot run ``p``, or None."""
    ok_shape = p.num_kv_heads == 1 and p.head_dim_v == 512 and p.head_dim_qk == 576 and p.v_shares_k
    if not ok_shape:
        return (
            "the Hopper MLA kernel needs the MLA shape (one latent head, head_dim_qk 576, "
            "V = its first 512 columns); use backend='triton'"
        )
    if p.q_dtype not in (torch.bfloat16, torch.float16) or p.kv_dtype not in (
        p.q_dtype,
        torch.float8_e4m3fn,
    ):
        return (
            "the Hopper MLA kernel needs a bf16 or fp16 q and a cache of the same dtype or "
            "float8_e4m3fn"
        )
    if device.type != "cuda" or is_interpreted():
        return "the Hopper MLA kernel needs a CUDA device (no interpreter)"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "the Hopper MLA kernel needs an sm_90 GPU (wgmma): H100/H200"
    try:
        from kvbridge.kernels import gluon_mla  # noqa: F401
    except ImportError as e:
        return f"the Hopper MLA kernel needs triton.experimental.gluon (triton >= 3.5): {e}"
    return None


def gluon_mla_paged_decode(q, k_cache, v_cache, block_table, seq_lens, p, k_scale, v_scale,
                           out, config: TritonConfig | None = None) -> torch.Tensor:  # fmt: skip
    """The Hopper MLA kernel; views whose cp.async rows are not 16-byte aligned (a cache
    stride or base not a multiple of 16 elements) take the portable kernel."""
    ks = k_cache.stride()
    if k_cache.data_ptr() & 15 or (ks[0] | ks[1]) & 15 or p.batch == 0:
        return triton_paged_decode(q, k_cache, v_cache, block_table, seq_lens, p, k_scale,
                                   v_scale, out)  # fmt: skip
    cfg = config or gluon_mla_config(p)
    return triton_paged_decode(q, k_cache, v_cache, block_table, seq_lens, p, k_scale, v_scale,
                               out, cfg)  # fmt: skip

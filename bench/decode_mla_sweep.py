"""GPU sweep of the Hopper MLA kernel (gluon-mla) on mla-b64-s4096, T = 1 (bf16, then fp8).

Run on the H200 from the repository root (``import kvbridge`` -> this checkout)::

    python3 bench/decode_mla_sweep.py     # --budget 120 (s), --only SUBSTR ..., --no-fp8

1. the bf16 matmul rate (8192^3, ``bench/decode.py: gemm_tflops``, as bench/decode_mla.py);
2. per variant (a ``TritonConfig`` of the Gluon kernel): a float64 check on a small
   NaN-poisoned case (``decode_truth.brute_force``; rows no query may see are NaN, table
   entries past each length -1), then the timed mla-b64-s4096 call (CUDA-event median
   of ``triton.testing.do_bench``, L2 flushed) and its error vs the torch backend;
3. a second timing pass over the variants that passed (reverse order), the matmul again,
   and a summary sorted by time. One line per variant, flushed as it goes; a variant
   that fails to compile or is wrong is reported and skipped; past ``--budget`` seconds
   the rest are skipped; a watchdog ends the process at budget + 90 s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import decode as bd  # noqa: E402  (maps kvbridge onto the checkout; tests/kernels on the path)
import torch  # noqa: E402
import triton  # noqa: E402
from decode_truth import TOLERANCE, brute_force, rel_err  # noqa: E402
from kvbridge.kernels import paged_decode  # noqa: E402
from kvbridge.kernels.checks import check_inputs  # noqa: E402
from kvbridge.kernels.triton_config import TritonConfig  # noqa: E402
from kvbridge.kernels.triton_launch import LAST_LAUNCH, gluon_mla_paged_decode  # noqa: E402

CASE = "mla-b64-s4096"
F8 = torch.float8_e4m3fn
DEV = "cuda"
T0 = time.time()

# name -> TritonConfig fields (block_n, num_stages, dup_scores, options); most informative
# first: the budget cuts the tail. dup = both warpgroups compute all of S; one_id = one
# block id per tile (no spills); pv_wait = P V retired in its own iteration (no dup: the
# wgmma stay pipelined, C7515 gone); p_smem = P via shared memory; lazy_l = row sums once.
BF16 = [
    ("64x2 dup (former default)", dict(block_n=64, num_stages=2, dup_scores=True)),
    ("64x2 dup one_id", dict(block_n=64, num_stages=2, dup_scores=True, one_id=True)),
    ("64x2 nodup one_id pv_wait", dict(block_n=64, num_stages=2, one_id=True, pv_wait=True)),
    ("64x2 nodup one_id p_smem lazy_l",
     dict(block_n=64, num_stages=2, one_id=True, p_smem=True, lazy_l=True)),
    ("64x2 dup one_id pv_wait",
     dict(block_n=64, num_stages=2, dup_scores=True, one_id=True, pv_wait=True)),
    ("64x2 nodup one_id p_smem", dict(block_n=64, num_stages=2, one_id=True, p_smem=True)),
    ("64x2 nodup one_id pv_wait lazy_l",
     dict(block_n=64, num_stages=2, one_id=True, pv_wait=True, lazy_l=True)),
    ("32x4 dup (README alt)", dict(block_n=32, num_stages=4, dup_scores=True)),
    ("32x4 dup one_id", dict(block_n=32, num_stages=4, dup_scores=True, one_id=True)),
    ("32x4 nodup one_id p_smem lazy_l",
     dict(block_n=32, num_stages=4, one_id=True, p_smem=True, lazy_l=True)),
    ("64x2 nodup pv_wait", dict(block_n=64, num_stages=2, pv_wait=True)),
    ("64x2 dup one_id p_smem", dict(block_n=64, num_stages=2, dup_scores=True, one_id=True,
                                    p_smem=True)),
    ("32x4 dup one_id pv_wait",
     dict(block_n=32, num_stages=4, dup_scores=True, one_id=True, pv_wait=True)),
    ("64x2 dup one_id splits=2",
     dict(block_n=64, num_stages=2, dup_scores=True, one_id=True, num_splits=2)),
    ("64x2 nodup one_id p_smem lazy_l splits=2",
     dict(block_n=64, num_stages=2, one_id=True, p_smem=True, lazy_l=True, num_splits=2)),
    ("32x3 dup one_id", dict(block_n=32, num_stages=3, dup_scores=True, one_id=True)),
    ("64x2 nodup (C7515)", dict(block_n=64, num_stages=2)),
]  # fmt: skip
FP8 = [
    ("fp8 32x4 dup (former default)", dict(block_n=32, num_stages=4, dup_scores=True)),
    ("fp8 32x4 dup one_id", dict(block_n=32, num_stages=4, dup_scores=True, one_id=True)),
    ("fp8 32x4 nodup one_id p_smem lazy_l",
     dict(block_n=32, num_stages=4, one_id=True, p_smem=True, lazy_l=True)),
    ("fp8 32x4 nodup one_id pv_wait", dict(block_n=32, num_stages=4, one_id=True, pv_wait=True)),
    ("fp8 32x4 dup one_id pv_wait",
     dict(block_n=32, num_stages=4, dup_scores=True, one_id=True, pv_wait=True)),
]  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def cfg_of(kw: dict) -> TritonConfig:
    return TritonConfig(block_h=64, num_warps=8, kernel="gluon", **kw)


def ms_of(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def small_case(kv: str):
    """6 sequences (lengths 1..1000, block 64): rows no query sees are NaN, table entries
    past each length -1; the float64 reference sees those rows as zeros."""
    b, hq, bs, pages = 6, 128, 64, 16
    seq_l = [1, 63, 64, 65, 300, 1000]
    n = b * pages + 5
    k = torch.randn(n, bs, 1, 576, dtype=torch.bfloat16, device=DEV)
    table = torch.randperm(n, device=DEV)[: b * pages].view(b, pages).to(torch.int32)
    seq = torch.tensor(seq_l, dtype=torch.int32, device=DEV)
    seen = torch.zeros(n, bs, dtype=torch.bool, device=DEV)
    pos = torch.arange(pages * bs, device=DEV)
    for i, s in enumerate(seq_l):
        ids = table[i, pos[:s] // bs].long()
        seen[ids, pos[:s] % bs] = True
        table[i, -(-s // bs) :] = -1  # never read
    k0 = torch.where(seen[..., None, None], k, torch.zeros((), dtype=k.dtype, device=DEV))
    k = k.masked_fill(~seen[..., None, None], float("nan"))
    ks = vs = None
    if kv == "fp8":
        k, k0, ks, vs = k.to(F8), k0.to(F8), 0.5, 0.5
    q = torch.randn(b, hq, 576, dtype=torch.bfloat16, device=DEV)
    ref = brute_force(q, k0, k0[..., :512], table.clamp(min=0), seq, None, ks, vs)
    return q, k, table, seq, ks, vs, ref


def big_case(kv: str):
    _, q, k, _, table, seq = bd.build(CASE, "mla", 1)
    k.normal_()
    ks = vs = None
    if kv == "fp8":
        k, ks, vs = k.to(F8), 0.5, 0.5
    ref = paged_decode(q, k, k[..., :512], table, seq, backend="torch", k_scale=ks, v_scale=vs)
    return q, k, table, seq, ks, vs, ref.float()


def stats() -> str:
    k = LAST_LAUNCH.get("stage1")
    name = str(getattr(k, "name", "?"))
    st = bd.kernel_stats()
    return (f"{name} regs={st['n_regs']} spills={st['n_spills']} smem={st['shared']} "
            f"splits={st['splits']}")  # fmt: skip


def run_variant(name, kw, small, big, flops, peak, results) -> None:
    cfg = cfg_of(kw)
    q, k, table, seq, ks, vs, ref = small
    v = k[..., :512]
    p = check_inputs(q, k, v, table, seq, None, ks, vs, None, None)
    out = torch.full((*q.shape[:-1], 512), float("nan"), dtype=q.dtype, device=DEV)
    ccfg = cfg_of({**kw, "num_splits": kw.get("num_splits") or 1})  # the timed kernel's split
    t = time.time()
    gluon_mla_paged_decode(q, k, v, table, seq, p, ks, vs, out, ccfg)
    torch.cuda.synchronize()
    t_first = time.time() - t
    kern = stats()
    if "mla_decode_hopper" not in kern:
        raise RuntimeError(f"not the Gluon kernel: {kern}")
    err = rel_err(out, ref)
    maxabs = float((out.double().cpu() - ref).abs().max()) if math.isfinite(err) else math.inf
    tol = TOLERANCE[torch.bfloat16] if k.dtype == F8 else TOLERANCE[q.dtype]
    if not err <= tol:
        log(f"{name:42s} WRONG small-case rel_err={err:.2e} max_abs={maxabs:.2e} ({kern})")
        return
    bq, bk, btable, bseq, bks, bvs, bref = big
    bv = bk[..., :512]
    bp = check_inputs(bq, bk, bv, btable, bseq, None, bks, bvs, None, None)
    bout = torch.empty((*bq.shape[:-1], 512), dtype=bq.dtype, device=DEV)

    def fn():
        return gluon_mla_paged_decode(bq, bk, bv, btable, bseq, bp, bks, bvs, bout, cfg)

    fn()
    torch.cuda.synchronize()
    kern = stats()
    berr = float((bout.float() - bref).norm() / bref.norm())
    bmax = float((bout.float() - bref).abs().max())
    if not berr <= 1e-2 or not math.isfinite(bmax):
        log(f"{name:42s} WRONG big-case rel_err={berr:.2e} max_abs={bmax:.2e} ({kern})")
        return
    ms = ms_of(fn)
    tf = flops / (ms * 1e-3) / 1e12
    results[name] = dict(fn=fn, ms=[ms], err=max(err, berr), maxabs=max(maxabs, bmax))
    log(f"{name:42s} {ms:7.4f} ms {tf:6.1f} TFLOP/s {tf / peak:6.1%} of matmul | small "
        f"rel {err:.1e} max {maxabs:.1e} | big rel {berr:.1e} max {bmax:.1e} | "
        f"first call {t_first:.1f}s | {kern}")  # fmt: skip


def sweep(kv: str, variants, flops, peak, results, budget: float, only) -> None:
    log(f"--- {CASE} T=1 {kv}: building cases and references")
    small = small_case(kv)
    big = big_case(kv)
    bq, bk, btable, bseq, bks, bvs, bref = big
    bout = torch.empty((*bq.shape[:-1], 512), dtype=bq.dtype, device=DEV)

    def auto():
        return paged_decode(bq, bk, bk[..., :512], btable, bseq, out=bout, k_scale=bks,
                            v_scale=bvs)  # fmt: skip

    try:
        auto()
        torch.cuda.synchronize()
        berr = float((bout.float() - bref).norm() / bref.norm())
        ms = ms_of(auto)
        tf = flops / (ms * 1e-3) / 1e12
        results[f"{kv} default (auto)"] = dict(fn=auto, ms=[ms], err=berr, maxabs=float("nan"))
        log(f"{kv + ' default (auto)':42s} {ms:7.4f} ms {tf:6.1f} TFLOP/s {tf / peak:6.1%} "
            f"of matmul | big rel {berr:.1e} | {stats()}")  # fmt: skip
    except Exception as e:
        log(f"{kv} default (auto) FAILED {type(e).__name__}: {str(e)[:300]}")
    for name, kw in variants:
        if only and not any(o in name for o in only):
            continue
        if time.time() - T0 > budget:
            log(f"{name:42s} skipped (budget of {budget:.0f}s spent)")
            continue
        try:
            run_variant(name, kw, small, big, flops, peak, results)
        except Exception as e:  # compile errors, OutOfResources
            msg = " ".join(str(e).split())[:300]
            log(f"{name:42s} FAILED {type(e).__name__}: {msg}")
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=120.0, help="seconds; later variants skip")
    ap.add_argument("--only", nargs="*", default=[], help="variant name substrings")
    ap.add_argument("--no-fp8", action="store_true")
    args = ap.parse_args()
    wd = threading.Timer(args.budget + 90, lambda: (log("watchdog: hung, exiting"),
                                                    os._exit(3)))  # fmt: skip
    wd.daemon = True
    wd.start()
    props = torch.cuda.get_device_properties(0)
    log(f"{props.name} sms={props.multi_processor_count} torch={torch.__version__} "
        f"triton={triton.__version__}")  # fmt: skip
    peak = bd.gemm_tflops(log)
    c = bd.CASES[CASE]
    flops = 2 * c["batch"] * c["hq"] * bd.visible(CASE, 1, None) * (576 + 512)
    results: dict = {}
    sweep("bf16", BF16, flops, peak, results, args.budget, args.only)
    if not args.no_fp8 and time.time() - T0 < args.budget:
        torch.cuda.empty_cache()
        sweep("fp8", FP8, flops, peak, results, args.budget, args.only)
    log("--- second timing pass (reverse order)")
    for name in reversed(list(results)):
        try:
            results[name]["ms"].append(ms_of(results[name]["fn"]))
        except Exception as e:
            log(f"{name}: second pass failed: {type(e).__name__}: {str(e)[:200]}")
    peak2 = bd.gemm_tflops(log)
    ref = peak  # the first matmul, as bench/decode_mla.py reports
    base = results.get("bf16 default (auto)", {}).get("ms")
    log(f"--- summary: best of 2 passes; % of the first matmul rate {ref:.0f} TFLOP/s "
        f"(after: {peak2:.0f})")  # fmt: skip
    for name, r in sorted(results.items(), key=lambda kv: min(kv[1]["ms"])):
        ms = min(r["ms"])
        tf = flops / (ms * 1e-3) / 1e12
        sp = f" {min(base) / ms:5.3f}x auto" if base else ""
        passes = "/".join(f"{x:.4f}" for x in r["ms"])
        print(f"{name:42s} {ms:7.4f} ms ({passes}) {tf:6.1f} TFLOP/s {tf / ref:6.1%} "
              f"of matmul{sp} err {r['err']:.1e}", flush=True)  # fmt: skip
    log("done")


if __name__ == "__main__":
    main()

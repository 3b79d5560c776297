"""GPU benchmark of kvbridge.kernels.paged_decode (issue 4).

Run on a CUDA machine from the repository root::

    python bench/decode.py --out bench/results

1. checks correctness on the GPU (bench/decode_gpu_checks.py: layout/dtype matrix and
   multi-token/window cases vs a float64 brute force, int64 addressing on a
   > 2**31-element view, no-copy probe);
2. measures the copy limit (device-to-device copy of a 2 GiB buffer, bytes read +
   written), the bf16 matmul rate, the host time of one call beside SDPA's
   (bench/decode_host.py) and, for each row (case, layout, T query tokens, window),
   the Triton kernel (library defaults), a sweep of tile/split configs (MLA), and the
   baseline (FlexAttention paged path on NHD, SDPA over the gathered cache on every
   layout; T = 1 rows without a window) in the same run; times are CUDA-event
   medians (``triton.testing.do_bench``, warmed up, L2 flushed, inputs > L2);
3. writes ``decode_<gpu>.json`` (rows: case, layout, t, window, ms, gbps, copy_gbps,
   fraction, baseline_ms, ...), ``decode_<gpu>_sweep.json`` and ``decode_<gpu>.png``.

Achieved bandwidth = bytes the kernel must move (the KV each query can see read once,
q, out) / time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "kernels"))
sys.path.insert(0, str(ROOT / "bench"))


def _ensure_kvbridge() -> None:
    """Map kvbridge.kernels / kvbridge.topology.layouts onto the checkout when the
    package is not installed (the GPU machine runs from a bare copy of the tree)."""
    try:
        import kvbridge.kernels
        import kvbridge.topology.layouts  # noqa: F401
    except ImportError:
        top = types.ModuleType("kvbridge")
        top.__path__ = []
        sys.modules["kvbridge"] = top
        topo = types.ModuleType("kvbridge.topology")
        topo.__path__ = [str(ROOT / "topology")]  # its __init__ (msgspec) is not needed here
        sys.modules["kvbridge.topology"] = topo
        spec = importlib.util.spec_from_file_location(
            "kvbridge.kernels",
            ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")],
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["kvbridge.kernels"] = mod
        spec.loader.exec_module(mod)


_ensure_kvbridge()

import torch  # noqa: E402
import triton  # noqa: E402
from decode_baselines import flex_paged, sdpa_gather  # noqa: E402
from decode_gpu_checks import check_int64, check_matrix, check_multi, check_no_copy  # noqa: E402
from decode_host import measure as measure_host  # noqa: E402
from kvbridge.kernels import paged_decode  # noqa: E402
from kvbridge.kernels.checks import check_inputs  # noqa: E402
from kvbridge.kernels.triton_launch import (  # noqa: E402
    LAST_LAUNCH,
    TritonConfig,
    triton_paged_decode,
)
from kvbridge.topology.layouts import allocate  # noqa: E402
from tqdm import tqdm  # noqa: E402

CASES = {
    "gqa-b64-s4096": dict(batch=64, seq=4096, hq=32, hkv=8, d=128, bs=16),
    "gqa-b8-s32k": dict(batch=8, seq=32768, hq=32, hkv=8, d=128, bs=16),
    "gqa-b128-s512": dict(batch=128, seq=512, hq=32, hkv=8, d=128, bs=16),
    "mla-b64-s4096": dict(batch=64, seq=4096, hq=128, hkv=1, d=576, bs=64),
}
GQA_LAYOUTS = ("nhd", "hnd", "packed", "interleaved")
# (case, layout, T query tokens, window); T = 1 rows of every layout come first
EXTRA_ROWS = [
    *[("gqa-b64-s4096", "nhd", t, None) for t in (2, 4, 8)],
    ("gqa-b64-s4096", "packed", 4, None),
    ("gqa-b64-s4096", "nhd", 1, 1024),
    ("gqa-b64-s4096", "nhd", 4, 1024),
    ("gqa-b8-s32k", "nhd", 1, 4096),
    ("gqa-b8-s32k", "nhd", 4, 4096),
    ("mla-b64-s4096", "mla", 2, None),
    ("mla-b64-s4096", "mla", 4, None),
    ("mla-b64-s4096", "mla", 1, 1024),
]


# (block_n, block_h, dv_tiles, splits, warps, stages); splits None = library heuristic
GQA_SWEEP = [
    (32, 16, 1, None, 4, 3),
    (32, 16, 1, None, 4, 2),
    (64, 16, 1, None, 4, 2),
    (64, 16, 1, None, 4, 3),
    (128, 16, 1, None, 4, 2),
]
MLA_SWEEP = [
    (32, 64, 1, None, 8, 2),
    (32, 64, 1, None, 8, 3),
    (64, 64, 1, None, 8, 2),
    (64, 64, 1, 2, 8, 2),
    (64, 64, 1, None, 8, 3),
    (128, 64, 1, None, 8, 1),
    (64, 64, 2, None, 8, 2),
]
T8_SWEEP = [
    (32, 32, 1, None, 4, 3),
    (32, 32, 1, None, 8, 3),
    (64, 32, 1, None, 8, 2),
    (32, 16, 1, None, 4, 3),
]
WINDOW_SWEEP = [
    (32, 16, 1, 8, 4, 3),
    (32, 16, 1, 16, 4, 3),
    (32, 16, 1, 32, 4, 3),
    (64, 16, 1, 16, 4, 3),
]
SWEEPS = {  # rows that get a config sweep
    ("mla-b64-s4096", "mla", 1, None): MLA_SWEEP,
    ("gqa-b64-s4096", "nhd", 1, None): GQA_SWEEP,
    ("gqa-b64-s4096", "nhd", 8, None): T8_SWEEP,
    ("gqa-b8-s32k", "nhd", 1, 4096): WINDOW_SWEEP,
    ("mla-b64-s4096", "mla", 4, None): [(32, 64, 1, None, 8, 3), (32, 64, 1, None, 8, 2)],
}


def bench_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


def copy_gbps(log) -> float:
    n = 2**30  # 2 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    gbps = 2 * n * 2 / (ms * 1e-3) / 1e9
    log(f"copy limit: 2 GiB device-to-device copy {ms:.3f} ms -> {gbps:.0f} GB/s (read+write)")
    return gbps


def build(case: str, layout: str, tokens: int = 1):
    c = CASES[case]
    b, s, bs = c["batch"], c["seq"], c["bs"]
    pages = s // bs
    n = b * pages + 16
    if layout == "mla":
        cache = allocate(
            "mla", num_layers=1, num_blocks=n, block_size=bs, dtype=torch.bfloat16, device="cuda"
        )
    else:
        cache = allocate(
            layout,
            num_layers=1,
            num_blocks=n,
            block_size=bs,
            num_kv_heads=c["hkv"],
            head_dim=c["d"],
            dtype=torch.bfloat16,
            device="cuda",
        )
    k, v = cache.kv("layer0")
    table = torch.randperm(n, device="cuda")[: b * pages].view(b, pages).to(torch.int32)
    seq = torch.full((b,), s, dtype=torch.int32, device="cuda")
    shape = (b, c["hq"], k.shape[3]) if tokens == 1 else (b, tokens, c["hq"], k.shape[3])
    q = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    return cache, q, k, v, table, seq


def visible(case: str, tokens: int, window: int | None) -> int:
    """Keys the queries of one sequence can see (what must be read)."""
    s = CASES[case]["seq"]
    return min(s, window + tokens - 1) if window else s


def moved_bytes(case: str, q, k, v, t: int = 1, window: int | None = None) -> int:
    c = CASES[case]
    tokens = c["batch"] * visible(case, t, window)
    es = k.element_size()
    if case.startswith("mla"):
        kv = tokens * k.shape[3] * es  # one latent read serves K and V
    else:
        kv = tokens * c["hkv"] * (k.shape[3] + v.shape[3]) * es
    return kv + q.numel() * q.element_size() + q.numel() // q.shape[-1] * v.shape[3] * 2


def verify(out, q, k, v, table, seq, window=None) -> float:
    ref = paged_decode(q, k, v, table, seq, backend="torch", window=window)
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def kernel_stats() -> dict:
    """Registers, spills, shared memory and split count of the last stage-1 launch."""
    k = LAST_LAUNCH.get("stage1")
    return dict(
        n_regs=getattr(k, "n_regs", None),
        n_spills=getattr(k, "n_spills", None),
        shared=getattr(getattr(k, "metadata", None), "shared", None),
        splits=LAST_LAUNCH.get("splits"),
    )


def gemm_tflops(log) -> float:
    """The matrix-unit ceiling: an 8192^3 bf16 matmul on random data."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    tf = 2 * 8192**3 / (ms * 1e-3) / 1e12
    log(f"matmul limit: 8192^3 bf16 {ms:.3f} ms -> {tf:.0f} TFLOP/s")
    return tf


def run_config(q, k, v, table, seq, cfg: TritonConfig, window=None):
    p = check_inputs(q, k, v, table, seq, None, None, None, None, window)
    out = torch.empty((*q.shape[:-1], v.shape[3]), dtype=q.dtype, device="cuda")
    return lambda: triton_paged_decode(q, k, v, table, seq, p, None, None, out, cfg)


def run_layout(case: str, layout: str, cbw: float, args, over: bool, log, t=1, window=None):
    """Time one row: defaults, baselines (T = 1, no window), and (MLA) the config sweep."""
    cache, q, k, v, table, seq = build(case, layout, t)
    nbytes = moved_bytes(case, q, k, v, t, window)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty((*q.shape[:-1], v.shape[3]), dtype=q.dtype, device="cuda")
    fn = lambda: paged_decode(q, k, v, table, seq, out=out, window=window)  # default call
    fn()
    err = verify(out, q, k, v, table, seq, window)
    ms = bench_ms(fn)
    ms_checked = bench_ms(
        lambda: paged_decode(q, k, v, table, seq, out=out, window=window, validate=True)
    )
    base = {}
    plain = t == 1 and window is None
    try:
        if plain:
            base["sdpa_gather"] = bench_ms(sdpa_gather(q, k, v, table, CASES[case]["seq"], scale))
    except Exception as e:
        log(f"  sdpa baseline failed on {case}/{layout}: {type(e).__name__}: {e}")
    if plain and layout in ("nhd", "mla") and not args.no_flex and not over:
        try:
            t1 = time.time()
            f = flex_paged(q, k, v, table, CASES[case]["seq"], scale)
            ferr = float((f().float() - out.float()).norm() / out.float().norm())
            base["flex_paged"] = bench_ms(f)
            log(f"  flex paged {case}: rel diff {ferr:.2e}, compile+run {time.time() - t1:.0f}s")
        except Exception as e:
            log(f"  flex baseline failed on {case}: {type(e).__name__}: {str(e)[:300]}")
    best = min(base.items(), key=lambda kv: kv[1]) if base else ("none", math.nan)
    gbps = nbytes / (ms * 1e-3) / 1e9
    c = CASES[case]
    flops = 2 * c["batch"] * c["hq"] * t * visible(case, t, window) * (k.shape[3] + v.shape[3])
    row = dict(
        case=case,
        layout=layout,
        t=t,
        window=window,
        ms=ms,
        gbps=gbps,
        copy_gbps=cbw,
        fraction=gbps / cbw,
        baseline_ms=best[1],
        baseline=best[0],
        baselines=base,
        speedup=best[1] / ms,
        ms_validate=ms_checked,
        rel_err=err,
        bytes=nbytes,
        tflops=flops / (ms * 1e-3) / 1e12,
        kernel=kernel_stats(),
    )
    log(
        f"{case:14s} {layout:12s} T={t} w={window} {ms:7.3f} ms {gbps:6.0f} GB/s "
        f"{gbps / cbw:5.1%} of copy"
        f" | baseline {best[0]} {best[1]:.3f} ms (x{row['speedup']:.1f})"
        f" | with validate {ms_checked:.3f} ms | err {err:.1e} | {row['tflops']:.0f} TFLOP/s"
    )
    entries = []
    grid = SWEEPS.get((case, layout, t, window))
    if args.no_sweep or over or not grid:
        return row, entries
    for bn, bh, dvt, sp, w, st in tqdm(grid, desc=f"sweep {case}", leave=False):
        cfg = TritonConfig(
            block_n=bn, block_h=bh, dv_tiles=dvt, num_splits=sp, num_warps=w, num_stages=st
        )
        entry = dict(case=case, layout=layout, t=t, window=window, config=cfg.__dict__)
        try:
            run = run_config(q, k, v, table, seq, cfg, window)
            entry["rel_err"] = verify(run(), q, k, v, table, seq, window)
            entry.update(kernel_stats())
            entry["ms"] = bench_ms(run)
            entry["fraction"] = nbytes / (entry["ms"] * 1e-3) / 1e9 / cbw
            msg = (
                f"{entry['ms']:.3f} ms {entry['fraction']:.1%} err {entry['rel_err']:.1e} "
                f"splits {entry['splits']} regs {entry['n_regs']} spills {entry['n_spills']} "
                f"smem {entry['shared']}"
            )
        except Exception as e:
            entry["error"] = msg = f"{type(e).__name__}: {str(e)[:200]}"
        entries.append(entry)
        log(f"    sweep {cfg}: {msg}")
    del cache
    return row, entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-extra", action="store_true", help="only the T = 1 rows")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip sweeps and flex baselines once this many seconds have passed",
    )
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a results JSON")
    args = ap.parse_args()
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
        plot(res["rows"], res["copy_gbps"], Path(args.replot).with_suffix(".png"),
             res["env"]["device"])  # fmt: skip
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    gpu = "h100" if "H100" in props.name else "h200" if "H200" in props.name else "gpu"
    log_path = out_dir / f"decode_{gpu}_log.txt"
    log_path.write_text("")

    def log(msg: str) -> None:
        tqdm.write(msg)
        with log_path.open("a") as f:
            f.write(msg + "\n")

    env = dict(
        device=props.name,
        sms=props.multi_processor_count,
        l2_mb=getattr(props, "L2_cache_size", 0) / 2**20,
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=" ".join(sys.argv),
        fast_launch=os.environ.get("KVBRIDGE_TRITON_FAST_LAUNCH", "1") != "0",
    )
    log(json.dumps(env))
    t0 = time.time()
    checks = check_matrix(log)
    checks += check_multi(log)
    checks.append(check_int64(log))
    _, q, k, v, table, seq = build("gqa-b64-s4096", "packed")
    checks.append(check_no_copy(q, k, v, table, seq, log))
    del q, k, v, table, seq, _
    torch.cuda.empty_cache()
    log(f"checks passed in {time.time() - t0:.0f}s")

    cbw = copy_gbps(log)
    tflops_peak = gemm_tflops(log)
    host = measure_host(log)
    cases = args.cases.split(",")
    specs = [(c, lay, 1, None) for c in cases
             for lay in (("mla",) if c.startswith("mla") else GQA_LAYOUTS)]  # fmt: skip
    specs += [s for s in EXTRA_ROWS if s[0] in cases and not args.no_extra]
    rows, sweep = [], []
    for case, layout, t, window in specs:
        over = time.time() - t0 > args.budget_s
        row, entries = run_layout(case, layout, cbw, args, over, log, t, window)
        row["fraction_of_matmul"] = row["tflops"] / tflops_peak
        rows.append(row)
        sweep += entries
        torch.cuda.empty_cache()

    result = dict(env=env, copy_gbps=cbw, gemm_tflops=tflops_peak, host_us=host, checks=checks,
                  rows=rows)  # fmt: skip
    (out_dir / f"decode_{gpu}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"decode_{gpu}_sweep.json").write_text(json.dumps(sweep, indent=1))
    plot(rows, cbw, out_dir / f"decode_{gpu}.png", props.name)
    print("\ncase           layout       T window  ms      GB/s   frac  TFLOP/s baseline_ms")
    for r in rows:
        print(
            f"{r['case']:14s} {r['layout']:12s} {r['t']} {r['window']!s:6s} {r['ms']:.3f} "
            f"{r['gbps']:7.0f} {r['fraction']:6.1%} {r['tflops']:6.0f} {r['baseline_ms']:9.3f} "
            f"({r['baseline']})"
        )
    print(f"total {time.time() - t0:.0f}s")


def plot(rows: list[dict], cbw: float, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\n{r['layout']} T={r.get('t', 1)} w={r.get('window')}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.8), 5))
    ax.bar([i - 0.2 for i in x], [r["gbps"] for r in rows], 0.4, label="kvbridge triton")
    ax.bar(
        [i + 0.2 for i in x],
        [r["bytes"] / (r["baseline_ms"] * 1e-3) / 1e9 for r in rows],
        0.4,
        label="baseline (best of flex paged / sdpa gather)",
    )
    ax.axhline(cbw, color="k", ls="--", lw=1, label=f"D2D copy {cbw:.0f} GB/s")
    ax.axhline(0.8 * cbw, color="gray", ls=":", lw=1, label="80% of copy")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=35, ha="right")
    ax.set_ylabel("achieved GB/s (bytes that must move / time)")
    ax.set_title(f"paged decode on {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

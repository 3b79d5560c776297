"""Speed of kvbridge.topology against a straightforward per-block Python loop.

Caches are meta-device tensors (real strides, virtual addresses), so full-scale
geometries need no memory. Every case runs the vectorised path (best of
``--repeat`` warm calls, plus the first, cold call that builds the cached
template) and the per-block loop baseline in the same run, checks that both
give the same number of ranges, and prints the ratio.

    .venv/bin/python bench/topology.py            # 64 layers, 100k / 10k blocks
    .venv/bin/python bench/topology.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from kvbridge.topology import TransferPlan, TransferTopology, layouts
from kvbridge.topology.analysis import footprint
from kvbridge.topology.pairing import HeadRange
from kvbridge.topology.plan import _template
from tqdm import tqdm

GEOM = dict(block_size=16, num_kv_heads=8, head_dim=128)


def topology(layout: str, layers: int, blocks: int, **kw) -> TransferTopology:
    cache = layouts.allocate(
        layout, num_layers=layers, num_blocks=blocks, **{**GEOM, **kw}, device="meta"
    )
    return TransferTopology.from_caches(cache.layers)


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(cold ms, best warm ms, result)."""
    t0 = time.perf_counter()
    out = fn()
    cold = (time.perf_counter() - t0) * 1e3
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        warm.append((time.perf_counter() - t0) * 1e3)
    return cold, min(warm), out


# ---- the baseline: per-block loops over the per-block byte pattern ---------------


def _class_pieces(tpl):
    """Per class: (src region, dst region, src stride, dst stride, [(src_rel, dst_rel, n)])."""
    m = tpl.merged
    out = []
    for c in range(m.class_key.size):
        sel = m.cls == c
        su, du = m.units[m.class_key[c]]
        pieces = list(
            zip(m.src[sel].tolist(), m.dst[sel].tolist(), m.nbytes[sel].tolist(), strict=True)
        )
        out.append(
            (int(m.class_sreg[c]), int(m.class_dreg[c]), su.block_stride, du.block_stride, pieces)
        )
    return out


def baseline_block_ranges(topo: TransferTopology, ids, bar) -> int:
    """For each region pattern and piece, for each block: append or extend a range."""
    ids = sorted(int(i) for i in ids)
    out: list[list[int]] = []
    for reg, _, stride, _, pieces in _class_pieces(footprint(topo.spec())):
        for rel, _, n in pieces:
            for b in ids:
                start = rel + b * stride
                last = out[-1] if out else None
                if last is not None and last[0] == reg and last[1] + last[2] == start:
                    last[2] += n
                else:
                    out.append([reg, start, n])
        bar.update(1)
    return len(out)


def baseline_plan(src, dst, s_ids, d_ids, bar, heads: HeadRange | None = None) -> int:
    """For each class pattern and piece, for each block pair: append or extend a descriptor."""
    heads = heads or HeadRange()
    pairs = sorted(zip(s_ids.tolist(), d_ids.tolist(), strict=True))
    out: list[list[int]] = []
    for sreg, dreg, ss, ds, pieces in _class_pieces(
        _template(src.spec(), dst.spec(), False, heads)
    ):
        for srel, drel, n in pieces:
            for sb, db in pairs:
                s, d = srel + sb * ss, drel + db * ds
                last = out[-1] if out else None
                if (
                    last is not None
                    and last[0] == sreg
                    and last[3] == dreg
                    and last[1] + last[2] == s
                    and last[4] + last[2] == d
                ):
                    last[2] += n
                else:
                    out.append([sreg, s, n, dreg, d])
        bar.update(1)
    return len(out)


# ---- cases -----------------------------------------------------------------------


def runs_ids(rng, total: int, want: int, mean_run: int) -> np.ndarray:
    """About ``want`` ids from ``[0, total)`` in runs of geometric length (mean ``mean_run``)."""
    lengths = rng.geometric(1 / mean_run, size=2 * want // mean_run + 16)
    gaps = rng.geometric(1 / mean_run, size=lengths.size)
    starts = np.cumsum(gaps + np.concatenate(([0], lengths[:-1])))
    ids = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    return ids[ids < total][:want]


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def bench_layout(layout: str, args, rng, record) -> None:
    """block_ranges (one run; runs of ~16 and uniformly random ids in a cache twice as
    large) and a plan of scattered block pairs."""
    L, N, K = args.layers, args.blocks, args.plan_blocks
    topo = topology(layout, L, N)
    all_ids = np.arange(N)
    n_cls = len(_class_pieces(footprint(topo.spec())))
    fast = timed(lambda: topo.block_ranges(all_ids), args.repeat)
    record(f"block_ranges {_k(N)} run", layout, fast,
           lambda bar: baseline_block_ranges(topo, all_ids, bar), len(fast[2]), n_cls)  # fmt: skip
    big = topology(layout, L, 2 * N)
    frag = runs_ids(rng, 2 * N, N, 16)
    fast = timed(lambda: big.block_ranges(frag), args.repeat)
    record(f"block_ranges {_k(N)} in runs~16", layout, fast,
           lambda bar: baseline_block_ranges(big, frag, bar), len(fast[2]), n_cls)  # fmt: skip
    scattered = np.sort(rng.choice(2 * N, N, replace=False))
    fast = timed(lambda: big.block_ranges(scattered), args.repeat)
    record(f"block_ranges {_k(N)} random of {_k(2 * N)}", layout, fast,
           lambda bar: baseline_block_ranges(big, scattered, bar), len(fast[2]), n_cls)  # fmt: skip
    src, dst = topo, topology(layout, L, N)
    s_ids = rng.choice(N, K, replace=False)
    d_ids = rng.choice(N, K, replace=False)
    fast = timed(lambda: TransferPlan.between(src, dst, s_ids, d_ids), args.repeat)
    n_pcls = len(_class_pieces(_template(src.spec(), dst.spec(), False, HeadRange())))
    record(f"plan {_k(K)} scattered", layout, fast,
           lambda bar: baseline_plan(src, dst, s_ids, d_ids, bar), fast[2].num_descriptors,
           n_pcls)  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=100_000, help="blocks for block_ranges")
    ap.add_argument("--plan-blocks", type=int, default=10_000, help="scattered blocks per plan")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layouts", default="nhd,packed,kv_outer,mla,cross_layer")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--quick", action="store_true", help="4 layers, 2000/500 blocks")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "topology.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.blocks, args.plan_blocks, args.repeat = 4, 2000, 500, 2
    rng = np.random.default_rng(0)
    L, N, K = args.layers, args.blocks, args.plan_blocks
    rows = []

    def record(case, layout, fast, base_fn, count, total_work):
        cold, warm, _ = fast
        row = dict(case=case, layout=layout, count=count, cold_ms=cold, warm_ms=warm)
        if base_fn is not None and not args.no_baseline:
            with tqdm(total=total_work, desc=f"baseline {case} {layout}", leave=False) as bar:
                t0 = time.perf_counter()
                base_count = base_fn(bar)
                row["baseline_ms"] = (time.perf_counter() - t0) * 1e3
            assert base_count == count, f"{case} {layout}: baseline {base_count} != fast {count}"
            row["speedup"] = row["baseline_ms"] / warm
        rows.append(row)
        tqdm.write(
            f"{case:24s} {layout:12s} {count:>9d} ranges  cold {cold:8.2f} ms  warm {warm:7.2f} ms"
            + (
                f"  baseline {row['baseline_ms']:9.0f} ms  x{row['speedup']:.0f}"
                if "speedup" in row
                else ""
            )
        )

    for layout in tqdm(args.layouts.split(","), desc="layouts"):
        bench_layout(layout, args, rng, record)
    # TP head slice (HND keeps one piece per block) and block-size mismatch (token space)
    src, dst = topology("hnd", L, N), topology("hnd", L, N, num_kv_heads=4)
    s_ids, d_ids = rng.choice(N, K, replace=False), rng.choice(N, K, replace=False)
    fast = timed(
        lambda: TransferPlan.between(src, dst, s_ids, d_ids, src_head_start=4), args.repeat
    )
    heads = HeadRange(4, 0, None)
    record(f"plan {_k(K)} TP heads[4:8]", "hnd", fast,
           lambda bar: baseline_plan(src, dst, s_ids, d_ids, bar, heads), fast[2].num_descriptors,
           2 * L)  # fmt: skip
    src, dst = topology("nhd", L, N), topology("nhd", L, N, block_size=32)
    s_ids, d_ids = rng.choice(N, K, replace=False), rng.choice(N, K // 2, replace=False)
    fast = timed(
        lambda: TransferPlan.between(src, dst, s_ids, d_ids, num_tokens=16 * K), args.repeat
    )
    record(f"plan {_k(K)} tokens 16->32", "nhd", fast, None, fast[2].num_descriptors, 0)

    meta = dict(
        command="python " + " ".join(sys.argv),
        machine=_machine(),
        python=platform.python_version(),
        numpy=np.__version__,
        date=str(date.today()),
        layers=L,
        blocks=N,
        plan_blocks=K,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("\n| case | layout | ranges | warm ms | cold ms | loop ms | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        base = f"{r['baseline_ms']:.0f} | x{r['speedup']:.0f}" if "speedup" in r else "- | -"
        print(f"| {r['case']} | {r['layout']} | {r['count']} | {r['warm_ms']:.2f} | "
              f"{r['cold_ms']:.1f} | {base} |")  # fmt: skip
    print(
        f"\nmedian warm ms: {statistics.median(r['warm_ms'] for r in rows):.2f}; json: {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

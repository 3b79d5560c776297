"""The fused split-K reduce of the portable Triton kernel on a GPU, and the host time.

Run on a CUDA machine from the repository root::

    python3 bench/decode_fused.py --out bench/results

1. correctness vs the float64 brute force: the GPU check matrix and the multi-token
   checks of bench/decode_gpu_checks.py (forced split counts included, each case
   called twice: the second on the direct launch path), then the fused reduce's own
   cases: a CUDA graph captured with several splits and replayed on new q values,
   and two streams running split calls at once (separate counters per stream);
2. the host time of one call beside SDPA's (bench/decode_host.py);
3. kernel time (CUDA-event medians) of the fused reduce (one launch) vs stage 1 +
   stage 2 (``TritonConfig(fuse_reduce=False)``) for rows that split.

Writes ``decode_fused_<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as bd
import torch
import triton
from decode_gpu_checks import check_matrix, check_multi
from decode_host import measure as measure_host
from decode_truth import TOLERANCE, brute_force, make_case, rel_err
from kvbridge.kernels import paged_decode
from kvbridge.kernels.checks import check_inputs
from kvbridge.kernels.triton_launch import LAST_LAUNCH, TritonConfig, triton_paged_decode

ROWS = [  # (name, case, layout, T, window, forced splits or None)
    ("b1 s1024 (host shape)", dict(batch=1, seq=1024, hq=32, hkv=8, d=128, bs=16), None),
    ("gqa-b8-s32k nhd", bd.CASES["gqa-b8-s32k"], None),
    ("gqa-b8-s32k nhd window 4096", bd.CASES["gqa-b8-s32k"], 4096),
    ("gqa-b64-s4096 nhd splits=4", bd.CASES["gqa-b64-s4096"], None),
]


def check_graph_and_streams(log) -> list[dict]:
    """Splits inside a CUDA graph (fresh counters, captured memset) and on two streams."""
    rows = []
    kw = dict(seq_lens=[0, 17, 300, 1000], num_q_heads=8, num_kv_heads=2, head_dim=128,
              device="cuda")  # fmt: skip
    case = make_case("nhd", **kw)
    cfg = TritonConfig(num_splits=6)
    out = torch.full(case.out_shape(), float("nan"), dtype=case.q.dtype, device="cuda")
    q = case.q.clone()
    p = check_inputs(q, case.k, case.v, case.block_table, case.seq_lens, None, None, None, out)
    run = lambda: triton_paged_decode(q, case.k, case.v, case.block_table, case.seq_lens, p,
                                      None, None, out, cfg)  # fmt: skip
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    for i in range(3):
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = brute_force(q, case.k, case.v, case.block_table, case.seq_lens)
        err = rel_err(out, ref)
        ok = err <= TOLERANCE[q.dtype] and not out.isnan().any()
        rows.append(dict(check=f"graph replay {i} splits=6", rel_err=err, ok=bool(ok)))
        log(f"  graph replay {i} splits=6       rel_err={err:.2e} {'ok' if ok else 'FAIL'}")
        assert ok, f"graph replay {i}: rel_err {err}"
    cases = [make_case("hnd", **kw) for _ in range(2)]
    outs = [torch.full(c.out_shape(), float("nan"), dtype=c.q.dtype, device="cuda") for c in cases]
    streams = [torch.cuda.Stream() for _ in cases]
    torch.cuda.synchronize()
    for _ in range(20):  # both streams' launches interleave on the device
        for c, o, st in zip(cases, outs, streams, strict=True):
            with torch.cuda.stream(st):
                paged_decode(c.q, c.k, c.v, c.block_table, c.seq_lens, out=o, backend="triton")
    torch.cuda.synchronize()
    for i, (c, o) in enumerate(zip(cases, outs, strict=True)):
        err = rel_err(o, brute_force(c.q, c.k, c.v, c.block_table, c.seq_lens))
        ok = err <= TOLERANCE[c.q.dtype] and not o.isnan().any()
        rows.append(dict(check=f"two streams, stream {i}", rel_err=err, ok=bool(ok)))
        log(f"  two streams, stream {i}         rel_err={err:.2e} {'ok' if ok else 'FAIL'}")
        assert ok, f"two streams: rel_err {err}"
    return rows


def kernel_rows(log) -> list[dict]:
    rows = []
    for name, c, window in ROWS:
        b, s, bs = c["batch"], c["seq"], c["bs"]
        pages = s // bs
        n = b * pages + 16
        from kvbridge.topology.layouts import allocate

        cache = allocate("nhd", num_layers=1, num_blocks=n, block_size=bs, num_kv_heads=c["hkv"],
                         head_dim=c["d"], dtype=torch.bfloat16, device="cuda")  # fmt: skip
        k, v = cache.kv("layer0")
        k.normal_()
        v.normal_()
        table = torch.randperm(n, device="cuda")[: b * pages].view(b, pages).to(torch.int32)
        seq = torch.full((b,), s, dtype=torch.int32, device="cuda")
        q = torch.randn(b, c["hq"], c["d"], dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        p = check_inputs(q, k, v, table, seq, None, None, None, out, window)
        forced = 4 if "splits=4" in name else None
        res = dict(name=name)
        for label, cfg in (
            ("fused", TritonConfig(num_splits=forced)),
            ("two launches", TritonConfig(num_splits=forced, fuse_reduce=False)),
        ):
            a = (q, k, v, table, seq, p, None, None, out, cfg)
            fn = lambda a=a: triton_paged_decode(*a)
            fn()
            err = bd.verify(out, q, k, v, table, seq, window)
            res[label] = dict(ms=bd.bench_ms(fn), rel_err=err, splits=LAST_LAUNCH.get("splits"))
        log(
            f"  {name:30s} splits {res['fused']['splits']:2d}  fused {res['fused']['ms']:.4f} ms"
            f"  two launches {res['two launches']['ms']:.4f} ms  err {res['fused']['rel_err']:.1e}"
        )
        rows.append(res)
        del cache
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-matrix", action="store_true", help="skip the check matrix")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    gpu = "h100" if "H100" in props.name else "h200" if "H200" in props.name else "gpu"
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    env = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
               command=" ".join(sys.argv))  # fmt: skip
    log(json.dumps(env))
    t0 = time.time()
    checks = [] if args.no_matrix else check_matrix(log) + check_multi(log)
    checks += check_graph_and_streams(log)
    log(f"checks passed in {time.time() - t0:.0f}s")
    host = measure_host(log)
    rows = kernel_rows(log)
    res = dict(env=env, checks=checks, host_us=host, rows=rows, log=lines)
    (out_dir / f"decode_fused_{gpu}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Correctness checks of the Triton paged decode on a GPU, run first by bench/decode.py.

* a matrix of layouts, dtypes, head dims, block sizes, group sizes, split counts
  and MLA against the float64 brute force of tests/kernels/decode_truth.py;
* int64 addressing: a packed K/V cache view of more than 2**31 elements whose
  sequences live in its top blocks, against the torch reference on the GPU;
* no copy: peak GPU memory during a call stays far below the cache size (and the
  same probe sees a ``.contiguous()`` of the cache, as a control).
"""

from __future__ import annotations

import time

import torch
from decode_truth import TOLERANCE, brute_force, make_case, rel_err
from kvbridge.kernels import paged_decode
from kvbridge.kernels.triton_launch import TritonConfig, triton_paged_decode
from kvbridge.topology.layouts import GQA_LAYOUTS, allocate
from tqdm import tqdm

F8 = torch.float8_e4m3fn


def _matrix() -> list[tuple[str, dict, TritonConfig | None]]:
    seqs = [0, 1, 17, 300, 1000]
    cases: list[tuple[str, dict, TritonConfig | None]] = []
    for layout in GQA_LAYOUTS:
        for off, pad in ((0, 0), (3, 40)):
            kw = dict(seq_lens=seqs, num_q_heads=8, num_kv_heads=2, head_dim=128, num_layers=2)
            cases.append(
                (
                    f"{layout} off={off} pad={pad}",
                    {**kw, "storage_offset": off, "block_pad": pad, "layer": 1, "_layout": layout},
                    None,
                )
            )
    base = dict(_layout="nhd", seq_lens=seqs, num_q_heads=8, num_kv_heads=2, head_dim=128)
    cases += [
        ("nhd fp16", {**base, "dtype": torch.float16}, None),
        ("nhd fp32", {**base, "dtype": torch.float32}, None),
        ("nhd fp8 float scales", {**base, "kv_dtype": F8}, None),
        ("nhd fp8 tensor scales", {**base, "kv_dtype": F8, "_tensor_scales": True}, None),
        ("mqa hq=8 hkv=1", {**base, "num_kv_heads": 1}, None),
        ("mha hq=hkv=4", {**base, "num_q_heads": 4, "num_kv_heads": 4}, None),
        ("gqa group 32", {**base, "num_q_heads": 64, "num_kv_heads": 2}, None),
        ("splits=1", base, TritonConfig(num_splits=1)),
        ("splits=7 block_n=32", base, TritonConfig(block_n=32, num_splits=7)),
        (
            "block_size 1",
            {**base, "_layout": "packed", "block_size": 1, "seq_lens": [0, 1, 70]},
            None,
        ),
        ("block_size 128", {**base, "_layout": "packed", "block_size": 128}, None),
        ("block_size 48", {**base, "_layout": "interleaved", "block_size": 48}, None),
        ("mla hq=16", {**base, "_layout": "mla", "num_q_heads": 16}, None),
        ("mla hq=128", {**base, "_layout": "mla", "num_q_heads": 128, "block_size": 64}, None),
        (
            "mla hq=128 fp8",
            {**base, "_layout": "mla", "num_q_heads": 128, "block_size": 64, "kv_dtype": F8},
            None,
        ),
    ]
    mla128 = {**base, "_layout": "mla", "num_q_heads": 128, "block_size": 64}
    cases.append(("mla hq=128 dv_tiles=2", mla128, TritonConfig(block_h=64, dv_tiles=2)))
    cases.append(("mla hq=128 16 warps", mla128, TritonConfig(block_h=64, num_warps=16)))
    for d in (64, 80, 96, 256):
        cases.append((f"hnd head_dim {d}", {**base, "_layout": "hnd", "head_dim": d}, None))
    return cases


def check_matrix(log, device: str = "cuda") -> list[dict]:
    """Triton vs float64 brute force over the matrix; raises on the first failure."""
    rows = []
    for name, kw, cfg in tqdm(_matrix(), desc="gpu correctness"):
        kw = dict(kw)
        layout = kw.pop("_layout")
        tensor_scales = kw.pop("_tensor_scales", False)
        case = make_case(layout, device=device, **kw)
        if tensor_scales:
            case.k_scale = torch.tensor(0.03, device=device)
            case.v_scale = torch.tensor(0.07, device=device)
        out = torch.full(
            (case.q.shape[0], case.q.shape[1], case.v.shape[3]),
            float("nan"),
            dtype=case.q.dtype,
            device=device,
        )
        for _ in range(2):  # the second call takes the cached (fast) launch path
            out.fill_(float("nan"))
            if cfg is None:
                paged_decode(
                    case.q,
                    case.k,
                    case.v,
                    case.block_table,
                    case.seq_lens,
                    out=out,
                    backend="triton",
                    **case.kwargs(),
                )
            else:
                from kvbridge.kernels.checks import check_inputs

                p = check_inputs(
                    case.q,
                    case.k,
                    case.v,
                    case.block_table,
                    case.seq_lens,
                    None,
                    case.k_scale,
                    case.v_scale,
                    out,
                )
                triton_paged_decode(
                    case.q,
                    case.k,
                    case.v,
                    case.block_table,
                    case.seq_lens,
                    p,
                    case.k_scale,
                    case.v_scale,
                    out,
                    cfg,
                )
        if device == "cuda":
            torch.cuda.synchronize()
        ref = brute_force(
            case.q,
            case.k,
            case.v,
            case.block_table,
            case.seq_lens,
            None,
            case.k_scale,
            case.v_scale,
        )
        err = rel_err(out, ref)
        tol = TOLERANCE[case.q.dtype] if case.q.dtype != torch.float32 else 1e-4
        zero_ok = all(
            bool((out[b] == 0).all()) for b, n in enumerate(case.seq_lens.tolist()) if n == 0
        )
        ok = err <= tol and zero_ok
        rows.append(dict(check=name, rel_err=err, tol=tol, ok=ok))
        log(f"  {name:32s} rel_err={err:.2e} tol={tol:g} {'ok' if ok else 'FAIL'}")
        if not ok:
            raise AssertionError(f"GPU correctness failed: {name}: rel_err {err} zero_ok {zero_ok}")
    return rows


def check_multi(log, device: str = "cuda") -> list[dict]:
    """Multi-token decode, windows and host-side metadata vs the float64 brute force."""
    seqs = [0, 17, 20, 300, 1000]  # >= T (16) or 0 (padding)
    base = dict(seq_lens=seqs, num_q_heads=8, num_kv_heads=2, head_dim=128, device=device)
    cases = []
    for layout in GQA_LAYOUTS:
        for t, w in ((4, None), (4, 100), (None, 37), (16, 300), (2, 1)):
            cases.append((f"{layout} T={t or 1} window={w}", layout,
                          {**base, "tokens": t, "window": w, "storage_offset": 3,
                           "block_pad": 40, "strided_q": True}, None))  # fmt: skip
    mla = {**base, "num_q_heads": 128, "block_size": 64, "seq_lens": [0, 7, 300, 1000]}
    for t, w in ((2, None), (4, 200), (None, 100)):
        cases.append((f"mla T={t or 1} window={w}", "mla", {**mla, "tokens": t, "window": w}, None))
    cases.append(("nhd T=4 w=50 splits=5", "nhd", {**base, "tokens": 4, "window": 50},
                  TritonConfig(num_splits=5)))  # fmt: skip
    cases.append(("nhd T=8 host metadata", "nhd", {**base, "tokens": 8, "window": 64}, "host"))
    rows = []
    for name, layout, kw, cfg in tqdm(cases, desc="gpu multi-token checks"):
        case = make_case(layout, **kw)
        out = torch.full(case.out_shape(), float("nan"), dtype=case.q.dtype, device=device)
        bt, sl = case.block_table, case.seq_lens
        if cfg == "host":
            bt, sl = bt.cpu(), sl.cpu()
        for _ in range(2):  # the second call takes the cached (fast) launch path
            out.fill_(float("nan"))
            if isinstance(cfg, TritonConfig):
                from kvbridge.kernels.checks import check_inputs

                p = check_inputs(case.q, case.k, case.v, bt, sl, None, None, None, out, case.window)
                triton_paged_decode(case.q, case.k, case.v, bt, sl, p, None, None, out, cfg)
            else:
                paged_decode(case.q, case.k, case.v, bt, sl, out=out, backend="triton",
                             window=case.window, validate=True)  # fmt: skip
        torch.cuda.synchronize()
        ref = brute_force(case.q, case.k, case.v, case.block_table, case.seq_lens,
                          window=case.window)  # fmt: skip
        err = rel_err(out, ref)
        tol = TOLERANCE[case.q.dtype]
        ok = err <= tol and not out.isnan().any()
        rows.append(dict(check=name, rel_err=err, tol=tol, ok=bool(ok)))
        log(f"  {name:32s} rel_err={err:.2e} tol={tol:g} {'ok' if ok else 'FAIL'}")
        if not ok:
            raise AssertionError(f"GPU multi-token check failed: {name}: rel_err {err}")
    return rows


def check_int64(log) -> dict:
    """A packed cache view with > 2**31 elements, sequences in its top blocks."""
    h, bs, d = 8, 16, 128
    per_block = h * bs * 2 * d
    n = (2**31) // per_block + 2048
    t0 = time.time()
    cache = allocate(
        "packed",
        num_layers=1,
        num_blocks=n,
        block_size=bs,
        num_kv_heads=h,
        head_dim=d,
        dtype=torch.bfloat16,
        device="cuda",
    )
    k, v = cache.kv("layer0")
    span = (n - 1) * k.stride(0) + (bs - 1) * k.stride(1) + (h - 1) * k.stride(2) + 2 * d
    b, pages = 8, 64
    top = torch.arange(n - b * pages, n, device="cuda")
    table = top[torch.randperm(b * pages, device="cuda")].view(b, pages).to(torch.int32)
    table[0, :4] = torch.tensor([0, n - 1, 1, n // 2], dtype=torch.int32)  # far apart
    seq = torch.tensor(
        [pages * bs, 1000, 1, 0, 777, 513, 1024, 64], dtype=torch.int32, device="cuda"
    )
    q = torch.randn(b, 32, d, dtype=torch.bfloat16, device="cuda")
    out = paged_decode(q, k, v, table, seq, backend="triton")
    ref = paged_decode(q, k, v, table, seq, backend="torch")
    err = rel_err(out, ref.double().cpu())
    max_off = int(table.max()) * k.stride(0)
    ok = err < 2e-2 and bool((out[3] == 0).all())
    log(
        f"  int64: view spans {span:,} elements (> 2**31 = {2**31:,}), highest block offset "
        f"{max_off:,}; rel_err vs torch reference {err:.2e} {'ok' if ok else 'FAIL'} "
        f"({time.time() - t0:.1f}s)"
    )
    del cache, k, v
    torch.cuda.empty_cache()
    if not ok:
        raise AssertionError(f"int64 check failed: rel_err {err}")
    return dict(
        check="int64 > 2**31 elements", elements=span, max_block_offset=max_off, rel_err=err, ok=ok
    )


def peak_extra_bytes(fn) -> int:
    """Peak GPU bytes allocated during ``fn`` above what was allocated before."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def check_no_copy(q, k, v, table, seq, log) -> dict:
    """Peak extra memory of a call vs the cache size; a copying call as the control."""
    cache_bytes = (k.numel() + v.numel()) * k.element_size()
    ours = peak_extra_bytes(lambda: paged_decode(q, k, v, table, seq, backend="triton"))
    control = peak_extra_bytes(
        lambda: paged_decode(q, k.contiguous(), v.contiguous(), table, seq, backend="triton")
    )
    ok = ours < cache_bytes / 100 and control >= cache_bytes / 2
    log(
        f"  no copy: cache {cache_bytes / 2**20:.0f} MiB, peak extra during paged_decode "
        f"{ours / 2**20:.2f} MiB; control with .contiguous() {control / 2**20:.0f} MiB "
        f"{'ok' if ok else 'FAIL'}"
    )
    if not ok:
        raise AssertionError("no-copy check failed")
    return dict(
        check="no copy",
        cache_bytes=cache_bytes,
        peak_extra_bytes=ours,
        control_bytes=control,
        ok=ok,
    )

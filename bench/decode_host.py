"""Host time of one ``paged_decode`` call vs SDPA's, for bench/decode.py.

A decode step calls attention once per layer, so the Python/launch cost of a call
matters as much as the kernel when batches are small. Shape: B 1, S 1024, GQA
32/8 heads, D 128, bf16, NHD blocks of 16. Host time = wall time of N back-to-back
calls / N with no sync inside the loop (the kernels are far shorter than the host
path, so the launch queue never fills).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from kvbridge.kernels import api, paged_decode
from kvbridge.kernels.checks import check_inputs
from kvbridge.kernels.triton_launch import TritonConfig, triton_paged_decode
from kvbridge.topology.layouts import allocate


def host_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    el = time.perf_counter() - t0
    torch.cuda.synchronize()
    return el / n * 1e6


def measure(log, seq: int = 1024) -> dict:
    hq, hkv, d, bs = 32, 8, 128, 16
    pages = seq // bs
    cache = allocate("nhd", num_layers=1, num_blocks=pages + 8, block_size=bs,
                     num_kv_heads=hkv, head_dim=d, dtype=torch.bfloat16, device="cuda")  # fmt: skip
    k, v = cache.kv("layer0")
    bt = torch.randperm(pages + 8, device="cuda")[:pages].view(1, pages).to(torch.int32)
    sl = torch.tensor([seq], dtype=torch.int32, device="cuda")
    q = torch.randn(1, hq, d, dtype=torch.bfloat16, device="cuda")
    q4 = torch.randn(1, 4, hq, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(1, hq, d, dtype=torch.bfloat16, device="cuda")
    bt_h, sl_h = bt.cpu(), sl.cpu()
    qd = q.view(1, hq, 1, d)
    kd = torch.randn(1, hkv, seq, d, dtype=torch.bfloat16, device="cuda")
    vd = torch.randn_like(kd)
    p = check_inputs(q, k, v, bt, sl, None, None, None, out)
    one = TritonConfig(num_splits=1)
    fns = {
        "sdpa (dense, enable_gqa)": lambda: F.scaled_dot_product_attention(
            qd, kd, vd, enable_gqa=True
        ),
        "paged_decode default (device metadata)": lambda: paged_decode(q, k, v, bt, sl),
        "paged_decode default, out=": lambda: paged_decode(q, k, v, bt, sl, out=out),
        "paged_decode validate=False, out=": lambda: paged_decode(
            q, k, v, bt, sl, out=out, validate=False
        ),
        "paged_decode validate=True (device sync)": lambda: paged_decode(
            q, k, v, bt, sl, out=out, validate=True
        ),
        "paged_decode host metadata (validated, copied)": lambda: paged_decode(
            q, k, v, bt_h, sl_h, out=out
        ),
        "paged_decode T=4": lambda: paged_decode(q4, k, v, bt, sl),
        "paged_decode window=256": lambda: paged_decode(q, k, v, bt, sl, out=out, window=256),
        "part: metadata key": lambda: api._call_key(
            q, k, v, bt, sl, None, None, None, out, "auto", None
        ),
        "part: check_inputs (cache miss)": lambda: check_inputs(
            q, k, v, bt, sl, None, None, None, out
        ),
        "part: triton launch (plan's splits)": lambda: triton_paged_decode(
            q, k, v, bt, sl, p, None, None, out
        ),
        "part: triton launch, 1 split (1 kernel)": lambda: triton_paged_decode(
            q, k, v, bt, sl, p, None, None, out, one
        ),
    }
    res = {name: host_us(fn) for name, fn in fns.items()}
    from kvbridge.kernels.triton_launch import LAST_LAUNCH

    triton_paged_decode(q, k, v, bt, sl, p, None, None, out)
    res["splits (plan)"] = LAST_LAUNCH.get("splits")
    from kvbridge.kernels.triton_fastlaunch import _STATE, _hooked

    res["fast launch active"] = bool(_STATE["ok"] and not _hooked())
    log(f"  direct (cached) launch path active: {res['fast launch active']}")
    sdpa = res["sdpa (dense, enable_gqa)"]
    log(f"host time per call, B 1 S {seq} GQA 32/8 D 128 (us; SDPA {sdpa:.1f}):")
    for name, us in res.items():
        if isinstance(us, float):
            log(f"  {name:48s} {us:7.1f} us  ({us / sdpa:.2f}x SDPA)")
    del cache
    return res

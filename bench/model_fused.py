"""The model's fused GPU path against its torch ops, same weights, same run (CUDA).

On the 1.1 B bench model (bf16): bit-equality of the RMSNorm and SiLU kernels,
mismatches of rope + K/V store against ``apply_rope``, greedy tokens of both
models, the decode step with CUDA graphs at batch 1/8/64 (host time per step and
GPU replay time), packed prefill forwards, and one prompt of a new length each time
with and without cuDNN attention allowed (cuDNN builds a plan per shape).

    python3 bench/model_fused.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from kvbridge.connector.serving.engine import prefill_batch as pbm
from kvbridge.connector.serving.engine.batch_state import BatchState
from kvbridge.connector.serving.engine.prefill_batch import PrefillBatcher, _Job
from kvbridge.connector.serving.engine.step import DecodeStep
from kvbridge.connector.serving.model import LlamaModel, allocate_cache, generate_monolithic
from kvbridge.connector.serving.model import fused as fz
from kvbridge.connector.serving.model.llama import rms_norm
from kvbridge.connector.serving.model.rope import apply_rope, rope_tables

sys.path.insert(0, str(Path(__file__).parent))
from serve import BLOCK_SIZE, GPU_MODEL, _weights, timed_steps

DEV = "cuda"


def exactness(fast: LlamaModel, plain: LlamaModel, out: dict) -> None:
    w = fast.w
    x = torch.randn(64, 2048, device=DEV, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    y, xo = fz.rms_norm(x, w.layers[0].input_norm, 1e-5, residual=r)
    want = rms_norm(x + r, w.layers[0].input_norm, 1e-5)
    out["rms_add_equal"] = bool(torch.equal(xo, x + r))
    out["rms_norm_mismatches"] = int((y != want).sum())
    gu = torch.randn(64, 2 * 8192, device=DEV, dtype=torch.bfloat16)
    silu = torch.nn.functional.silu(gu[:, :8192]) * gu[:, 8192:]
    out["silu_mul_mismatches"] = int((fz.silu_mul(gu) != silu).sum())
    cache = allocate_cache(fast, "nhd", 4096, BLOCK_SIZE)
    kc, vc = cache.kv("layer0")
    qkv = torch.randn(64, 3072, device=DEV, dtype=torch.bfloat16)
    pos = torch.randint(0, 4000, (64,), device=DEV)
    blk, slot = torch.randperm(4096, device=DEV)[:64], torch.randint(0, 16, (64,), device=DEV)
    cos, sin = rope_tables(GPU_MODEL, pos, torch.bfloat16, fast._rope)
    q, k = fz.rope_store(qkv, cos, sin, (32, 8, 64), kc, vc, blk, slot, want_k=True)
    wq = apply_rope(qkv[:, :2048].view(64, 32, 64), cos, sin)
    wk = apply_rope(qkv[:, 2048:2560].view(64, 8, 64), cos, sin)
    out["rope_k_mismatches_of"] = [int((k != wk).sum()), k.numel()]
    out["rope_q_mismatches_of"] = [int((q != wq).sum()), q.numel()]
    out["rope_q_max_abs_diff"] = float((q.float() - wq.float()).abs().max())
    out["rope_k_in_cache_equal_returned_k"] = bool(torch.equal(kc[blk, slot], k))
    out["v_in_cache_equal"] = bool(torch.equal(vc[blk, slot], qkv[:, 2560:].view(64, 8, 64)))
    prompt = [random.Random(0).randrange(32000) for _ in range(200)]
    a = generate_monolithic(fast, prompt, 32, block_size=BLOCK_SIZE)
    b = generate_monolithic(plain, prompt, 32, block_size=BLOCK_SIZE)
    out["greedy_32_common_prefix"] = next(
        (i for i, (u, v) in enumerate(zip(a, b, strict=True)) if u != v), 32
    )


def steps(models: dict, rows: list) -> None:
    context = 300
    pages = -(-(context + 64) // BLOCK_SIZE)
    cache = allocate_cache(models["fused"], "nhd", 64 * pages + 1, BLOCK_SIZE)
    for name, model in models.items():
        state = BatchState(64, pages, model.device, pad_block=64 * pages)
        step = DecodeStep(model, cache, state, cuda_graphs=True)
        step.capture()
        for b in (1, 8, 64):
            n = 50
            ms = timed_steps(step, state, b, context, pages, n)
            graph = step.graphs[b][(False, 0)]  # the whole greedy step
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(n):
                graph.replay()
            e1.record()
            torch.cuda.synchronize()
            rows.append({"what": "decode_step", "model": name, "batch": b, "step_ms": round(ms, 3),
                         "replay_gpu_ms": round(e0.elapsed_time(e1) / n, 3)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)


def _forward_only(model, cache, varlen: bool) -> PrefillBatcher:
    """A batcher without its thread: only ``_forward`` is called (``varlen``: one varlen
    call per layer when every chunk starts its prompt)."""
    pb = PrefillBatcher.__new__(PrefillBatcher)
    pb.model, pb.cache, pb.varlen = model, cache, varlen
    return pb


def varlen_vs_sdpa(model, cache, rng: random.Random, rows: list) -> None:
    """The same packed forward (prompts of different lengths) with one varlen call per
    layer and with one SDPA call per prompt: last-token logits and their argmax."""
    lens = [rng.randint(100, 400) for _ in range(12)]
    plan, nxt = [], 0
    for n in lens:
        need = -(-n // BLOCK_SIZE)
        job = _Job([rng.randrange(32000) for _ in range(n)], list(range(nxt, nxt + need)))
        plan.append((job, n))
        nxt += need
    out = {}
    for varlen in (False, True):
        pb = _forward_only(model, cache, varlen)
        out[varlen] = torch.stack(pb._forward(plan)).float()
    a, b = out[False], out[True]
    rows.append({"what": "prefill_varlen_vs_sdpa", "prompts": len(lens),
                 "varlen_ran": pb.varlen,  # False: the call failed, both rows used SDPA
                 "max_abs_logit_diff": round(float((a - b).abs().max()), 4),
                 "logit_scale": round(float(a.abs().max()), 2),
                 "argmax_equal": int((a.argmax(-1) == b.argmax(-1)).sum())})  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)


def prefills(models: dict, rows: list) -> None:
    rng = random.Random(1)
    cache = allocate_cache(models["fused"], "nhd", 512, BLOCK_SIZE)
    runs = [(name, model, False) for name, model in models.items()]
    runs.append(("fused+varlen", models["fused"], True))
    for name, model, varlen in runs:
        pb = _forward_only(model, cache, varlen)
        for nprompt, plen in ((16, 256), (1, 256), (4, 1024)):
            need = -(-plen // BLOCK_SIZE)
            plan = [
                (
                    _Job(
                        [rng.randrange(32000) for _ in range(plen)],
                        list(range(i * need, (i + 1) * need)),
                    ),
                    plen,
                )
                for i in range(nprompt)
            ]
            for _ in range(2):
                pb._forward(plan)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                pb._forward(plan)
            torch.cuda.synchronize()
            rows.append({"what": "prefill", "model": name, "varlen": pb.varlen,
                         "prompts": nprompt, "len": plen,
                         "ms": round(1e3 * (time.perf_counter() - t0) / 5, 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    varlen_vs_sdpa(models["fused"], cache, rng, rows)
    keep = pbm.SDPA_BACKENDS
    for label, backends, varlen in (
        ("no_cudnn", keep, False),
        ("cudnn_allowed", [pbm.SDPBackend.CUDNN_ATTENTION, *keep], False),
        ("varlen", keep, True),
    ):
        pbm.SDPA_BACKENDS = backends
        pb = _forward_only(models["fused"], cache, varlen)
        ms = []
        for length in range(201, 301, 10):  # a new prompt length each time
            plan = [(_Job([rng.randrange(32000) for _ in range(length)], list(range(20))), length)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pb._forward(plan)
            torch.cuda.synchronize()
            ms.append(round(1e3 * (time.perf_counter() - t0), 1))
        rows.append({"what": "prefill_new_lengths", "sdpa": label, "varlen": pb.varlen, "ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    pbm.SDPA_BACKENDS = keep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--prefill-only", action="store_true", help="skip the exactness checks "
                    "and the decode steps")  # fmt: skip
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    w = _weights(GPU_MODEL, "bfloat16", DEV)
    models = {"fused": LlamaModel(GPU_MODEL, w), "torch_ops": LlamaModel(GPU_MODEL, w, fused=False)}
    checks: dict = {}
    rows: list = []
    if not args.prefill_only:
        exactness(models["fused"], models["torch_ops"], checks)
        print(json.dumps(checks), flush=True)
        steps(models, rows)
    prefills(models, rows)
    if args.json:
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"env": env, "checks": checks, "rows": rows},
                                              indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving throughput: closed-loop clients against a prefill and a decode daemon.

A prefill daemon (``packed`` layout) and a decode daemon (``nhd``) run as separate
processes on loopback. At each concurrency C, C client threads each send
``--requests`` Generate calls one after the other (closed loop; random prompts of
``--prompt-len`` +- 25 % tokens, ``--max-new`` new tokens, greedy). Reported per
level: aggregate generated tokens/s, time to first token (TTFT) and inter-token
latency (ITL) p50/p99, and how many requests' tokens equal the monolithic run of the
same weights in this process (``generate_monolithic``). When ``transformers`` is
importable, its ``generate`` on the same weights at batch C is the baseline
(``hf_tok_s``, greedy, equal-length prompts, no early stop).

    .venv/bin/python bench/serve.py --quick --json        # CPU, < 3 min
    python bench/serve.py --gpu --out bench/results/serve_h200.json

``--json`` prints one JSON object as the last line: the concurrency-8 row with
``tok_s_single`` (concurrency 1 of the same run) and the totals.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import torch
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, generate_monolithic
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

BLOCK_SIZE = 16
# the 1.1 B Llama the H200 targets were set for
GPU_MODEL = ModelConfig(
    num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8, head_dim=64,
    intermediate_size=8192, vocab_size=32000,
)  # fmt: skip
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def one_request(
    stub, rid: str, prompt: list[int], max_new: int, timeout: float, verify: bool = False
) -> dict:
    """One Generate; ``verify``: the daemon checks the pulled KV against the prefill's
    checksum (a mismatch fails the request with DATA_LOSS)."""
    t0 = time.perf_counter()
    stamps, tokens, itl, info = [], [], [], pb.TransferInfo()
    request = pb.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, max_new_tokens=max_new, verify_kv=verify
    )
    for msg in stub.Generate(request, timeout=timeout):
        if msg.HasField("transfer"):
            info = msg.transfer
        if msg.token_ids:
            now = time.perf_counter()
            if stamps:  # a message may carry several tokens: the gap is shared by them
                n = len(msg.token_ids)
                itl += [(now - stamps[-1]) / n] * n
            stamps.append(now)
            tokens.extend(msg.token_ids)
    return {
        "tokens": tokens,
        "ttft": stamps[0] - t0,
        "itl": itl,
        "prefill": info.prefill_seconds,
        "pull": info.transfer_seconds,
        "path": f"{info.engine or '?'}/{info.direction or '?'}",
        "verified": bool(verify and info.kv_checksum),
        "seconds": time.perf_counter() - t0,
    }


def run_level(target: str, c: int, n_req: int, args, rng: random.Random) -> tuple[dict, list]:
    """C closed-loop clients, ``n_req`` requests each; the row and the (prompt, tokens)."""
    lo, hi = max(1, int(args.prompt_len * 0.75)), max(1, int(args.prompt_len * 1.25))
    prompts = [
        [rng.randrange(args.vocab) for _ in range(rng.randint(lo, hi))] for _ in range(c * n_req)
    ]
    results: list[dict | None] = [None] * len(prompts)
    errors: list[str] = []

    def client(k: int) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.KVBridgeServiceStub(ch)
            for j in range(n_req):
                i = k * n_req + j
                try:
                    verify = args.verify_every > 0 and i % args.verify_every == 0
                    results[i] = one_request(
                        stub, f"c{c}-{i}", prompts[i], args.max_new, 600, verify
                    )
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    gen = sum(len(r["tokens"]) for r in done)
    row = {
        "concurrency": c,
        "requests": len(prompts),
        "errors": len(errors),
        "tok_s": round(gen / wall, 2),
        "ttft_p50_ms": round(1e3 * pct([r["ttft"] for r in done], 0.5), 2),
        "ttft_p99_ms": round(1e3 * pct([r["ttft"] for r in done], 0.99), 2),
        "itl_p50_ms": round(1e3 * pct([x for r in done for x in r["itl"]], 0.5), 3),
        "itl_p99_ms": round(1e3 * pct([x for r in done for x in r["itl"]], 0.99), 3),
        "seconds": round(wall, 2),
        "prefill_p50_ms": round(1e3 * pct([r["prefill"] for r in done], 0.5), 2),
        "pull_p50_ms": round(1e3 * pct([r["pull"] for r in done], 0.5), 2),
        # which engine moved the KV and how (TransferInfo.engine / direction)
        "paths": sorted({r["path"] for r in done}),
        # requests whose pulled KV equalled the prefill's checksum (``--verify-every``)
        "kv_verified": sum(r["verified"] for r in done),
    }
    if errors:
        row["first_error"] = errors[0]
    return row, [(p, r["tokens"] if r else None) for p, r in zip(prompts, results, strict=True)]


def hf_baseline(model: LlamaModel, c: int, args) -> float | None:
    """transformers ``generate`` tokens/s at batch ``c`` on the same weights (None: absent)."""
    try:
        import transformers
    except ImportError:
        return None
    cfg, w = model.cfg, model.w
    hcfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=8192, tie_word_embeddings=False,
    )  # fmt: skip
    if getattr(hf_baseline, "model", None) is None:
        with torch.device(model.device):  # initialised where it runs: fast
            hf = transformers.LlamaForCausalLM(hcfg).to(model.dtype).eval()
        sd = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.norm,
              "lm_head.weight": w.lm_head}  # fmt: skip
        names = {"input_norm": "input_layernorm", "post_norm": "post_attention_layernorm",
                 "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                 "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                 "w_down": "mlp.down_proj"}  # fmt: skip
        for i, lw in enumerate(w.layers):
            for ours, theirs in names.items():
                sd[f"model.layers.{i}.{theirs}.weight"] = getattr(lw, ours)
        hf.load_state_dict(sd, strict=False)
        hf_baseline.model = hf
    hf = hf_baseline.model
    ids = torch.randint(0, cfg.vocab_size, (c, args.prompt_len), device=model.device)
    kw = dict(max_new_tokens=args.max_new, min_new_tokens=args.max_new, do_sample=False,
              pad_token_id=0)  # fmt: skip
    with torch.inference_mode():
        hf.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(ids, **kw)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return round(c * (out.shape[1] - args.prompt_len) / (time.perf_counter() - t0), 2)


def graph_check(device: str) -> dict:
    """In-process: the engine with CUDA graphs vs without vs the monolithic run (fp32,
    a small model, sequences joining mid-run, every third one sampled); how many token
    lists agree (the monolithic run: greedy sequences only)."""
    import queue

    from kvbridge.connector.serving.engine import DecodeEngine, SamplingParams, Sequence
    from kvbridge.connector.serving.model import allocate_cache

    model = LlamaModel.random(ModelConfig(num_layers=2, vocab_size=512), device=device)
    spec = [(5, 40), (33, 12), (1, 25), (70, 30), (12, 3), (9, 33)]
    rng = random.Random(1)
    prompts = [[rng.randrange(512) for _ in range(n)] for n, _ in spec]
    out: dict = {"sequences": len(spec)}
    for graphs in (False, True):
        cache = allocate_cache(model, "packed", 128, BLOCK_SIZE, seed=2)
        eng = DecodeEngine(model, cache, max_batch=8, cuda_graphs=graphs, pad_block=127).start()
        runs, nxt = [], 0
        for i, (p, (_, new)) in enumerate(zip(prompts, spec, strict=True)):
            blocks = list(range(nxt, nxt + -(-(len(p) + new) // BLOCK_SIZE)))
            nxt += len(blocks)
            first = int(model.prefill(p, cache, blocks).argmax())
            q: queue.Queue = queue.Queue()
            sp = SamplingParams(0.8, 0.9, 40, 7 + i) if i % 3 == 2 else SamplingParams()
            seq = Sequence(f"g{i}", blocks, len(p), first, new, frozenset(), sp,
                           emit=lambda t, f, e, q=q: q.put((t, f)))  # fmt: skip
            eng.submit(seq)
            runs.append((seq, q))
            time.sleep(0.005 * i)
        toks = []
        for seq, q in runs:
            got = [seq.first_token]
            while True:
                t, f = q.get(timeout=120)
                got += t
                if f:
                    break
            toks.append(got)
        eng.stop()
        out["graphs" if graphs else "eager"] = toks
        out["captured" if graphs else "eager_steps"] = (
            sorted(eng.step.graphs) if graphs else eng.steps
        )
    mono = [generate_monolithic(model, p, new, block_size=BLOCK_SIZE)
            for p, (_, new) in zip(prompts, spec, strict=True)]  # fmt: skip
    greedy = [i for i in range(len(spec)) if i % 3 != 2]
    out["greedy"] = len(greedy)
    out["eager_match_monolithic"] = sum(out["eager"][i] == mono[i] for i in greedy)
    out["graphs_match_eager"] = sum(
        a == b for a, b in zip(out["graphs"], out["eager"], strict=True)
    )
    del out["graphs"], out["eager"]
    return out


def timed_steps(step, state, b: int, context: int, pages: int, n: int) -> float:
    """Milliseconds per ``step(b)`` (read-back of the next tokens included) over rows of
    ``context`` tokens, row ``r`` in blocks ``[r * pages, (r + 1) * pages)``; positions
    are reset before each step; ``max_len`` as the engine passes it (the CPU path
    attends all rows at once)."""
    for r in range(b):
        state.set_row(r, 1, context, list(range(r * pages, (r + 1) * pages)), (0.0, 1.0, 0, 0))
    for _ in range(3):
        step(b, False, context + 1)
    if state.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        state.positions[:b] = context
        step(b, False, context + 1)
    return 1e3 * (time.perf_counter() - t0) / n


def step_scaling(
    device: str, dtype: str, context: int, mcfg: ModelConfig, batches: tuple[int, ...]
) -> list[dict]:
    """In-process ceiling of the engine: ``DecodeStep`` alone (no daemons, no transfers)
    on the bench model, rows of ``context`` tokens of (random) cache; eager vs graphs
    (CUDA), one torch thread as the daemons (CPU)."""
    from kvbridge.connector.serving.engine.batch_state import BatchState
    from kvbridge.connector.serving.engine.step import DecodeStep
    from kvbridge.connector.serving.model import allocate_cache

    cuda = device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)
    model = LlamaModel(mcfg, _weights(mcfg, dtype, device))
    pages, most = -(-(context + 64) // BLOCK_SIZE), max(batches)
    cache = allocate_cache(model, "nhd", most * pages + 1, BLOCK_SIZE)
    rows = []
    for graphs in (False, True) if cuda else (False,):
        state = BatchState(most, pages, model.device, pad_block=most * pages)
        step = DecodeStep(model, cache, state, cuda_graphs=graphs)
        step.capture()
        for b in batches:
            ms = timed_steps(step, state, b, context, pages, 30 if cuda else 200)
            rows.append({"graphs": graphs, "batch": b, "step_ms": round(ms, 3),
                         "tok_s": round(b * 1e3 / ms, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


PHASES = {"queue": "request_queue_time", "prefill": "request_prefill_time",
          "prefill_call": "request_prefill_call", "transfer": "request_kv_transfer_time",
          "ttft": "time_to_first_token"}  # fmt: skip


def phase_means(m0: dict, m1: dict) -> dict:
    """The decode daemon's mean milliseconds per request phase between two scrapes."""
    out = {}
    for short, name in PHASES.items():
        key = f"kvbridge_{name}_seconds"
        n = m1.get(f"{key}_count", 0) - m0.get(f"{key}_count", 0)
        if n:
            out[short] = round(1e3 * (m1[f"{key}_sum"] - m0.get(f"{key}_sum", 0)) / n, 2)
    return out


def first_difference(model: LlamaModel, prompt: list[int], got: list[int], want: list[int]):
    """Where the daemon's tokens leave the monolithic run, and the monolithic logits'
    margin there (its token's logit minus the daemon's): a margin near 0 is a near-tie
    that a different batch size's rounding can flip, a large one is a wrong result."""
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if at is None:  # one is a prefix of the other (a stop token, or a short stream)
        return {"at": min(len(got), len(want)), "got_len": len(got), "want_len": len(want)}
    seen: list[torch.Tensor] = []  # the monolithic run again, up to token ``at``
    generate_monolithic(model, prompt, at + 1, block_size=BLOCK_SIZE, on_logits=seen.append)
    top = seen[at].float()
    margin = float(top[want[at]] - top[got[at]])
    return {"at": at, "got": got[at], "want": want[at], "margin": margin,
            "rel_margin": margin / max(float(top.abs().max()), 1e-30)}  # fmt: skip


def model_args(m: ModelConfig) -> list[str]:
    return [
        "--num-layers", str(m.num_layers), "--hidden-size", str(m.hidden_size),
        "--num-heads", str(m.num_heads), "--num-kv-heads", str(m.num_kv_heads),
        "--head-dim", str(m.head_dim), "--intermediate-size", str(m.intermediate_size),
        "--vocab-size", str(m.vocab_size), "--seed", str(m.seed),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, small model, under 3 minutes")
    ap.add_argument("--gpu", action="store_true", help="cuda:0, bf16, the 1.1 B model")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--concurrency", default=None, help="comma list (default 1,8,32[,64])")
    ap.add_argument("--requests", type=int, default=None, help="requests per client")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--max-new", type=int, default=None)
    ap.add_argument("--check", type=int, default=None, help="requests per level checked "
                    "against the monolithic run (default: all on CPU, 4 on GPU)")  # fmt: skip
    ap.add_argument("--verify-every", type=int, default=8, help="every Nth request has "
                    "the decode daemon check the pulled KV's checksum (0: none)")  # fmt: skip
    ap.add_argument("--backend", default="nixl")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--stream-interval", type=int, default=1, help="the decode daemon's "
                    "--stream-interval (tokens per stream message)")  # fmt: skip
    ap.add_argument("--prefill-chunk", type=int, default=0, help="the prefill daemon's "
                    "--prefill-chunk-tokens (0: its default)")  # fmt: skip
    ap.add_argument("--engine-process", default="auto", choices=("auto", "on", "off"),
                    help="the decode daemon's --engine-process")  # fmt: skip
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers generate")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--log-dir", default=None, help="the daemons' logs (default: a temp dir)")
    ap.add_argument(
        "--log-level",
        default="warning",
        help="the daemons' log level ('info' logs each pull's post, wait and finish seconds)",
    )
    ap.add_argument("--step-scaling", action="store_true", help="only the in-process "
                    "DecodeStep timing (bench model; eager vs CUDA graphs), then exit")  # fmt: skip
    ap.add_argument("--graph-check", action="store_true", help="first: the engine with and "
                    "without CUDA graphs vs the monolithic run, in process")  # fmt: skip
    args = ap.parse_args()
    gpu = args.gpu
    device, dtype = ("cuda:0", "bfloat16") if gpu else ("cpu", "float32")
    mcfg = GPU_MODEL if gpu else ModelConfig()
    if args.step_scaling:
        batches = (1, 8, 32, 64) if gpu else (1, 8)
        rows = step_scaling(device, dtype, args.prompt_len or (256 if gpu else 64), mcfg, batches)
        if args.out:
            Path(args.out).write_text(json.dumps({"step_scaling": rows}, indent=1) + "\n")
        return 0
    levels = [int(x) for x in (args.concurrency or ("1,8,32,64" if gpu else "1,8,32")).split(",")]
    per_client = {c: max(2, 32 // c) if not gpu else min(16, max(4, 64 // c)) for c in levels}
    if args.requests:
        per_client = dict.fromkeys(levels, args.requests)
    args.prompt_len = args.prompt_len or (256 if gpu else 32)
    args.max_new = args.max_new or 64
    check = args.check if args.check is not None else (4 if gpu else 1 << 30)
    args.vocab = mcfg.vocab_size
    need = max(levels) * -(-(int(args.prompt_len * 1.25) + args.max_new) // BLOCK_SIZE) + 8
    common = ["--backend", args.backend, "--block-size", str(BLOCK_SIZE), "--num-blocks",
              str(need), "--device", device, "--dtype", dtype, "--grpc-port", "0",
              "--metrics-port", "0", "--insecure", "--max-batch", str(max(levels)),
              "--log-level", args.log_level, *model_args(mcfg)]  # fmt: skip
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="kvbridge-serve-"))
    prefill = DaemonProcess("prefill", [*common, "--side-port", str(free_port()),
                            "--kv-layout", "packed", "--prefill-chunk-tokens",
                            str(args.prefill_chunk)], log_dir, name="prefill")  # fmt: skip
    extra = ["--no-cuda-graphs"] if args.no_cuda_graphs else []
    extra += ["--stream-interval", str(args.stream_interval)]
    extra += ["--engine-process", args.engine_process]
    rng = random.Random(0)
    rows, checked, matched, total = [], 0, 0, 0
    graphs = None
    if args.graph_check:
        try:
            graphs = graph_check(device)
        except Exception as exc:  # reported; the serving levels still run
            graphs = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if graphs is not None:
        print(json.dumps({"graph_check": graphs}), file=sys.stderr, flush=True)
    decode = None
    try:
        prefill.start().wait_ready(600)
        decode = DaemonProcess("decode", [*common, "--side-port", str(free_port()),
                               "--kv-layout", "nhd", "--prefill", prefill.target,
                               "--http-port", "-1", *extra],
                               log_dir, name="decode")  # fmt: skip
        decode.start().wait_ready(600)
        with grpc.insecure_channel(decode.target) as ch:  # warm-up (handshake, kernels)
            one_request(pb_grpc.KVBridgeServiceStub(ch), "warm", [1, 2, 3], 4, 600)
        torch.set_num_threads(1)
        model = LlamaModel(mcfg, _weights(mcfg, dtype, device))
        for c in levels:
            m0 = decode.metrics()
            row, pairs = run_level(decode.target, c, per_client[c], args, rng)
            m1 = decode.metrics()
            n_steps = (
                m1["kvbridge_decode_step_seconds_count"] - m0["kvbridge_decode_step_seconds_count"]
            )
            if n_steps:
                d_sum = (
                    m1["kvbridge_decode_step_seconds_sum"] - m0["kvbridge_decode_step_seconds_sum"]
                )
                d_rows = (
                    m1["kvbridge_decode_step_rows_total"] - m0["kvbridge_decode_step_rows_total"]
                )
                row["step_mean_ms"] = round(1e3 * d_sum / n_steps, 3)
                row["batch_mean"] = round(d_rows / n_steps, 2)
            row["daemon_mean_ms"] = phase_means(m0, m1)
            ok, row["mismatches"] = 0, []
            for p, toks in pairs[:check]:
                want = generate_monolithic(model, p, args.max_new, block_size=BLOCK_SIZE)
                ok += toks == want
                if toks != want and len(row["mismatches"]) < 8:
                    row["mismatches"].append(first_difference(model, p, toks, want))
            row["checked"], row["match_monolithic"] = min(check, len(pairs)), ok
            checked, matched, total = checked + row["checked"], matched + ok, total + len(pairs)
            try:
                row["hf_tok_s"] = None if args.no_baseline else hf_baseline(model, c, args)
            except Exception as exc:  # the baseline must not lose our rows
                row["hf_tok_s"], row["hf_error"] = None, f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for proc in (decode, prefill):
            if proc is not None:
                proc.terminate(30)
    single = next((r["tok_s"] for r in rows if r["concurrency"] == 1), None)
    pick = next((r for r in rows if r["concurrency"] == 8), rows[-1])
    print(f"{'C':>4} {'tok/s':>9} {'hf tok/s':>9} {'TTFT p50/p99 ms':>17} "
          f"{'ITL p50/p99 ms':>15} {'match':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['concurrency']:>4} {r['tok_s']:>9.1f} {r['hf_tok_s'] or 0:>9.1f} "
              f"{r['ttft_p50_ms']:>8.1f}/{r['ttft_p99_ms']:<8.1f} "
              f"{r['itl_p50_ms']:>7.2f}/{r['itl_p99_ms']:<7.2f} "
              f"{r['match_monolithic']:>3}/{r['checked']:<3}")  # fmt: skip
    meta = {"device": device if not gpu else torch.cuda.get_device_name(0), "dtype": dtype,
            "model": mcfg.to_dict(), "prompt_len": args.prompt_len, "max_new": args.max_new,
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "backend": args.backend, "stream_interval": args.stream_interval,
            "engine_process": args.engine_process,
            "prefill_chunk": args.prefill_chunk}  # fmt: skip
    if args.out:
        Path(args.out).write_text(
            json.dumps({"meta": meta, "graph_check": graphs, "rows": rows}, indent=1) + "\n"
        )
    if args.json:
        summary = {
            "concurrency": pick["concurrency"], "tok_s": pick["tok_s"], "tok_s_single": single,
            "requests": total, "match_monolithic": matched, "checked": checked,
            "ttft_p50_ms": pick["ttft_p50_ms"], "itl_p50_ms": pick["itl_p50_ms"],
            "hf_tok_s": pick["hf_tok_s"], "rows": rows,
        }  # fmt: skip
        print(json.dumps(summary))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def _weights(mcfg: ModelConfig, dtype: str, device: str):
    from kvbridge.connector.serving.model.weights import random_weights

    return random_weights(mcfg, DTYPES[dtype], device)


if __name__ == "__main__":
    sys.exit(main())

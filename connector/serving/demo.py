"""``kvbridge demo``: one prefill and one decode daemon on loopback vs a monolithic run."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request

import grpc
import torch
from kvbridge.connector.serving.client import Generation, describe_transfer, generate
from kvbridge.connector.serving.http.server import EMBEDDED_MODEL_NAME
from kvbridge.connector.serving.model import (
    ByteTokenizer,
    LlamaModel,
    ModelConfig,
    generate_monolithic,
)
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc
from kvbridge.topology.layouts import GQA_LAYOUTS

DEMO_PROMPTS = (
    "The quick brown fox",
    "Disaggregated prefill moves the KV cache to the decode node",
    "Hello, world!",
    "Paged attention reads every block through its real strides, never a copy.",
)
DEMO_NUM_BLOCKS = 128


def start_pair(
    backend: str,
    prefill_layout: str,
    decode_layout: str,
    log_dir: str,
    block_size: int = 16,
    startup_timeout: float = 60.0,
    extra: tuple[str, ...] = (),
) -> tuple[DaemonProcess, DaemonProcess]:
    """Start a prefill and a decode daemon (separate processes, in parallel); wait for both."""
    common = [
        "--backend", backend, "--block-size", str(block_size), "--num-blocks",
        str(DEMO_NUM_BLOCKS), "--metrics-port", "0", "--insecure", *extra,
    ]  # fmt: skip
    prefill_port = free_port()
    prefill = DaemonProcess(
        "prefill",
        [*common, "--kv-layout", prefill_layout, "--grpc-port", str(prefill_port),
         "--side-port", str(free_port())],
        log_dir,
        name="demo-prefill",
    )  # fmt: skip
    decode = DaemonProcess(
        "decode",
        [*common, "--kv-layout", decode_layout, "--grpc-port", "0", "--side-port",
         str(free_port()), "--prefill", f"127.0.0.1:{prefill_port}"],
        log_dir,
        name="demo-decode",
    )  # fmt: skip
    try:
        prefill.start()
        decode.start()
        prefill.wait_ready(startup_timeout)
        decode.wait_ready(startup_timeout)
    except BaseException:
        prefill.terminate(10)
        decode.terminate(10)
        raise
    return prefill, decode


def http_request(decode: DaemonProcess, prompt: str, max_tokens: int, want: str) -> bool:
    """One request to the decode daemon's OpenAI-compatible HTTP API (what ``curl`` sends)."""
    body = {"model": EMBEDDED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens}
    req = urllib.request.Request(
        f"{decode.http_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())
    text, usage = out["choices"][0]["text"], out["usage"]
    same = text == want
    print(
        f"HTTP POST {decode.http_url}/v1/completions {json.dumps(body)}\n"
        f"    text {text!r}, usage {usage}: "
        f"{'same text as Generate' if same else 'DIFFERENT text from Generate'}",
        flush=True,
    )
    return same


def run_demo(args: argparse.Namespace) -> int:
    for layout in (args.prefill_layout, args.decode_layout):
        if layout not in GQA_LAYOUTS:
            print(
                f"kvbridge demo: layout {layout!r} is not one of {', '.join(GQA_LAYOUTS)}",
                file=sys.stderr,
            )
            return 2
    prompts = tuple(args.prompt or DEMO_PROMPTS)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="kvbridge-demo-")
    t_start = time.perf_counter()
    print(
        f"kvbridge demo: backend {args.backend}, prefill layout {args.prefill_layout}, "
        f"decode layout {args.decode_layout}, logs in {log_dir}",
        flush=True,
    )
    torch.set_num_threads(1)  # as the daemons (--torch-threads 1): tiny ops, busy cores
    model = LlamaModel.random(ModelConfig())  # the daemons' default model (same seed)
    tok = ByteTokenizer(model.cfg.vocab_size)
    prefill = decode = None
    matches, results, http_ok, first_text = 0, [], False, ""
    try:
        prefill, decode = start_pair(
            args.backend,
            args.prefill_layout,
            args.decode_layout,
            log_dir,
            args.block_size,
            args.startup_timeout,
        )
        print(
            f"daemons up in {time.perf_counter() - t_start:.1f}s: prefill {prefill.target}, "
            f"decode {decode.target}",
            flush=True,
        )
        with grpc.insecure_channel(decode.target) as ch:
            stub = pb_grpc.KVBridgeServiceStub(ch)
            for i, prompt in enumerate(prompts):
                gen: Generation = generate(
                    stub, prompt=prompt, max_new_tokens=args.max_new_tokens, request_id=f"demo-{i}"
                )
                ref = generate_monolithic(
                    model,
                    tok.encode(prompt),
                    args.max_new_tokens,
                    layout="nhd",
                    block_size=args.block_size,
                )
                ok = gen.token_ids == ref
                first_text = gen.text if i == 0 else first_text
                matches += ok
                results.append(ok)
                print(
                    f"[{i}] {prompt!r}\n    tokens     {gen.token_ids}\n"
                    f"    monolithic {ref} {'MATCH' if ok else 'MISMATCH'}\n"
                    f"    transfer   {describe_transfer(gen.transfer)}",
                    flush=True,
                )
            http_ok = http_request(decode, prompts[0], args.max_new_tokens, first_text)
            stats = stub.Stats(pb.StatsRequest(), timeout=10)
        c = stats.counters
        print(
            f"decode stats: {c.requests_done} done, {c.requests_failed} failed, "
            f"{c.transfers} transfers, "
            f"{c.bytes_transferred} B, {c.descriptors} descriptors, {c.tokens_generated} tokens",
            flush=True,
        )
    except (grpc.RpcError, RuntimeError, TimeoutError, OSError) as exc:
        detail = (
            f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        )
        print(f"kvbridge demo: failed: {detail}", file=sys.stderr)
        for d in (prefill, decode):
            if d is not None:
                print(f"--- {d.name} log ---\n{d.log_tail()}", file=sys.stderr)
    finally:
        codes = {d.name: d.terminate(30) for d in (prefill, decode) if d is not None}
        if codes:
            print(f"daemons stopped (exit codes {codes})", flush=True)
        if args.log_dir is None and all(results) and len(results) == len(prompts):
            shutil.rmtree(log_dir, ignore_errors=True)
    print(f"total {time.perf_counter() - t_start:.1f}s")
    print(f"{matches}/{len(prompts)} requests match monolithic", flush=True)
    clean_exit = all(code == 0 for code in codes.values())
    return 0 if matches == len(prompts) and http_ok and clean_exit else 1

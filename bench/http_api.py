"""HTTP API overhead: the same streamed requests over gRPC Generate and over the
OpenAI-compatible HTTP API (the ``openai`` client), against one pair of daemons.

A prefill and a decode daemon run as processes on loopback (the default model);
``--requests`` prompts are sent one after the other, alternating the two fronts,
each streamed: the client measures time to first token, inter-token latency and
end-to-end latency. Both fronts must return the same text for every prompt (the
HTTP API is a loopback client of the same Generate). The decode daemon's own
histograms (``/metrics``) are printed too: they see every request, both fronts.

    .venv/bin/python bench/http_api.py                        # 40 requests, 32 tokens, nixl
    .venv/bin/python bench/http_api.py --requests 100 --max-tokens 64 --backend mooncake
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import statistics
import tempfile
import time
from datetime import date

import grpc
from kvbridge.connector.serving.demo import start_pair
from kvbridge.connector.serving.http.server import EMBEDDED_MODEL_NAME
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "kv", "blocks")


def _grpc(stub, prompt: str, n: int) -> tuple[str, list[float]]:
    t0, times, text = time.perf_counter(), [], ""
    req = pb.GenerateRequest(prompt=prompt, max_new_tokens=n)
    for msg in stub.Generate(req, timeout=120):
        if msg.token_ids:
            times.append(time.perf_counter() - t0)
            text += msg.text
    return text, times


def _http(client, prompt: str, n: int) -> tuple[str, list[float]]:
    t0, times, text = time.perf_counter(), [], ""
    stream = client.completions.create(
        model=EMBEDDED_MODEL_NAME, prompt=prompt, max_tokens=n, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter() - t0)
            text += chunk.choices[0].text
    return text, times


def _summary(name: str, runs: list[list[float]]) -> dict[str, float]:
    ttft = [t[0] for t in runs]
    itl = [b - a for t in runs for a, b in itertools.pairwise(t)]
    e2e = [t[-1] for t in runs]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1e3
    out = {"ttft_p50": q(ttft, 50), "ttft_p90": q(ttft, 90), "itl_p50": q(itl, 50),
           "itl_p90": q(itl, 90), "e2e_p50": q(e2e, 50)}  # fmt: skip
    print(f"{name:5s} " + "  ".join(f"{k} {v:7.2f} ms" for k, v in out.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--backend", default="nixl")
    args = ap.parse_args(argv)
    import openai

    log_dir = tempfile.mkdtemp(prefix="kvbridge-bench-http-")
    prefill, decode = start_pair(args.backend, "packed", "nhd", log_dir)
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(4, 40))) for _ in range(args.requests)]
    runs: dict[str, list[list[float]]] = {"grpc": [], "http": []}
    mismatches = 0
    try:
        client = openai.OpenAI(base_url=decode.http_url + "/v1", api_key="x", max_retries=0)
        with grpc.insecure_channel(decode.target) as ch:
            stub = pb_grpc.KVBridgeServiceStub(ch)
            _grpc(stub, "warm up", 4)
            _http(client, "warm up", 4)
            for i, p in enumerate(prompts):
                order = ("grpc", "http") if i % 2 == 0 else ("http", "grpc")
                texts = {}
                for front in order:
                    fn = _grpc if front == "grpc" else _http
                    texts[front], times = fn(stub if front == "grpc" else client, p,
                                             args.max_tokens)  # fmt: skip
                    runs[front].append(times)
                mismatches += texts["grpc"] != texts["http"]
        print(f"kvbridge bench http_api: {date.today()}, {platform.node()}, {platform.processor()},"
              f" backend {args.backend}, {args.requests} requests x {args.max_tokens} tokens,"
              f" streamed, client-side times", flush=True)  # fmt: skip
        g, h = _summary("grpc", runs["grpc"]), _summary("http", runs["http"])
        print("http - grpc: " + "  ".join(f"{k} {h[k] - g[k]:+.2f} ms" for k in g), flush=True)
        m = decode.metrics()
        for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency",
                     "request_queue_time", "request_prefill_time", "request_kv_transfer_time",
                     "request_handshake_time"):  # fmt: skip
            s, c = m[f"kvbridge_{name}_seconds_sum"], m[f"kvbridge_{name}_seconds_count"]
            print(f"daemon {name:24s} mean {s / c * 1e3:8.3f} ms over {int(c)}", flush=True)
        print(f"text mismatches between the fronts: {mismatches}", flush=True)
    finally:
        for d in (decode, prefill):
            d.terminate(30)
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

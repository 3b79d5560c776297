"""Open streams vs the control plane: health, Stats and Release latency while N
``Generate`` streams are open on one decode daemon.

A prefill and a decode daemon (NIXL by default) run as processes on loopback; the
decode daemon admits ``--streams`` generations (``--max-requests``). All of them are
opened (long generations, the client reading nothing), then health checks, Stats and
Release (of unknown ids: nothing is aborted) are timed ``--probes`` times each; one
stream more must be refused with RESOURCE_EXHAUSTED.

    .venv/bin/python bench/open_streams.py --streams 250
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

LAYOUTS = {"nixl": ("packed", "nhd"), "mooncake": ("interleaved", "hnd")}


def _ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": round(1e3 * statistics.median(xs), 1),
            "p99_ms": round(1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 1),
            "max_ms": round(1e3 * xs[-1], 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=250)
    ap.add_argument("--probes", type=int, default=50)
    ap.add_argument("--backend", choices=sorted(LAYOUTS), default="nixl")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="kvbridge-streams-")
    # long enough to outlast the probes: the decode engine generates whether or not a
    # client reads (tokens queue per stream), so short streams would end first
    new_tokens = 4000
    common = ["--backend", args.backend, "--insecure", "--grpc-port", "0", "--metrics-port",
              "0", "--block-size", "16"]  # fmt: skip
    pl, dl = LAYOUTS[args.backend]
    prefill = DaemonProcess(
        "prefill", [*common, "--kv-layout", pl, "--side-port", str(free_port())], tmp, "streams-p"
    ).start()
    prefill.wait_ready(90)
    blocks = args.streams * (1 + (16 + new_tokens + 15) // 16) + 64
    decode = DaemonProcess("decode", [*common, "--kv-layout", dl, "--side-port", str(free_port()),
                                      "--prefill", prefill.target, "--max-requests",
                                      str(args.streams), "--num-blocks", str(blocks)],
                           tmp, "streams-d").start()  # fmt: skip
    decode.wait_ready(90)
    chans = [decode.channel() for _ in range(8)]
    stubs = [pb_grpc.KVBridgeServiceStub(c) for c in chans]
    ids = list(range(1, 17))
    streams, out = [], {}
    try:
        t0 = time.monotonic()
        for i in range(args.streams):
            req = pb.GenerateRequest(prompt_token_ids=ids, max_new_tokens=new_tokens)
            streams.append(stubs[i % 8].Generate(req, timeout=600))
        seen = stubs[0].Stats(pb.StatsRequest(include_finished=True), timeout=30).requests
        while len(seen) < args.streams:  # finished ones count: never wait forever
            time.sleep(0.1)
            seen = stubs[0].Stats(pb.StatsRequest(include_finished=True), timeout=30).requests
        out["seconds_to_open_all"] = round(time.monotonic() - t0, 2)
        try:
            next(
                iter(
                    stubs[1].Generate(
                        pb.GenerateRequest(prompt_token_ids=ids, max_new_tokens=4), timeout=30
                    )
                )
            )
            out["one_more"] = "served"
        except grpc.RpcError as exc:
            out["one_more"] = exc.code().name
        health = health_pb2_grpc.HealthStub(chans[2])
        times: dict[str, list[float]] = {"health": [], "stats": [], "release": []}
        calls = {
            "health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10),
            "stats": lambda: stubs[3].Stats(pb.StatsRequest(), timeout=10),
            "release": lambda: stubs[4].Release(pb.ReleaseRequest(request_id="none"),
                                                timeout=10),
        }  # fmt: skip
        for _ in range(args.probes):
            for what, call in calls.items():
                t = time.perf_counter()
                call()
                times[what].append(time.perf_counter() - t)
            time.sleep(0.02)
        live = len(stubs[0].Stats(pb.StatsRequest(), timeout=30).requests)
        out.update({k: _ms(v) for k, v in times.items()})
        out["streams_open_after"] = live
    finally:
        for s in streams:
            s.cancel()
        for c in chans:
            c.close()
        codes = [p.terminate(60) for p in (decode, prefill)]
    summary = {"backend": args.backend, "streams": args.streams, "probes": args.probes, **out,
               "exit_codes": codes}  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0 if out.get("one_more") == "RESOURCE_EXHAUSTED" and codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Soak: many concurrent Generate requests of mixed lengths against real daemons.

Two prefill daemons (different KV layouts) and one decode daemon (a third layout)
run as separate processes on loopback. ``--concurrency`` clients send Generate
for ``--seconds``, each request with ``verify_kv`` (the decode daemon checks the
received KV against the prefill's checksum; a mismatch is a corrupt transfer).
After the load, every request's tokens are checked against the monolithic run of
the same model in this process (the baseline: its requests/s are reported with
the ratio), the daemons drain, and Stats must show no block held anywhere.
Resident memory of every daemon is sampled (psutil) throughout.

    .venv/bin/python bench/soak.py                       # 20 s, nixl
    .venv/bin/python bench/soak.py --seconds 120 --backend mooncake --plot bench/out/soak.png
    .venv/bin/python bench/soak.py --secure              # mutual TLS + token + signed side channel
    .venv/bin/python bench/soak.py --churn --seconds 60  # cancelling clients, killed peers

``--churn``: a share of the requests (``--cancel-rate``) get a short random deadline
(they count as cancelled when they run out, and the tokens they streamed must be a
prefix of the right ones); every ``--kill-every`` seconds a prefill daemon is
SIGKILLed and restarted under the same name and addresses; once, one is SIGSTOPped
for ``--stop-seconds``. The decode daemon's health is checked every 0.1 s throughout
(p99 reported); it calls its peers with ``--request-timeout 3``.

Exit code 0 only with zero corrupt transfers, zero wrong tokens and zero leaked
(or quarantined) blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import grpc
import psutil
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbridge.connector.serving.client import generate
from kvbridge.connector.serving.daemon.security import ClientAuth
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, generate_monolithic
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc
from tqdm import tqdm

LAYOUTS = {"nixl": ("packed", "hnd", "nhd"), "mooncake": ("interleaved", "kv_outer", "head_groups")}
BLOCK_SIZE = 16


def _auth(tmp: Path, secure: bool) -> tuple[list[str], ClientAuth]:
    if not secure:
        return ["--insecure"], ClientAuth()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))
    from certs import TestCA, secret_file

    ca = TestCA(tmp)
    leaf = ca.leaf("soak")
    token, side = secret_file(tmp / "token"), secret_file(tmp / "side", 48)
    flags = ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key), "--tls-ca", str(ca.path),
             "--auth-token-file", str(token), "--side-secret-file", str(side)]  # fmt: skip
    return flags, ClientAuth.from_files(str(ca.path), str(leaf.cert), str(leaf.key), str(token))


def start(args, tmp: Path) -> tuple[list[DaemonProcess], DaemonProcess, ClientAuth]:
    auth, client = _auth(tmp, args.secure)
    common = ["--backend", args.backend, "--num-blocks", str(args.num_blocks), "--block-size",
              str(BLOCK_SIZE), "--grpc-port", "0", "--metrics-port", "0", "--lease-seconds",
              str(args.lease), "--transfer-timeout", "10", "--guard-bytes", "4096",
              *auth]  # fmt: skip
    if args.churn:  # a killed Mooncake pull's blocks stay quarantined this long
        common += ["--engine-drain-seconds", "5"]
    p_layouts = LAYOUTS[args.backend][:2]
    prefills = [  # fixed ports: a restarted prefill daemon comes back at the same address
        DaemonProcess("prefill", [*common, "--kv-layout", lay, "--side-port", str(free_port()),
                                  "--grpc-port", str(free_port())],
                      tmp / f"p{i}-0", f"soak-p{i}", client=client).start()
        for i, lay in enumerate(p_layouts)
    ]  # fmt: skip
    for p in prefills:
        p.wait_ready(90)
    targets = [a for p in prefills for a in ("--prefill", p.target)]
    extra = ["--request-timeout", "3"] if args.churn else []
    decode = DaemonProcess(
        "decode", [*common, "--kv-layout", LAYOUTS[args.backend][2], "--side-port",
                   str(free_port()), *targets, *extra], tmp, "soak-d", client=client,
    ).start()  # fmt: skip
    decode.wait_ready(90)
    return prefills, decode, client


class Load:
    """Closed-loop clients; every outcome recorded."""

    def __init__(self, stub, args, vocab: int) -> None:
        self.stub, self.args, self.vocab = stub, args, vocab
        self.done: list[dict] = []
        self.errors: dict[str, int] = {}
        self.cancelled: list[dict] = []  # ran out of their short deadline (--churn)
        self.corrupt = 0
        self.lock = threading.Lock()

    def one(self, rng: random.Random) -> None:
        n_prompt = rng.randint(1, self.args.max_prompt)
        ids = [rng.randrange(1, self.vocab) for _ in range(n_prompt)]
        n_new = rng.randint(1, self.args.max_new)
        cancel = self.args.churn and rng.random() < self.args.cancel_rate
        timeout = rng.uniform(0.02, 0.5) if cancel else 120
        streamed: list[int] = []
        t0 = time.perf_counter()
        try:
            g = generate(self.stub, prompt_token_ids=ids, max_new_tokens=n_new, timeout=timeout,
                         verify_kv=True, on_tokens=lambda t, _: streamed.extend(t))  # fmt: skip
        except grpc.RpcError as exc:
            with self.lock:
                if cancel and exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                             grpc.StatusCode.CANCELLED):  # fmt: skip
                    self.cancelled.append({"ids": ids, "n": n_new, "tokens": streamed})
                    return
                key = exc.code().name
                self.errors[key] = self.errors.get(key, 0) + 1
                self.corrupt += exc.code() == grpc.StatusCode.DATA_LOSS
            return
        with self.lock:
            seconds = time.perf_counter() - t0
            self.done.append({"ids": ids, "n": n_new, "tokens": g.token_ids,
                              "seconds": seconds, "bytes": g.transfer.bytes})  # fmt: skip

    def run(self, seconds: float, concurrency: int, seed: int) -> float:
        stop = time.monotonic() + seconds

        def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < stop:
                self.one(rng)

        threads = [threading.Thread(target=client, args=(i,), daemon=True)
                   for i in range(concurrency)]  # fmt: skip
        t0 = time.monotonic()
        for t in threads:
            t.start()
        with tqdm(total=int(seconds), desc="soak", unit="s") as bar:
            while time.monotonic() < stop:
                time.sleep(1.0)
                bar.update(1)
                bar.set_postfix(ok=len(self.done), errors=sum(self.errors.values()))
        for t in threads:
            t.join(150)
        return time.monotonic() - t0


class Churn:
    """Kills and restarts prefill daemons, stops one for a while, times health checks."""

    def __init__(self, prefills: list[DaemonProcess], decode: DaemonProcess, client, args):
        self.prefills, self.decode, self.client, self.args = prefills, decode, client, args
        self.stop = threading.Event()
        self.kills = self.restarts = self.stops = 0
        self.health: list[float] = []  # seconds per check
        self.health_failures: dict[str, int] = {}
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._churn, self._health)]  # fmt: skip

    def start(self) -> Churn:
        for t in self.threads:
            t.start()
        return self

    def _restart(self, i: int) -> None:
        old = self.prefills[i]
        old.kill()
        self.kills += 1
        args = [a for a in old.cmd[old.cmd.index(old.role) + 1 :]]
        skip = {"--host", "--engine-name", "--ready-file"}  # DaemonProcess adds them again
        keep = [a for j, a in enumerate(args) if a not in skip and args[j - 1] not in skip]
        new = DaemonProcess("prefill", keep, old.log_dir.parent / f"p{i}-{self.kills}",
                            old.name, client=self.client).start()  # fmt: skip
        new.wait_ready(90)
        self.prefills[i] = new
        self.restarts += 1

    def _churn(self) -> None:
        rng = random.Random(self.args.seed)
        stop_at = self.args.seconds / 3
        t0 = time.monotonic()
        while not self.stop.wait(self.args.kill_every):
            i = rng.randrange(len(self.prefills))
            if self.stops == 0 and time.monotonic() - t0 >= stop_at:
                pid = self.prefills[i].proc.pid
                os.kill(pid, signal.SIGSTOP)
                self.stops += 1
                self.stop.wait(self.args.stop_seconds)
                os.kill(pid, signal.SIGCONT)
                continue
            self._restart(i)

    def _health(self) -> None:
        with self.client.channel(self.decode.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not self.stop.wait(0.1):
                t0 = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.RpcError as exc:
                    key = exc.code().name
                    self.health_failures[key] = self.health_failures.get(key, 0) + 1
                self.health.append(time.perf_counter() - t0)

    def close(self) -> dict:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        lat = sorted(self.health) or [0.0]
        return {"prefill_kills": self.kills, "prefill_restarts": self.restarts,
                "prefill_stops": self.stops, "health_checks": len(self.health),
                "health_failures": self.health_failures,
                "health_p50_ms": round(1e3 * statistics.median(lat), 1),
                "health_p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
                "health_max_ms": round(1e3 * lat[-1], 1)}  # fmt: skip


def sample_rss(procs: list[DaemonProcess], out: dict, stop: threading.Event, every: float) -> None:
    handles = {p.name: psutil.Process(p.proc.pid) for p in procs}
    t0 = time.monotonic()
    while not stop.is_set():
        for name, h in handles.items():
            with contextlib.suppress(psutil.Error):
                rss = h.memory_info().rss  # 0: killed (--churn), not yet reaped
                if rss:
                    out.setdefault(name, []).append((time.monotonic() - t0, rss))
        stop.wait(every)


def leaked(prefills, decode, client, wait: float) -> tuple[dict[str, int], dict[str, int]]:
    """Blocks still held once everything drained (bounded wait), and guard-band damage."""
    deadline = time.monotonic() + wait
    while True:
        held, guard = {}, {}
        for p in [*prefills, decode]:
            with client.channel(p.target) as ch:
                s = pb_grpc.KVBridgeServiceStub(ch).Stats(pb.StatsRequest(), timeout=10)
            held[p.name] = s.blocks_in_use + s.leased_blocks + s.quarantined_blocks
            guard[p.name] = s.guard_band_bytes_changed
        if not any(held.values()) or time.monotonic() > deadline:
            return held, guard
        time.sleep(0.2)


def check_tokens(
    done: list[dict], limit: int, cancelled: list[dict] = ()
) -> tuple[int, int, float, int]:
    """(checked, wrong, monolithic requests/s, wrong streamed prefixes of cancelled
    requests) against the in-process model."""
    torch.set_num_threads(1)  # as the daemons (--torch-threads 1)
    model = LlamaModel.random(ModelConfig())
    sample = done if limit <= 0 else done[:limit]
    wrong, t0 = 0, time.perf_counter()
    for r in tqdm(sample, desc="reference", unit="req"):
        want = generate_monolithic(model, r["ids"], r["n"], block_size=BLOCK_SIZE)
        wrong += want != r["tokens"]
    secs = time.perf_counter() - t0
    bad_prefix = 0
    for r in (c for c in cancelled if c["tokens"]):
        want = generate_monolithic(model, r["ids"], len(r["tokens"]), block_size=BLOCK_SIZE)
        bad_prefix += want != r["tokens"]
    return len(sample), wrong, len(sample) / secs if secs else 0.0, bad_prefix


def _rss_summary(pts: list[tuple[float, int]]) -> dict[str, float]:
    """Start / max / end RSS (MiB) and the growth over the second half of the run."""
    mib = [(t, b / 2**20) for t, b in pts]
    half = next((b for t, b in mib if t >= mib[-1][0] / 2), mib[0][1])
    return {"start_mib": round(mib[0][1], 1), "max_mib": round(max(b for _, b in mib), 1),
            "end_mib": round(mib[-1][1], 1),
            "second_half_growth_mib": round(mib[-1][1] - half, 1)}  # fmt: skip


def plot(rss: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, pts in rss.items():
        ax.plot([t for t, _ in pts], [b / 2**20 for _, b in pts], label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("kvbridge soak: daemon resident memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--backend", choices=sorted(LAYOUTS), default="nixl")
    ap.add_argument("--num-blocks", type=int, default=256)
    ap.add_argument("--max-prompt", type=int, default=200, help="longest prompt (tokens)")
    ap.add_argument("--max-new", type=int, default=12)
    ap.add_argument("--lease", type=float, default=10.0)
    ap.add_argument("--secure", action="store_true", help="mutual TLS, token, signed side channel")
    ap.add_argument("--check-tokens", type=int, default=0, help="requests checked (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="PNG of resident memory over time")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument(
        "--churn",
        action="store_true",
        help="cancelling clients, prefill daemons killed/restarted and stopped",
    )
    ap.add_argument("--cancel-rate", type=float, default=0.25)
    ap.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    ap.add_argument("--stop-seconds", type=float, default=5.0, help="SIGSTOP of one prefill")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="kvbridge-soak-"))
    prefills, decode, client = start(args, tmp)
    procs = [*prefills, decode]
    rss: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(procs, rss, stop, 0.5), daemon=True)
    sampler.start()
    churn, churned = None, {}
    try:
        with client.channel(decode.target) as ch:
            load = Load(pb_grpc.KVBridgeServiceStub(ch), args, ModelConfig().vocab_size)
            churn = Churn(prefills, decode, client, args).start() if args.churn else None
            elapsed = load.run(args.seconds, args.concurrency, args.seed)
            churned = churn.close() if churn else {}
        held, guard = leaked(prefills, decode, client, args.lease + 10)
        stop.set()
        sampler.join(5)
    finally:
        if churn is not None:
            churn.stop.set()
            for p in prefills:  # one may still be stopped
                with contextlib.suppress(OSError):
                    os.kill(p.proc.pid, signal.SIGCONT)
        codes = {p.name: p.terminate(60) for p in [*prefills, decode]}
    checked, wrong, mono_rps, bad_prefix = check_tokens(
        load.done, args.check_tokens, load.cancelled
    )
    lat = sorted(r["seconds"] for r in load.done) or [0.0]
    rps = len(load.done) / elapsed
    mem = {n: _rss_summary(pts) for n, pts in rss.items() if pts}
    summary = {
        "date": str(date.today()), "machine": f"{platform.node()} ({psutil.cpu_count()} cpus)",
        "backend": args.backend, "secure": args.secure, "seconds": round(elapsed, 1),
        "concurrency": args.concurrency, "requests_ok": len(load.done),
        "requests_failed": load.errors, "requests_per_s": round(rps, 2),
        "p50_ms": round(1e3 * statistics.median(lat), 1),
        "p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
        "kv_bytes": sum(r["bytes"] for r in load.done),
        "corrupt_transfers": load.corrupt, "tokens_checked": checked, "tokens_wrong": wrong,
        "monolithic_requests_per_s": round(mono_rps, 2),
        "ratio_vs_monolithic": round(rps / mono_rps, 3) if mono_rps else None,
        "leaked_blocks": held, "guard_band_bytes_changed": guard, "rss": mem,
        "exit_codes": codes,
    }  # fmt: skip
    if args.churn:
        summary["churn"] = {
            **churned, "requests_cancelled": len(load.cancelled),
            "cancelled_streamed_prefixes_checked": sum(bool(c["tokens"]) for c in load.cancelled),
            "cancelled_streamed_prefixes_wrong": bad_prefix,
        }  # fmt: skip
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.plot:
        plot(rss, args.plot)
    bad = load.corrupt or wrong or bad_prefix or any(held.values()) or any(guard.values())
    bad = bad or any(codes.values())
    return 1 if bad or not load.done else 0


if __name__ == "__main__":
    sys.exit(main())

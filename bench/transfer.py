"""Transfer benchmark: coalesced plans vs one descriptor per block, vs memcpy.

A Llama-3-8B-like cache (32 layers, 8 KV heads, head dim 128, bf16, blocks of 16
tokens, packed K/V) lives in two processes: a holder (prefill) and this process
(decode), which pulls requests of 2k and 16k tokens through each engine:

* **coalesced**: ``KVTransferAgent.read_blocks`` (plan, post, wait, notify);
* **baseline**: the same bytes as one descriptor per (layer, K or V, block), the
  scheme vLLM used before coalescing, through the same engine (NIXL: lists
  prepared once per peer and indexed per request, as vLLM does; Mooncake: batch
  transfers of those descriptors);
* **memcpy**: one thread copying the same number of bytes in this process
  (``ctypes.memmove``), the limit on this machine. It runs interleaved with the
  transfers (one copy after each coalesced/baseline pair), so a machine whose load
  changes during the run moves the reference with the transfers.

Every figure is the median over ``--repeats`` with its min and max. The engines' own
logs are quieted to ``--engine-log-level`` (default error) while the progress bar runs.

Run: ``python bench/transfer.py [--quick] [--json] [--plot out.png]`` or
``kvbridge bench transfer ...`` (the same script). ``--json`` makes the last line a JSON
object (see ``_summary``); ``--plot`` draws GB/s per request size with min-max bars.
Results are recorded in bench/README.md ("Transfer").
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nixl_prepped
from kvbridge.connector.transfer.transport import BACKENDS

MODEL = dict(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)
SRC_START, DST_START = 3, 7  # requests use blocks [3, 3+n) of the holder, [7, 7+n) here


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated engines (registry names)"
    )
    p.add_argument("--tokens", default="2048,16384", help="request sizes in tokens")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--quick", action="store_true", help="2k tokens, 3 repeats (< 1 minute)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--plot", default=None, help="draw the result into this image (matplotlib)")
    p.add_argument(
        "--engine-log-level",
        default="error",
        choices=("debug", "info", "warning", "error"),
        help="log level of the transfer engines (UCX/NIXL, Mooncake) during the run",
    )
    p.add_argument("--layout", default="packed", help="cache layout (kvbridge.topology.layouts)")
    p.add_argument("--layers", type=int, default=MODEL["num_layers"])
    p.add_argument("--kv-heads", type=int, default=MODEL["num_kv_heads"])
    p.add_argument("--head-dim", type=int, default=MODEL["head_dim"])
    p.add_argument("--block-size", type=int, default=MODEL["block_size"])
    p.add_argument("--host", default="127.0.0.1", help="address the holder listens on")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per transfer")
    p.add_argument("--nixl-threads", type=int, default=None, help="UCX backend threads")
    p.add_argument(
        "--nixl-split-bytes",
        type=int,
        default=None,
        help="smallest piece host ranges are cut into (0: never)",
    )


# ---------------------------------------------------------------- holder side
def _cache_kw(args, num_blocks: int) -> dict:
    return dict(
        num_layers=args["layers"],
        num_blocks=num_blocks,
        block_size=args["block_size"],
        num_kv_heads=args["kv_heads"],
        head_dim=args["head_dim"],
    )


def _allocate(layout: str, kw: dict, seed: int):
    import torch
    from kvbridge.topology import layouts

    cache = layouts.allocate(
        layout, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed), **kw
    )
    return cache


def _checksum(cache, topo, ids) -> int:
    """Sum of the 64-bit words of ``ids``' bytes, all layers (order independent of layout)."""
    import torch

    total = 0
    ranges = topo.block_ranges(ids)
    regions = topo.regions
    triples = zip(
        ranges.region.tolist(), ranges.offset.tolist(), ranges.nbytes.tolist(), strict=True
    )
    for r, o, n in triples:
        addr = regions[r].addr + o
        buf = (ctypes.c_uint8 * n).from_address(addr)
        words = torch.frombuffer(buf, dtype=torch.uint8)
        total += int(words.to(torch.int64).sum())
    return total


def _holder(conn, backend: str, layout: str, kw: dict, host: str, opts: dict) -> None:
    from kvbridge.connector import KVTransferAgent

    cache = _allocate(layout, kw, seed=1)
    agent = KVTransferAgent(
        "bench-prefill", cache, backend, host=host, timeout=600, transport_options=opts
    )
    conn.send(agent.side_channel_address)
    while True:
        cmd, arg = conn.recv()
        if cmd == "checksum":
            conn.send(_checksum(cache, agent.topology, arg))
        else:
            break
    agent.close()
    conn.send("bye")


# ---------------------------------------------------------------- reader side
@dataclass
class Measure:
    backend: str
    tokens: int
    nbytes: int = 0
    descriptors: int = 0  # of the plan
    engine_descriptors: int = 0  # handed to the engine
    baseline_descriptors: int = 0
    seconds: list[float] = field(default_factory=list)
    baseline_seconds: list[float] = field(default_factory=list)
    memcpy_seconds: list[float] = field(default_factory=list)  # interleaved with the others
    post: list[float] = field(default_factory=list)  # planning + posting, seconds
    baseline_post: list[float] = field(default_factory=list)

    def spread(self, which: str = "seconds") -> tuple[float, float, float]:
        """GB/s ``(min, median, max)`` over the repeats of ``which`` (a seconds list)."""
        s = getattr(self, which)
        if not s or not self.nbytes:
            return (0.0, 0.0, 0.0)
        rates = sorted(self.nbytes / t / 1e9 for t in s)
        return rates[0], statistics.median(rates), rates[-1]

    @property
    def gbps(self) -> float:
        return self.spread("seconds")[1]

    @property
    def baseline_gbps(self) -> float:
        return self.spread("baseline_seconds")[1]

    @property
    def memcpy_gbps(self) -> float:
        return self.spread("memcpy_seconds")[1]


def per_block_descriptors(topo, num_views: int, ids: np.ndarray):
    """One descriptor per (layer, K or V, block): ``(region, offset, nbytes)`` arrays.

    A block's bytes in each region (one block at a time, never coalesced) are
    split into ``num_views`` equal pieces when a layer keeps K and V in one region
    (packed, interleaved), giving vLLM's per-(layer, K/V, block) sizes and count.
    """
    one = topo.block_ranges([0])
    split = max(1, (num_views * len(topo.spec().layers)) // max(len(one), 1))
    stride = topo.block_ranges([1]).offset - one.offset
    size = one.nbytes // split
    region = np.repeat(one.region, split)
    base = (one.offset[:, None] + np.arange(split) * size[:, None]).reshape(-1)
    step = np.repeat(stride, split)
    nb = np.repeat(size, split)
    reg = np.broadcast_to(region, (ids.size, region.size)).reshape(-1)
    off = (base[None, :] + ids[:, None] * step[None, :]).reshape(-1)
    return (
        reg.astype(np.int64),
        off.astype(np.int64),
        np.broadcast_to(nb, (ids.size, nb.size)).reshape(-1).astype(np.int64),
    )


class Memcpy:
    """One thread's ``memmove`` of ``nbytes`` between two buffers of this process."""

    def __init__(self, nbytes: int) -> None:
        import torch

        self.nbytes = nbytes
        self.src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
        self.dst = torch.empty(nbytes, dtype=torch.uint8).fill_(1)

    def __call__(self, m: Measure) -> None:
        t0 = time.perf_counter()
        ctypes.memmove(self.dst.data_ptr(), self.src.data_ptr(), self.nbytes)
        m.memcpy_seconds.append(time.perf_counter() - t0)


def _prepped(backend: str) -> bool:
    """Whether ``backend``'s baseline uses NIXL-style lists prepared once per peer."""
    return backend == "nixl"


def _transport_options(backend: str, cfg: dict) -> dict:
    if not _prepped(backend):
        return {}
    opts = {"num_threads": cfg.get("nixl_threads"), "split_bytes": cfg.get("nixl_split_bytes")}
    return {k: v for k, v in opts.items() if v is not None}


class _Runner:
    """Timed coalesced and baseline pulls of one request size."""

    def __init__(self, agent, peer, lists, per_block: int, views: int, src, dst, timeout):
        self.agent, self.peer, self.lists, self.timeout = agent, peer, lists, timeout
        self.src, self.dst = src, dst
        self.transport = agent.transport
        if lists is not None:
            k = np.arange(per_block)
            self.r_idx = (src[:, None] * per_block + k).reshape(-1)
            self.l_idx = (dst[:, None] * per_block + k).reshape(-1)
        else:
            self.remote = per_block_descriptors(agent.topology, views, src)
            self.local = per_block_descriptors(agent.topology, views, dst)

    def coalesced(self, m: Measure) -> None:
        t0 = time.perf_counter()
        pending = self.agent.post_read(self.peer, self.src, self.dst)
        t1 = time.perf_counter()
        res = self.agent.finish(pending, self.timeout)
        t2 = time.perf_counter()
        m.nbytes, m.descriptors = res.bytes, res.descriptors
        m.engine_descriptors = res.engine_descriptors
        m.post.append(t1 - t0)
        m.seconds.append(t2 - t0)

    def baseline(self, m: Measure) -> None:
        t0 = time.perf_counter()
        if self.lists is not None:
            x = nixl_prepped.post_indexed(
                self.transport, "READ", self.lists, self.l_idx, self.r_idx
            )
        else:
            (lreg, loff, nb), (rreg, roff, _) = self.local, self.remote
            x = self.transport.post("READ", self.peer.name, lreg, loff, rreg, roff, nb)
        t1 = time.perf_counter()
        self.transport.wait(x, self.timeout)
        t2 = time.perf_counter()
        m.baseline_descriptors = x.engine_descriptors
        m.baseline_post.append(t1 - t0)
        m.baseline_seconds.append(t2 - t0)


def _bench_backend(backend: str, cfg: dict, sizes: list[int], repeats: int, bar) -> list[Measure]:
    from kvbridge.connector import KVTransferAgent

    bs = cfg["block_size"]
    max_blocks = max(-(-t // bs) for t in sizes)
    kw = _cache_kw(cfg, max(SRC_START, DST_START) + max_blocks + 1)
    opts = _transport_options(backend, cfg)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(
        target=_holder, args=(child, backend, cfg["layout"], kw, cfg["host"], opts), daemon=True
    )
    proc.start()
    agent = None
    try:
        if not conn.poll(300):
            raise RuntimeError(f"{backend} holder did not start")
        address = conn.recv()
        cache = _allocate(cfg["layout"], kw, seed=2)
        agent = KVTransferAgent(
            "bench-decode", cache, backend, timeout=cfg["timeout"], transport_options=opts
        )
        peer = agent.connect_to(address)
        views = len(next(iter(cache.layers.values())))
        lists, per_block = None, 0
        if _prepped(backend):  # prepared once per peer, as vLLM does at handshake
            all_ids = np.arange(kw["num_blocks"], dtype=np.int64)
            reg, off, nb = per_block_descriptors(agent.topology, views, all_ids)
            lists = nixl_prepped.prepare_lists(agent.transport, peer.name, reg, off, reg, off, nb)
            per_block = nb.size // all_ids.size
        results = []
        for tokens in sizes:
            n = -(-tokens // bs)
            src = np.arange(SRC_START, SRC_START + n, dtype=np.int64)
            dst = np.arange(DST_START, DST_START + n, dtype=np.int64)
            run = _Runner(agent, peer, lists, per_block, views, src, dst, cfg["timeout"])
            warm = Measure(backend, tokens)
            run.coalesced(warm)  # warm-up, then check the bytes once
            conn.send(("checksum", src))
            if conn.recv() != _checksum(cache, agent.topology, dst):
                raise RuntimeError(f"{backend}: pulled blocks differ from the holder's")
            run.baseline(warm)
            copy = Memcpy(warm.nbytes)
            copy(warm)
            bar.update(1)
            m = Measure(backend, tokens)
            for _ in range(repeats):  # interleaved: the three see the same machine load
                run.coalesced(m)
                run.baseline(m)
                copy(m)
                bar.update(1)
            agent.notifications()  # drop our own bookkeeping
            results.append(m)
        if lists is not None:
            nixl_prepped.release_lists(lists)
        return results
    finally:
        if agent is not None:
            agent.close()
        conn.send(("exit", None))
        if conn.poll(30):
            conn.recv()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def _fmt(spread: tuple[float, float, float]) -> str:
    lo, med, hi = spread
    return f"{med:6.2f} [{lo:5.2f}-{hi:5.2f}]"


def _table(results: list[Measure]) -> str:
    """GB/s as ``median [min-max]`` over the repeats."""
    head = (
        f"{'backend':9} {'tokens':>6} {'MiB':>6} {'plan':>5} {'engine':>6} {'post ms':>7} "
        f"{'GB/s [min-max]':>20} | {'base desc':>9} {'post ms':>7} {'GB/s [min-max]':>20} | "
        f"{'x base':>6} {'memcpy [min-max]':>20} {'%memcpy':>7}"
    )
    lines = [head, "-" * len(head)]
    med = statistics.median
    for m in results:
        ratio = m.gbps / m.baseline_gbps if m.baseline_gbps else float("nan")
        share = 100 * m.gbps / m.memcpy_gbps if m.memcpy_gbps else float("nan")
        lines.append(
            f"{m.backend:9} {m.tokens:6d} {m.nbytes / 2**20:6.0f} {m.descriptors:5d} "
            f"{m.engine_descriptors:6d} {1e3 * med(m.post):7.2f} {_fmt(m.spread()):>20} | "
            f"{m.baseline_descriptors:9d} {1e3 * med(m.baseline_post):7.2f} "
            f"{_fmt(m.spread('baseline_seconds')):>20} | {ratio:6.2f} "
            f"{_fmt(m.spread('memcpy_seconds')):>20} {share:6.0f}%"
        )
    return "\n".join(lines)


def _summary(results: list[Measure]) -> dict:
    """The ``--json`` object, for the largest request measured per backend (medians, with
    ``*_min``/``*_max`` over the repeats)."""
    largest = max((m for m in results), key=lambda m: m.tokens)
    lo, mid, hi = largest.spread("memcpy_seconds")
    out: dict = {
        "memcpy_gbps": round(mid, 3),
        "memcpy_gbps_min": round(lo, 3),
        "memcpy_gbps_max": round(hi, 3),
        "backends": {},
    }
    for m in results:
        best = out["backends"].get(m.backend)
        if best is None or m.tokens >= best["_tokens"]:
            entry = {
                "descriptors": m.engine_descriptors,
                "baseline_descriptors": m.baseline_descriptors,
                "_tokens": m.tokens,
            }
            for key, which in (("gbps", "seconds"), ("baseline_gbps", "baseline_seconds")):
                lo, mid, hi = m.spread(which)
                entry |= {
                    key: round(mid, 3),
                    f"{key}_min": round(lo, 3),
                    f"{key}_max": round(hi, 3),
                }
            out["backends"][m.backend] = entry
    for v in out["backends"].values():
        v.pop("_tokens")
    return out


def plot(results: list[Measure], path: str) -> None:
    """GB/s per request size: coalesced, baseline and memcpy per backend, min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [("coalesced", "seconds", "-o"), ("per-block", "baseline_seconds", "--s")]
    for backend in dict.fromkeys(m.backend for m in results):
        ms = sorted((m for m in results if m.backend == backend), key=lambda m: m.tokens)
        x = [m.tokens for m in ms]
        for label, which, style in series:
            lo, mid, hi = zip(*(m.spread(which) for m in ms), strict=True)
            err = [[a - b for a, b in zip(mid, lo, strict=True)],
                   [b - a for a, b in zip(mid, hi, strict=True)]]  # fmt: skip
            ax.errorbar(x, mid, yerr=err, fmt=style, capsize=3, label=f"{backend} {label}")
    sizes = sorted({m.tokens for m in results})
    pooled = [  # every interleaved copy of that size, whichever backend's run it was in
        Measure("memcpy", t, nbytes=next(m.nbytes for m in results if m.tokens == t),
                memcpy_seconds=[s for m in results if m.tokens == t for s in m.memcpy_seconds])
        for t in sizes
    ]  # fmt: skip
    ax.plot(sizes, [m.memcpy_gbps for m in pooled], ":k", label="memcpy (1 thread)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("request size (tokens)")
    ax.set_ylabel("GB/s (median, min-max over repeats)")
    ax.set_title("KV pull throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _quiet_engines(level: str) -> None:
    """Engine log levels for this process and the holder it spawns (inherits the env)."""
    from kvbridge.connector.serving.daemon.logs import setup_engine_logging

    setup_engine_logging(level)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    sizes = [2048] if args.quick else [int(t) for t in str(args.tokens).split(",") if t]
    repeats = 3 if args.quick else args.repeats
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    cfg = dict(
        layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
        block_size=args.block_size, layout=args.layout, host=args.host, timeout=args.timeout,
        nixl_threads=args.nixl_threads, nixl_split_bytes=args.nixl_split_bytes,
    )  # fmt: skip
    _quiet_engines(args.engine_log_level)
    total = len(backends) * len(sizes) * (repeats + 1)
    results: list[Measure] = []
    with (
        logging_redirect_tqdm(),
        tqdm(total=total, desc="bench transfer", unit="step", disable=None) as bar,
    ):
        for backend in backends:
            bar.set_postfix_str(backend)
            results += _bench_backend(backend, cfg, sizes, repeats, bar)
    print(_table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(_summary(results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

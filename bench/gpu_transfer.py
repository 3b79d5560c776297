"""GPU-to-GPU KV transfer through ``KVTransferAgent``, beside torch's device copy.

A holder process keeps a Llama-3-8B-like packed cache on ``--src-device``; this
process keeps one on ``--dst-device`` (the same GPU works: two processes on
``cuda:0``) and moves requests the way a decode daemon would: it connects (the
agent probes the path both ways), then pulls, or has the holder push when the
probe found reads degraded. ``--backend`` names the network engine (a NIXL wheel
built with CUDA: ``nixl-cu13`` on CUDA 13); ``--local auto`` (the default) lets the
agents use the same-host transport (CUDA IPC) when both offer it, ``--local off``
forces the network engine, ``--backend local`` the local one. Then torch copies the
same number of bytes from ``--src-device`` to ``--dst-device`` in the same run::

    python bench/gpu_transfer.py --tokens 16384 --json
    python bench/gpu_transfer.py --src-device cuda:0 --dst-device cuda:0 --json
    python bench/gpu_transfer.py --dry-run          # CPU only: sizes and plan

The same run also moves the same bytes as one descriptor per (layer, K or V,
block) through the same engine and direction (vLLM's scheme before coalescing),
the baseline. The last line with ``--json``: ``{"nixl_gbps"`` (kvbridge's rate,
whatever the engine), ``"baseline_gbps", "torch_gbps", "ratio", "baseline_ratio",
"bytes", "descriptors", "baseline_descriptors", "engine_descriptors", "tokens",
"devices", "engine", "transport", "direction", "probe_read_gbps",
"probe_write_gbps", "backend", "local"}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SRC_START, DST_START = 3, 7


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layout", default="packed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--src-device", default="cuda:0")
    p.add_argument("--dst-device", default="cuda:1")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--backend", default="nixl", help="network engine (or 'local')")
    p.add_argument("--local", default="auto", choices=("auto", "off"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the plan; no GPU needed")


def cache_kw(args) -> dict:
    n = -(-args.tokens // args.block_size)
    return dict(
        num_layers=args.layers,
        num_blocks=max(SRC_START, DST_START) + n + 1,
        block_size=args.block_size,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
    )


def request_ids(args) -> tuple[np.ndarray, np.ndarray]:
    n = -(-args.tokens // args.block_size)
    return (
        np.arange(SRC_START, SRC_START + n, dtype=np.int64),
        np.arange(DST_START, DST_START + n, dtype=np.int64),
    )


def dry_plan(args) -> dict:
    """Sizes and descriptors of the request, computed on meta tensors (no memory)."""
    import torch
    from kvbridge.topology import TransferPlan, TransferTopology, layouts

    cache = layouts.allocate(args.layout, dtype=torch.bfloat16, device="meta", **cache_kw(args))
    topo = TransferTopology.from_caches(cache.layers)
    src, dst = request_ids(args)
    plan = TransferPlan.between(topo.spec(), topo.spec(), src, dst)
    return {
        "tokens": args.tokens,
        "bytes": plan.total_bytes,
        "descriptors": plan.num_descriptors,
        "regions": len(topo.regions),
        "cache_bytes": sum(r.nbytes for r in topo.regions),
    }


def gpu_problem(devices: tuple[str, ...]) -> str:
    """Why this machine cannot run the benchmark ("" when it can)."""
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available"
    need = 1 + max(int(d.partition(":")[2] or 0) for d in devices)
    if torch.cuda.device_count() < need:
        return f"needs {need} GPUs, found {torch.cuda.device_count()}"
    return ""


def checksum(cache, ids: np.ndarray) -> int:
    """Sum of the bytes of ``ids`` in every view (on the cache's device)."""
    import torch

    idx = torch.as_tensor(ids, device=next(iter(cache.layers.values()))[0].device)
    total = 0
    for views in cache.layers.values():
        for v in views:
            blocks = v.index_select(0, idx)  # a gathered copy of the request, not the cache
            total += int(blocks.contiguous().view(torch.uint8).to(torch.int64).sum())
    return total


def _allocate(layout: str, kw: dict, device: str, seed: int):
    import torch
    from kvbridge.topology import layouts

    gen = torch.Generator(device=device).manual_seed(seed)
    return layouts.allocate(layout, dtype=torch.bfloat16, device=device, generator=gen, **kw)


def _holder(conn, layout: str, kw: dict, device: str, backend: str, local: str) -> None:
    import torch
    from kvbridge.connector import KVTransferAgent

    torch.cuda.set_device(device)
    cache = _allocate(layout, kw, device, seed=1)
    agent = KVTransferAgent("gpu-prefill", cache, backend, timeout=600, local=local)
    torch.cuda.synchronize()  # the random KV is written before anyone reads it
    conn.send(agent.side_channel_address)
    while True:
        cmd, arg = conn.recv()
        if cmd == "checksum":
            conn.send(checksum(cache, arg))
        elif cmd == "push":  # timed pushes of (src, dst) into the peer: seconds each
            src, dst, repeats = arg
            conn.send([agent.write_blocks("gpu-decode", src, dst).seconds
                       for _ in range(repeats)])  # fmt: skip
        elif cmd == "push_baseline":
            conn.send(baseline_seconds(agent, agent.peer("gpu-decode"), *arg, op="WRITE"))
        else:
            break
    agent.close()
    conn.send("bye")


def torch_copy_gbps(nbytes: int, src: str, dst: str, repeats: int) -> float:
    """torch's copy of ``nbytes`` from ``src`` to ``dst`` (synchronised wall time)."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device=src).fill_(3)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    b.copy_(a)  # warm-up (peer access, allocator)
    torch.cuda.synchronize(src)
    torch.cuda.synchronize(dst)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(dst)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def baseline_seconds(agent, peer, remote: np.ndarray, local: np.ndarray, repeats: int,
                     timeout: float, op: str = "READ") -> tuple[list, int]:  # fmt: skip
    """Timed moves of the same bytes, one descriptor per (layer, K or V, block)."""
    from transfer import per_block_descriptors  # bench/transfer.py (this folder)

    views = len(next(iter(agent.topology.spec().layers)).views)
    rreg, roff, nb = per_block_descriptors(agent.topology, views, remote)
    lreg, loff, _ = per_block_descriptors(agent.topology, views, local)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        x = agent.transport.post(op, peer.name, lreg, loff, rreg, roff, nb)
        agent.transport.wait(x, timeout)
        times.append(time.perf_counter() - t0)
    return times[1:], int(nb.size)


def summarize(
    nbytes: int,
    seconds: list[float],
    base: tuple[list, int],
    torch_gbps: float,
    result,
    args,
    path=None,
) -> dict:
    nixl = nbytes / statistics.median(seconds) / 1e9
    base_gbps = nbytes / statistics.median(base[0]) / 1e9
    return {
        "nixl_gbps": round(nixl, 3),
        "baseline_gbps": round(base_gbps, 3),
        "torch_gbps": round(torch_gbps, 3),
        "ratio": round(nixl / torch_gbps, 3) if torch_gbps else None,
        "baseline_ratio": round(nixl / base_gbps, 3),
        "bytes": nbytes,
        "descriptors": result.descriptors,
        "baseline_descriptors": base[1],
        "engine_descriptors": result.engine_descriptors,
        "tokens": args.tokens,
        "devices": f"{args.src_device}->{args.dst_device}",
        "engine": path.engine if path else args.backend,
        "transport": path.transport if path else "",
        "direction": path.direction if path else "READ",
        "probe_read_gbps": round(path.read_bps / 1e9, 3) if path else None,
        "probe_write_gbps": round(path.write_bps / 1e9, 3) if path else None,
        "backend": args.backend,
        "local": args.local,
    }


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        print(json.dumps(dry_plan(args)))
        return 0
    problem = gpu_problem((args.src_device, args.dst_device))
    if problem:
        print(f"gpu_transfer: {problem}", file=sys.stderr)
        return 2
    import torch
    from kvbridge.connector import KVTransferAgent
    from tqdm import tqdm

    kw = cache_kw(args)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(
        target=_holder, args=(child, args.layout, kw, args.src_device, args.backend, args.local)
    )
    proc.start()
    agent = None
    try:
        if not conn.poll(600):
            raise RuntimeError("holder did not start")
        address = conn.recv()
        torch.cuda.set_device(args.dst_device)
        cache = _allocate(args.layout, kw, args.dst_device, seed=2)
        agent = KVTransferAgent(
            "gpu-decode", cache, args.backend, timeout=args.timeout, local=args.local
        )
        peer = agent.connect_to(address)  # handshake and path probe
        path = agent.paths.get(peer.name)
        src, dst = request_ids(args)
        push = agent.direction(peer) == "WRITE"  # the automatic choice, as the daemons make it
        if push:
            conn.send(("push", (src, dst, 1)))  # warm-up
            conn.recv()
            torch.cuda.synchronize()
        else:
            res = agent.read_blocks(peer, src, dst)  # warm-up, then check the bytes
        conn.send(("checksum", src))
        if conn.recv() != checksum(cache, dst):
            raise RuntimeError("moved blocks differ from the holder's")
        if push:
            conn.send(("push", (src, dst, args.repeats)))
            seconds = conn.recv()
            res = None
            conn.send(("push_baseline", (dst, src, args.repeats, args.timeout)))
            base = conn.recv()
        else:
            seconds = []
            for _ in tqdm(range(args.repeats), desc="kvbridge pulls", disable=None):
                res = agent.read_blocks(peer, src, dst)
                seconds.append(res.seconds)
            base = baseline_seconds(agent, peer, src, dst, args.repeats, args.timeout)
        if res is None:  # pushed: the plan's sizes, from a plan of the same request
            from kvbridge.topology import TransferPlan

            plan = TransferPlan.between(peer.spec, agent.spec, src, dst)
            res = argparse.Namespace(bytes=plan.total_bytes, descriptors=plan.num_descriptors,
                                     engine_descriptors=plan.num_descriptors)  # fmt: skip
        torch_gbps = torch_copy_gbps(res.bytes, args.src_device, args.dst_device, args.repeats)
        out = summarize(res.bytes, seconds, base, torch_gbps, res, args, path)
        out["direction"] = "WRITE" if push else "READ"  # what this run used
    finally:
        if agent is not None:
            agent.close()
        conn.send(("exit", None))
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    print(
        f"{out['tokens']} tokens, {out['bytes'] / 2**20:.0f} MiB, {out['devices']}: "
        f"kvbridge {out['engine']} ({out['transport']}, {out['direction']}) "
        f"{out['nixl_gbps']:.1f} GB/s ({out['descriptors']} descriptors), "
        f"per-block baseline {out['baseline_gbps']:.1f} GB/s ({out['baseline_descriptors']} "
        f"descriptors, x{out['baseline_ratio']}), "
        f"torch copy {out['torch_gbps']:.1f} GB/s, ratio {out['ratio']}"
    )
    if args.json:
        print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

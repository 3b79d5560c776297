"""Harness for agent tests: processes hosting agents, and ground truth.

Caches are rebuilt from seeds (``CacheCfg``), so the process that checks a
transfer can regenerate the other side's cache and compute the expected bytes
with torch indexing on the logical views (``kv_apply.expected_copy``), never
from the plan under test. ``PeerProcess`` talks to a spawned process over a pipe
with a bounded wait on every call. Agents live as long as their process (named
by role and geometry, their cache reset in place to a ``CacheCfg`` on reuse):
a Mooncake engine takes about a second to destroy, so tests reuse agents and
the process ends with ``os._exit``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "topology"))

SMALL = dict(num_layers=2, num_blocks=16, block_size=4, num_kv_heads=4, head_dim=8,
             kv_lora_rank=16, rope_dim=8, page_bytes=96)  # fmt: skip


@dataclass(frozen=True)
class CacheCfg:
    """A cache rebuilt identically in any process: layout, sizes, data seed, poison seed."""

    layout: str
    seed: int
    poison: int | None = None
    kw: dict = field(default_factory=lambda: dict(SMALL))

    def build(self):
        import torch
        from kv_apply import poison_
        from kvbridge.topology import layouts

        cache = layouts.allocate(
            self.layout, generator=torch.Generator().manual_seed(self.seed), **self.kw
        )
        if self.poison is not None:
            poison_(cache.layers, self.poison)
        return cache

    def with_(self, **kw) -> CacheCfg:
        return CacheCfg(self.layout, self.seed, self.poison, {**self.kw, **kw})

    def seeded(self, seed: int, poison: int | None = None) -> CacheCfg:
        return CacheCfg(self.layout, seed, poison, self.kw)

    def agent_name(self, role: str, **opts) -> str:
        """A name per role and geometry (data seeds excluded): agents are reused."""
        key = (self.layout, sorted(self.kw.items()), sorted(opts.items()))
        return f"{role}-{self.layout}-{abs(hash(repr(key))) % 10**8}"


def reset_(cache, cfg: CacheCfg) -> None:
    """Overwrite ``cache`` in place with ``cfg``'s data (same geometry)."""
    from kv_apply import distinct_storages

    fresh = cfg.build()
    for mine, new in zip(
        distinct_storages(cache.layers), distinct_storages(fresh.layers), strict=True
    ):
        mine.copy_(new)


def expected_after(dst: CacheCfg, steps):
    """``dst``'s storages after each step ``(src_cfg, src_ids, dst_ids, kw)`` in turn.

    Torch indexing on the logical views of regenerated caches (``expected_copy``).
    """
    from kv_apply import distinct_storages, expected_copy

    cache = dst.build()
    for src, src_ids, dst_ids, kw in steps:
        exp = expected_copy(src.build().layers, cache.layers, src_ids, dst_ids, **kw)
        for mine, new in zip(distinct_storages(cache.layers), exp.values(), strict=True):
            mine.copy_(new)
    return {s.data_ptr(): s for s in distinct_storages(cache.layers)}


def check_storages(layers, expected) -> str:
    """ "" when every byte of every storage matches (by position), else what differs."""
    from kv_apply import distinct_storages

    actual = distinct_storages(layers)
    exp = list(expected.values())
    if len(actual) != len(exp):
        return f"{len(actual)} storages, expected {len(exp)}"
    for i, (a, e) in enumerate(zip(actual, exp, strict=True)):
        if not bool((a == e).all()):
            bad = (a != e).nonzero().flatten()
            return f"storage {i}: {bad.numel()} of {a.numel()} bytes differ, first at {int(bad[0])}"
    return ""


# ----------------------------------------------------------------- the process
def _serve(conn, backend: str, host: str) -> None:
    from kvbridge.connector import KVTransferAgent

    agents, caches = {}, {}
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        try:
            if cmd == "agent":  # create, or reset an existing one to cfg's data
                name, cfg, opts = args
                if name in agents:
                    reset_(caches[name], cfg)
                else:
                    caches[name] = cfg.build()
                    agents[name] = KVTransferAgent(name, caches[name], backend, host=host, **opts)
                agents[name].notifications()  # drop stale notices
                out = (agents[name].side_channel_address, agents[name].metadata())
            elif cmd == "connect":  # handshake unless already connected to that peer
                name, address, peer_name, timeout = args
                if peer_name not in agents[name].peers:
                    agents[name].connect_to(address, timeout)
                out = peer_name
            elif cmd == "notice":
                name, request_id, timeout = args
                n = agents[name].wait_notice(request_id, timeout)
                out = (n.request_id, n.status, n.op, n.sender, n.nbytes)
            elif cmd == "paths":  # the probe's report of one peer (a dict) or None
                import dataclasses

                name, peer_name = args
                report = agents[name].paths.get(peer_name)
                out = dataclasses.asdict(report) if report is not None else None
            elif cmd == "rejected":
                out = list(agents[args].rejected)
            elif cmd == "verify":  # this process's cache against expected transfers
                name, mine, steps = args
                out = check_storages(caches[name].layers, expected_after(mine, steps))
            elif cmd == "unchanged":  # this process's cache still equals its config
                name, mine = args
                from kv_apply import clone_storages

                out = check_storages(caches[name].layers, clone_storages(mine.build().layers))
            elif cmd == "read":
                name, peer, r_ids, l_ids, kw = args
                res = agents[name].read_blocks(peer, r_ids, l_ids, **kw)
                out = (res.bytes, res.descriptors, res.staged)
            elif cmd == "read_many":  # post every read, then wait for each
                name, reads = args
                agent = agents[name]
                posted = [agent.post_read(p, r, lo, **kw) for p, r, lo, kw in reads]
                out = [(x.bytes, x.descriptors, x.staged) for x in map(agent.finish, posted)]
            elif cmd == "write":
                name, peer, l_ids, r_ids, kw = args
                res = agents[name].write_blocks(peer, l_ids, r_ids, **kw)
                out = (res.bytes, res.descriptors, res.staged)
            elif cmd == "close":
                agents.pop(args).close()
                caches.pop(args)
                out = None
            elif cmd == "exit":  # skip engine teardown (about 1 s per Mooncake engine)
                conn.send(("ok", None))
                os._exit(0)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", out))
        except Exception as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    os._exit(0)


class PeerProcess:
    """A spawned process hosting agents of one backend; every call has a timeout."""

    def __init__(self, backend: str, host: str = "127.0.0.1", env: dict | None = None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, backend, host), daemon=True)
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})  # the child inherits the environment at start
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self.backend = backend

    def call(self, cmd: str, *args, timeout: float = 60.0):
        self.conn.send((cmd, args if len(args) != 1 else args[0]))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer process did not answer {cmd!r} within {timeout} s")
        status, out = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"peer process failed {cmd!r}: {out}")
        return out

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(TimeoutError, RuntimeError, OSError):
                self.call("exit", timeout=20)
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ------------------------------------------------------------ test-side helpers
_requests = iter(range(1 << 62))


def prepare(proc: PeerProcess, role: str, cfg: CacheCfg, **opts) -> tuple[str, str]:
    """``(agent name, side-channel address)`` of ``role``'s agent over ``cfg`` in ``proc``."""
    name = cfg.agent_name(role, **opts)
    address, _ = proc.call("agent", name, cfg, opts)
    return name, address


def link(proc: PeerProcess, name: str, peer_name: str, peer_address: str) -> None:
    proc.call("connect", name, peer_address, peer_name, 10.0)


def pull(a, a_cfg, b, b_cfg, src_ids, dst_ids, *, a_opts=None, b_opts=None, kw=None, truth=None):
    """``a`` reads ``src_ids`` of ``b``'s cache into ``dst_ids``; returns the result.

    Checks, in ``a``'s process, every byte of ``a``'s cache against torch truth
    (``truth``: head/token keywords of ``expected_copy``), that ``b`` got the
    completion notice and that ``b``'s cache is unchanged.
    """
    a_name, _ = prepare(a, "A", a_cfg, **(a_opts or {}))
    b_name, b_addr = prepare(b, "B", b_cfg, **(b_opts or {}))
    link(a, a_name, b_name, b_addr)
    rid = f"pull-{next(_requests)}"
    nbytes, descriptors, staged = a.call(
        "read", a_name, b_name, src_ids, dst_ids, {"request_id": rid, "timeout": 20, **(kw or {})}
    )
    problem = a.call("verify", a_name, a_cfg, [(b_cfg, src_ids, dst_ids, truth or {})])
    assert problem == "", f"pulled cache differs from torch truth: {problem}"
    _, status, op, sender, _got = b.call("notice", b_name, rid, 10.0)
    assert (status, op, sender) == ("done", "READ", a_name)
    assert b.call("unchanged", b_name, b_cfg) == "", "a pull modified the holder's cache"
    return nbytes, descriptors, staged


def push(a, a_cfg, b, b_cfg, src_ids, dst_ids, *, a_opts=None, b_opts=None, kw=None, truth=None):
    """``a`` writes its ``src_ids`` into ``b``'s ``dst_ids``; ``b`` checks every byte."""
    a_name, _ = prepare(a, "A", a_cfg, **(a_opts or {}))
    b_name, b_addr = prepare(b, "B", b_cfg, **(b_opts or {}))
    link(a, a_name, b_name, b_addr)
    rid = f"push-{next(_requests)}"
    nbytes, descriptors, staged = a.call(
        "write", a_name, b_name, src_ids, dst_ids, {"request_id": rid, "timeout": 20, **(kw or {})}
    )
    _, status, op, sender, _ = b.call("notice", b_name, rid, 10.0)
    assert (status, op, sender) == ("done", "WRITE", a_name)
    problem = b.call("verify", b_name, b_cfg, [(a_cfg, src_ids, dst_ids, truth or {})])
    assert problem == "", f"pushed cache differs from torch truth: {problem}"
    assert a.call("unchanged", a_name, a_cfg) == "", "a push modified the source cache"
    return nbytes, descriptors, staged

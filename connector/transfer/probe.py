"""The path probe: a small test transfer both ways when an agent connects to a peer.

Each agent registers a scratch buffer on its cache's device (``probe_bytes``, a
few MiB on a GPU, less on the host) and offers it in its hello. The connecting
side then writes its scratch into the peer's and reads the peer's into its own
(best of up to ``PROBE_REPEATS`` each; all of it within a third of the connecting
request's time, at most ``PROBE_TIMEOUT``, half per direction), and records per
peer which direction works, at what rate, and what the engine says its path is.

A direction is *degraded* when it failed or ran below ``warn_fraction`` of the
expected rate (``expected_bandwidth`` when given, else the better direction): an
engine that emulates reads over TCP is slow, not broken, and nothing else would
say so. Requests then prefer the other direction (``PathReport.direction``):
the reader asks the holder to push.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from kvbridge.connector.transfer.errors import TransferError
from kvbridge.connector.transfer.transport import MemRegion, Transport

log = logging.getLogger(__name__)

#: Scratch bytes per device kind (``probe_bytes=None``).
DEFAULT_PROBE_BYTES = {"cuda": 4 << 20, "cpu": 1 << 20}
PROBE_REPEATS = 3
PROBE_TIMEOUT = 5.0
OPS = ("READ", "WRITE")


@dataclass(frozen=True)
class PathReport:
    """What the probe found for one peer (rates in bytes per second, 0 when failed)."""

    peer: str
    engine: str  # the transport that carries this peer ("nixl", "mooncake", "local")
    transport: str  # what the engine says about the path (where it can tell)
    nbytes: int
    read_bps: float
    write_bps: float
    read_error: str = ""
    write_error: str = ""
    direction: str = "READ"  # what a pull between the two should use
    degraded: tuple[str, ...] = ()
    expected_bps: float = 0.0
    seconds: float = 0.0
    probed_unix: float = field(default_factory=time.time)

    def rate(self, op: str) -> float:
        return self.read_bps if op == "READ" else self.write_bps

    def error(self, op: str) -> str:
        return self.read_error if op == "READ" else self.write_error


def choose_direction(read_bps: float, write_bps: float, read_error: str, write_error: str,
                     fraction: float) -> str:  # fmt: skip
    """``"WRITE"`` (the holder pushes) when reads fail or run below ``fraction`` of writes."""
    if write_error:
        return "READ"
    if read_error or read_bps < fraction * write_bps:
        return "WRITE"
    return "READ"


class ProbeScratch:
    """The registered scratch buffer of one agent."""

    def __init__(self, transport: Transport, device: str, nbytes: int):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.tensor.fill_(0x5A)
        self.nbytes, self.device = nbytes, str(self.tensor.device)
        self.region = transport.register_region(
            MemRegion(self.tensor.data_ptr(), nbytes, self.device)
        )

    @property
    def addr(self) -> int:
        return self.tensor.data_ptr()


def make_scratch(transport: Transport, device: str, nbytes: int | None) -> ProbeScratch | None:
    """The agent's scratch (``nbytes`` None: ``DEFAULT_PROBE_BYTES`` of the device; 0: none)."""
    if nbytes is None:
        nbytes = DEFAULT_PROBE_BYTES["cuda" if device.startswith("cuda") else "cpu"]
    return ProbeScratch(transport, device, int(nbytes)) if nbytes > 0 else None


def hello_fields(scratch: ProbeScratch | None) -> dict:
    """The ``AgentHello`` fields that offer ``scratch`` to peers."""
    if scratch is None:
        return {}
    return {"probe_addr": scratch.addr, "probe_bytes": scratch.nbytes,
            "probe_device": scratch.device}  # fmt: skip


def measure(
    transport: Transport, peer: str, op: str, local: int, remote: int, nbytes: int,
    repeats: int = PROBE_REPEATS, timeout: float = PROBE_TIMEOUT, lock=None,
) -> tuple[float, str]:  # fmt: skip
    """Best rate of up to ``repeats`` transfers of ``nbytes`` between the two scratch
    regions, all within ``timeout`` seconds (``lock`` is held while posting): the
    first transfer may use all of it, later ones only what is left."""
    best, deadline = 0.0, time.perf_counter() + timeout
    for _ in range(repeats):
        t0 = time.perf_counter()
        if best and t0 >= deadline:
            break  # a rate is known; no time for another sample
        try:
            with lock or contextlib.nullcontext():
                x = transport.post(op, peer, [local], [0], [remote], [0], [nbytes])
            transport.wait(x, max(deadline - t0, 1e-3))
        except TransferError as exc:
            if best:
                break  # a later sample ran out of time: keep the rate measured
            return 0.0, f"{type(exc).__name__}: {exc}"[:300]
        best = max(best, nbytes / max(time.perf_counter() - t0, 1e-9))
    return best, ""


def probe(
    transport: Transport, scratch: ProbeScratch, peer: str, remote_region: int, *,
    engine: str, warn_fraction: float, expected_bps: float = 0.0,
    repeats: int = PROBE_REPEATS, timeout: float = PROBE_TIMEOUT, lock=None,
) -> PathReport:  # fmt: skip
    """Probe both directions with ``peer`` within ``timeout`` seconds in all (half each)
    and log a warning for a degraded one."""
    t0 = time.perf_counter()
    nbytes, each = scratch.nbytes, timeout / len(OPS)
    rates, errors = {}, {}
    for op in OPS:
        rates[op], errors[op] = measure(
            transport, peer, op, scratch.region, remote_region, nbytes, repeats, each, lock
        )
    expected = expected_bps or max(rates.values())
    degraded = tuple(
        op for op in OPS if errors[op] or (expected > 0 and rates[op] < warn_fraction * expected)
    )
    report = PathReport(
        peer=peer, engine=engine, transport=transport.path_info(peer), nbytes=nbytes,
        read_bps=rates["READ"], write_bps=rates["WRITE"],
        read_error=errors["READ"], write_error=errors["WRITE"],
        direction=choose_direction(rates["READ"], rates["WRITE"], errors["READ"],
                                   errors["WRITE"], warn_fraction),
        degraded=degraded, expected_bps=expected, seconds=time.perf_counter() - t0,
    )  # fmt: skip
    for op in degraded:
        log.warning(
            "path to peer %s is degraded: %s %s (%s, %.3g GB/s against %.3g GB/s expected); "
            "requests with it use %s",
            peer, op, "failed" if errors[op] else "runs slow", report.transport,
            rates[op] / 1e9, expected / 1e9, report.direction,
        )  # fmt: skip
    return report

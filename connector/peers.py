"""Peers of an agent: validating a hello, and the head ranges two TP ranks share.

Compatibility is checked on both sides of a handshake with the same function,
so an incompatible pair gets the same clear reason on each side.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbridge.topology import HeadRange, LayoutError, TopologySpec

from .errors import IncompatiblePeerError
from .metadata import WIRE_VERSION, AgentHello
from .transport import MemRegion

#: Destination heads ``[dst_start, dst_start + num)`` get source heads ``[src_start, ...)``
#: (the topology's head range, under the connector's public name).
HeadMap = HeadRange


@dataclass(frozen=True)
class Peer:
    """A connected peer: its hello, decoded topology and tensor-parallel position."""

    name: str
    hello: AgentHello
    spec: TopologySpec

    @property
    def tp_rank(self) -> int:
        return self.hello.tp_rank

    @property
    def tp_size(self) -> int:
        return self.hello.tp_size

    @property
    def side_channel(self) -> str:
        return self.hello.side_channel

    @property
    def regions(self) -> list[MemRegion]:
        return [MemRegion(r.addr, r.nbytes, r.device) for r in self.spec.regions]


def kv_heads(spec: TopologySpec) -> int | None:
    """KV heads per rank (dim 2 of the 4-D views), ``None`` without 4-D views."""
    heads = {v.shape[2] for layer in spec.layers for v in layer.views if len(v.shape) == 4}
    if len(heads) > 1:
        raise IncompatiblePeerError(f"views disagree on the number of KV heads: {sorted(heads)}")
    return heads.pop() if heads else None


def _describe_compat(spec: TopologySpec) -> dict[str, tuple]:
    return {
        layer.name: tuple((v.dtype, len(v.shape), v.shape[-1]) for v in layer.views)
        for layer in spec.layers
    }


def compat_difference(ours: TopologySpec, theirs: TopologySpec) -> str:
    """What differs between two specs' compatibility keys (for error messages)."""
    a, b = _describe_compat(ours), _describe_compat(theirs)
    if list(a) != list(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only_a or only_b:
            return f"layers differ (only ours: {only_a[:4]}, only theirs: {only_b[:4]})"
        return "layers are in a different order"
    for name in a:
        if a[name] != b[name]:
            return (
                f"layer {name!r}: ours has views (dtype, rank, last dim) {list(a[name])}, "
                f"theirs {list(b[name])}"
            )
    return "compatibility hashes differ"


def validate_hello(
    hello: AgentHello,
    *,
    name: str,
    backend: str,
    spec: TopologySpec,
    tp_rank: int,
    tp_size: int,
) -> TopologySpec:
    """The peer's decoded spec, or ``IncompatiblePeerError`` saying why we refuse it."""
    who = f"peer {hello.agent_name!r}"
    if hello.version != WIRE_VERSION:  # a nested hello carries its own version
        raise IncompatiblePeerError(
            f"{who} speaks kvbridge wire version {hello.version}, this agent {WIRE_VERSION}"
        )
    if not hello.agent_name:
        raise IncompatiblePeerError("peer sent an empty agent name")
    if hello.agent_name == name:
        raise IncompatiblePeerError(f"{who} has this agent's own name; agent names must be unique")
    if hello.backend != backend:
        raise IncompatiblePeerError(
            f"{who} uses the {hello.backend!r} backend, this agent uses {backend!r}"
        )
    if not 0 <= hello.tp_rank < hello.tp_size:
        raise IncompatiblePeerError(
            f"{who}: bad tensor-parallel rank {hello.tp_rank}/{hello.tp_size}"
        )
    try:
        theirs = TopologySpec.decode(hello.topology)
    except LayoutError as exc:
        raise IncompatiblePeerError(f"{who} sent an invalid topology spec: {exc}") from None
    if theirs.compat_hash != hello.compat_hash or theirs.layout_hash != hello.layout_hash:
        raise IncompatiblePeerError(f"{who}: hashes in its hello do not match its topology spec")
    if theirs.compat_hash != spec.compat_hash:
        raise IncompatiblePeerError(
            f"{who} has an incompatible KV cache (compat hash {theirs.compat_hash[:12]} vs ours "
            f"{spec.compat_hash[:12]}): {compat_difference(spec, theirs)}"
        )
    ours_h, theirs_h = kv_heads(spec), kv_heads(theirs)
    if ours_h is not None and theirs_h is not None:
        total_ours, total_theirs = ours_h * tp_size, theirs_h * hello.tp_size
        if total_ours != total_theirs:
            raise IncompatiblePeerError(
                f"{who} holds {theirs_h} KV heads x TP {hello.tp_size} = {total_theirs} heads, "
                f"this agent {ours_h} x TP {tp_size} = {total_ours}"
            )
    return theirs


def head_map(
    src: TopologySpec, src_rank: int, dst: TopologySpec, dst_rank: int, peer: str
) -> HeadMap:
    """The heads a destination rank receives from a source rank (global head numbering).

    Rank ``r`` of a TP group whose ranks hold ``H`` heads each holds global heads
    ``[r * H, (r + 1) * H)``; the transfer moves the overlap of the two ranges.
    """
    hs, hd = kv_heads(src), kv_heads(dst)
    if hs is None or hd is None:
        return HeadMap()  # no head dim (MLA latent, state pages): replicated per rank
    lo = max(src_rank * hs, dst_rank * hd)
    hi = min((src_rank + 1) * hs, (dst_rank + 1) * hd)
    if lo >= hi:
        raise IncompatiblePeerError(
            f"peer {peer!r}: source rank {src_rank} holds heads [{src_rank * hs}, "
            f"{(src_rank + 1) * hs}), destination rank {dst_rank} holds "
            f"[{dst_rank * hd}, {(dst_rank + 1) * hd}); they share no head"
        )
    if hs == hd and src_rank == dst_rank:
        return HeadMap()
    return HeadMap(lo - src_rank * hs, lo - dst_rank * hd, hi - lo)

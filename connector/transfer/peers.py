"""Peers of an agent: validating a hello (head ranges: ``tp_mapping``).

Compatibility is checked on both sides of a handshake with the same function,
so an incompatible pair gets the same clear reason on each side.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbridge.connector.transfer.errors import IncompatiblePeerError
from kvbridge.connector.transfer.metadata import WIRE_VERSION, AgentHello
from kvbridge.connector.transfer.tp_mapping import PeerHeads
from kvbridge.connector.transfer.transport import MemRegion
from kvbridge.topology import LayoutError, TopologySpec


@dataclass(frozen=True)
class Peer:
    """A connected peer: its hello, decoded topology and tensor-parallel position."""

    name: str
    hello: AgentHello
    spec: TopologySpec
    heads: PeerHeads  # mapped once, at handshake (tp_mapping.map_peer)

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
    def instance_id(self) -> str:
        """The peer agent's random id: another value under the same name is a restart."""
        return self.hello.instance_id

    @property
    def regions(self) -> list[MemRegion]:
        """Its registered regions: the topology's, then the probe scratch (if offered)."""
        out = [MemRegion(r.addr, r.nbytes, r.device) for r in self.spec.regions]
        if self.hello.probe_bytes > 0:
            h = self.hello
            out.append(MemRegion(h.probe_addr, h.probe_bytes, h.probe_device or "cpu"))
        return out

    @property
    def probe_region(self) -> int | None:
        """Index of the peer's probe scratch among ``regions`` (``None``: it has none)."""
        return len(self.spec.regions) if self.hello.probe_bytes > 0 else None


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
    return theirs

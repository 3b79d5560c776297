"""Tensor-parallel head mapping between two agents, computed once per peer.

Rank ``r`` of a TP group of size ``tp`` over ``total`` KV heads holds:

* sharded heads (``tp <= total``): ``h = total // tp`` heads ``[r * h, (r + 1) * h)``;
* replicated heads (``tp > total``, ``tp % total == 0``): one head, ``r // (tp // total)``
  (e.g. TP 16 over 8 KV heads: ranks 2k and 2k+1 both hold head k), as vLLM does.

A transfer between a source and a destination rank moves the overlap of their
ranges. Views without a head dim (MLA latents, state pages) are replicated per
rank and copied whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbridge.connector.transfer.errors import IncompatiblePeerError
from kvbridge.topology import HeadRange, TopologySpec

#: Destination heads ``[dst_start, dst_start + num)`` get source heads ``[src_start, ...)``
#: (the topology's head range, under the connector's public name).
HeadMap = HeadRange


def kv_heads(spec: TopologySpec) -> int | None:
    """KV heads per rank (dim 2 of the 4-D views), ``None`` without 4-D views."""
    heads = {v.shape[2] for layer in spec.layers for v in layer.views if len(v.shape) == 4}
    if len(heads) > 1:
        raise IncompatiblePeerError(f"views disagree on the number of KV heads: {sorted(heads)}")
    return heads.pop() if heads else None


def total_heads(per_rank: int, tp_size: int, declared: int = 0) -> int:
    """The model's KV heads: ``declared`` if given (checked), else ``per_rank * tp_size``."""
    if not declared:
        return per_rank * tp_size
    sharded = declared == per_rank * tp_size
    replicated = per_rank == 1 and tp_size > declared and tp_size % declared == 0
    if not (sharded or replicated):
        raise IncompatiblePeerError(
            f"{per_rank} KV heads per rank at TP {tp_size} cannot hold a model of "
            f"{declared} KV heads (sharded needs {declared} / {tp_size} per rank; replicated "
            f"needs 1 per rank and TP a multiple of {declared})"
        )
    return declared


@dataclass(frozen=True)
class RankHeads:
    """The global KV heads ``[start, start + count)`` one rank holds."""

    start: int
    count: int

    @classmethod
    def of(cls, rank: int, tp_size: int, per_rank: int, total: int) -> RankHeads:
        if per_rank * tp_size == total:
            return cls(rank * per_rank, per_rank)
        return cls(rank // (tp_size // total), 1)  # replicated (checked by total_heads)


def head_map(src: RankHeads, dst: RankHeads, peer: str) -> HeadMap:
    """The heads a destination rank receives from a source rank (local head numbers)."""
    lo = max(src.start, dst.start)
    hi = min(src.start + src.count, dst.start + dst.count)
    if lo >= hi:
        raise IncompatiblePeerError(
            f"peer {peer!r}: source heads [{src.start}, {src.start + src.count}) and destination "
            f"heads [{dst.start}, {dst.start + dst.count}) share no head"
        )
    if src == dst:
        return HeadMap()
    return HeadMap(lo - src.start, lo - dst.start, hi - lo)


@dataclass(frozen=True)
class PeerHeads:
    """The head maps of one peer, both directions, or why it shares no head with us."""

    read: HeadMap | None  # peer -> us
    write: HeadMap | None  # us -> peer
    error: str = ""

    def for_op(self, op: str) -> HeadMap:
        """The map of a ``"READ"`` or ``"WRITE"``; ``IncompatiblePeerError`` if none."""
        m = self.read if op == "READ" else self.write
        if m is None:
            raise IncompatiblePeerError(self.error)
        return m


def map_peer(
    ours: TopologySpec,
    our_rank: int,
    our_tp: int,
    our_total: int,
    theirs: TopologySpec,
    their_rank: int,
    their_tp: int,
    their_total: int,
    peer: str,
) -> PeerHeads:
    """Check that both sides hold the same model's heads and map them, at handshake."""
    ho, ht = kv_heads(ours), kv_heads(theirs)
    if ho is None or ht is None:
        return PeerHeads(HeadMap(), HeadMap())
    t_ours = total_heads(ho, our_tp, our_total)
    t_theirs = total_heads(ht, their_tp, their_total)
    if t_ours != t_theirs:
        raise IncompatiblePeerError(
            f"peer {peer!r} holds {ht} KV heads x TP {their_tp} of a {t_theirs}-head model, "
            f"this agent {ho} x TP {our_tp} of a {t_ours}-head model"
        )
    mine = RankHeads.of(our_rank, our_tp, ho, t_ours)
    other = RankHeads.of(their_rank, their_tp, ht, t_theirs)
    try:
        return PeerHeads(head_map(other, mine, peer), head_map(mine, other, peer))
    except IncompatiblePeerError as exc:
        return PeerHeads(None, None, str(exc))

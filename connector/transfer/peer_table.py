"""The peers of one agent: adding a peer from its hello, refusing it, looking it up.

Both directions of a handshake end here: ``add`` for the hello we received in a
reply (``KVTransferAgent.connect_to``) or were handed (``connect``), ``answer``
for a ``HandshakeRequest`` that reached our side channel. Compatibility is
checked with ``peers.validate_hello``, so both sides give the same reason.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from kvbridge.connector.transfer import metadata as md
from kvbridge.connector.transfer.errors import (
    HandshakeError,
    IncompatiblePeerError,
    UnknownPeerError,
)
from kvbridge.connector.transfer.peers import Peer, validate_hello
from kvbridge.connector.transfer.tp_mapping import map_peer
from kvbridge.connector.transfer.transport import Transport
from kvbridge.topology import TopologySpec, TransferTopology

log = logging.getLogger(__name__)


class PeerTable:
    """Peers of the agent ``name``, each added to ``transport`` under ``transport_lock``.

    ``rejected`` keeps the last 64 ``(peer name, reason)`` of handshakes we refused.
    """

    def __init__(
        self,
        name: str,
        backend: str,
        spec: TopologySpec,
        tp_rank: int,
        tp_size: int,
        transport: Transport,
        transport_lock: threading.RLock,
        total_kv_heads: int = 0,
    ) -> None:
        self.name, self._backend, self._spec = name, backend, spec
        self._tp_rank, self._tp_size, self._total = tp_rank, tp_size, total_kv_heads
        self._transport, self._lock = transport, transport_lock
        self._peers: dict[str, Peer] = {}
        self._topologies: dict[str, TransferTopology] = {}  # for staged reads
        self.rejected: deque[tuple[str, str]] = deque(maxlen=64)

    def add(self, hello: md.AgentHello) -> Peer:
        """Check ``hello`` and make its agent reachable; ``IncompatiblePeerError`` says why not."""
        spec = validate_hello(hello, name=self.name, backend=self._backend, spec=self._spec)
        heads = map_peer(
            self._spec, self._tp_rank, self._tp_size, self._total,
            spec, hello.tp_rank, hello.tp_size, hello.total_kv_heads, hello.agent_name,
        )  # fmt: skip
        peer = Peer(hello.agent_name, hello, spec, heads)
        with self._lock:
            self._transport.add_peer(
                peer.name, hello.engine_metadata, peer.regions, hello.local_metadata
            )
            self._peers[peer.name] = peer
            self._topologies.pop(peer.name, None)
        log.info("agent %s connected to peer %s (tp %d/%d)", self.name, peer.name,
                 peer.tp_rank, peer.tp_size)  # fmt: skip
        return peer

    def answer(self, msg: md.HandshakeRequest, hello: md.AgentHello):
        """Our reply to a handshake request: accept (with our ``hello``) or reject."""
        try:
            self.add(msg.hello)
        except (IncompatiblePeerError, HandshakeError) as exc:
            self.rejected.append((msg.hello.agent_name, str(exc)))
            log.warning("agent %s refused peer %s: %s", self.name, msg.hello.agent_name, exc)
            return md.HandshakeReject(agent_name=self.name, reason=str(exc))
        return md.HandshakeAccept(hello=hello)

    def remove(self, peer: str | Peer) -> None:
        name = peer.name if isinstance(peer, Peer) else peer
        with self._lock:
            if self._peers.pop(name, None) is not None:
                self._topologies.pop(name, None)
                self._transport.remove_peer(name)

    def get(self, peer: str | Peer) -> Peer:
        """The connected peer of that name; ``UnknownPeerError`` if there is none."""
        name = peer.name if isinstance(peer, Peer) else peer
        try:
            return self._peers[name]
        except KeyError:
            raise UnknownPeerError(
                f"agent {self.name!r} has no peer {name!r} (connected: "
                f"{sorted(self._peers) or 'none'}); connect first"
            ) from None

    def snapshot(self) -> dict[str, Peer]:
        return dict(self._peers)

    def topology(self, peer: Peer) -> TransferTopology:
        """The peer's topology (built once per connection from its spec)."""
        topo = self._topologies.get(peer.name)
        if topo is None:
            topo = self._topologies[peer.name] = TransferTopology.from_spec(peer.spec)
        return topo

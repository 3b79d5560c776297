"""``KVTransferAgent``: moves blocks of a paged KV cache to and from peer agents.

The agent owns one transport (NIXL or Mooncake) with the cache's topology regions
registered once, a zmq side channel for handshakes and notices, and its peers.
A request plans with ``TransferPlan.between`` (coalesced descriptors, int64
arrays) and posts them as one engine request; fragmented reads are staged
(staging.py). Per request the state machine is::

    planned -> posted -> done        (the holder is notified by the engine)
                      -> failed      (handles released, peer told on the side channel)
                      -> timed out   (same as failed)

Threading: posting, connecting and notices may come from several threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from kvbridge.topology import LayoutError, TopologySpec, TransferPlan, TransferTopology

from . import metadata as md
from .errors import (
    HandshakeError,
    IncompatiblePeerError,
    TransferError,
    TransferFailedError,
    TransferTimeoutError,
    UnknownPeerError,
)
from .peers import HeadMap, Peer, head_map, validate_hello
from .side_channel import SideChannelServer, request, sign_notice, verify_notice
from .staging import StagePlan, StagingPool, StagingUnsupported, plan_stage, relayout
from .transport import MemRegion, PendingTransfer, Transport, create_transport

log = logging.getLogger(__name__)

STAGING_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class TransferResult:
    """What one request moved: wire bytes, engine descriptors, wall seconds."""

    bytes: int
    descriptors: int
    seconds: float
    staged: bool = False
    engine_descriptors: int = 0  # descriptors handed to the engine (NIXL splits big ones)
    op: str = "READ"
    peer: str = ""
    request_id: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(eq=False)
class PendingRequest:
    """A posted request; ``KVTransferAgent.finish`` completes it."""

    op: str
    peer: Peer
    request_id: str
    xfer: PendingTransfer
    started: float
    descriptors: int
    nbytes: int
    staged: StagePlan | None = None
    relayout_args: tuple = ()
    done: bool = False
    _release: Callable[[], None] | None = field(default=None, repr=False)


def _as_layers(caches) -> dict[str, tuple[torch.Tensor, ...]]:
    layers = getattr(caches, "layers", caches)  # a layouts.KVCache or a mapping
    if not isinstance(layers, Mapping) or not layers:
        raise TypeError("caches must be a non-empty mapping {layer: tensor or views}")
    return {
        name: (views,) if isinstance(views, torch.Tensor) else tuple(views)
        for name, views in layers.items()
    }


def _ids(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64).reshape(-1)


class KVTransferAgent:
    """Registers a cache's regions once and moves its blocks to and from peers.

    ``caches``: ``{layer: tensor or views}`` (or a ``layouts.KVCache``), views block
    dim first unless ``block_dim`` says otherwise. ``backend``: ``"nixl"`` or
    ``"mooncake"``. ``host``: the address peers reach this process on (Mooncake's
    engine and the side channel bind there). ``side_channel_port``: serve
    handshakes and notices (0: any free port; ``None``: no side channel).
    ``timeout``: default seconds for every wait. ``staging``: ``"auto"`` stages
    fragmented reads, ``"always"`` every read, ``"never"`` none.
    """

    def __init__(
        self,
        name: str,
        caches,
        backend: str = "nixl",
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        host: str = "127.0.0.1",
        side_channel_port: int | None = 0,
        side_channel_bind: str | None = None,
        secret: bytes | None = None,
        timeout: float = 30.0,
        staging: str = "auto",
        max_staging_bytes: int = 1 << 30,
        block_dim: int = 0,
        transport_options: Mapping | None = None,
    ):
        if not name or not isinstance(name, str):
            raise ValueError("agent name must be a non-empty string")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"bad tensor-parallel rank {tp_rank} of {tp_size}")
        if staging not in STAGING_MODES:
            raise ValueError(f"staging must be one of {STAGING_MODES}, got {staging!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.name, self.backend = name, backend
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.timeout, self.staging = float(timeout), staging
        self._secret = secret
        layers = _as_layers(caches)
        self.topology = TransferTopology.from_caches(layers, block_dim=block_dim)
        self.spec: TopologySpec = self.topology.spec()
        self._layers = [
            (n, tuple(v.movedim(block_dim, 0) for v in views)) for n, views in layers.items()
        ]
        for r in self.spec.regions:
            if r.device == "meta":
                raise ValueError("meta tensors have no memory to transfer")
        self._lock = threading.RLock()
        self._peers: dict[str, Peer] = {}
        self._peer_topos: dict[str, TransferTopology] = {}
        self._notices: deque[md.TransferNotice] = deque()
        self._held_notices: list[md.TransferNotice] = []
        self._notice_lock = threading.Lock()
        self.rejected: deque[tuple[str, str]] = deque(maxlen=64)  # (peer, reason) we refused
        opts = dict(transport_options or {})
        if backend == "mooncake":
            opts.setdefault("host", host)
        self.transport: Transport = create_transport(backend, name, **opts)
        self.side: SideChannelServer | None = None
        try:
            for r in self.spec.regions:
                idx = self.transport.register_region(MemRegion(r.addr, r.nbytes, r.device))
                assert idx == r.index
            if side_channel_port is not None:
                self.side = SideChannelServer(
                    self._on_side_message,
                    host=side_channel_bind or host,
                    port=side_channel_port,
                    secret=secret,
                    name=name,
                )
            self._side_address = f"{host}:{self.side.port}" if self.side else ""
            self._staging = StagingPool(
                self.transport, self.spec.regions[0].device, max_staging_bytes
            )
            self.hello = md.AgentHello(
                agent_name=name,
                backend=backend,
                engine_metadata=self.transport.engine_metadata(),
                topology=self.spec.encode(),
                compat_hash=self.spec.compat_hash,
                layout_hash=self.spec.layout_hash,
                tp_rank=tp_rank,
                tp_size=tp_size,
                side_channel=self._side_address,
            )
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ peers
    @property
    def side_channel_address(self) -> str:
        """``host:port`` of this agent's side channel ("" without one)."""
        return self._side_address

    def metadata(self) -> bytes:
        """This agent's handshake message (msgspec, versioned)."""
        return md.encode(self.hello)

    def connect(self, peer_metadata: bytes | md.AgentHello) -> Peer:
        """Add a peer from its ``metadata()``; ``IncompatiblePeerError`` says why not."""
        hello = (
            peer_metadata
            if isinstance(peer_metadata, md.AgentHello)
            else md.decode_hello(peer_metadata)
        )
        spec = validate_hello(
            hello,
            name=self.name,
            backend=self.backend,
            spec=self.spec,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
        )
        peer = Peer(hello.agent_name, hello, spec)
        with self._lock:
            self.transport.add_peer(peer.name, hello.engine_metadata, peer.regions)
            self._peers[peer.name] = peer
            self._peer_topos.pop(peer.name, None)
        log.info("agent %s connected to peer %s (tp %d/%d)", self.name, peer.name,
                 peer.tp_rank, peer.tp_size)  # fmt: skip
        return peer

    def connect_to(self, address: str, timeout: float | None = None) -> Peer:
        """Handshake over the side channel at ``host:port``; both sides add each other."""
        timeout = self.timeout if timeout is None else timeout
        reply = request(
            address,
            md.HandshakeRequest(hello=self.hello),
            timeout,
            self._secret,
            expect=(md.HandshakeAccept, md.HandshakeReject),
        )
        if isinstance(reply, md.HandshakeReject):
            raise IncompatiblePeerError(
                f"peer {reply.agent_name!r} at {address} refused this agent: {reply.reason}"
            )
        return self.connect(reply.hello)

    def disconnect(self, peer: str | Peer) -> None:
        name = peer.name if isinstance(peer, Peer) else peer
        with self._lock:
            if self._peers.pop(name, None) is not None:
                self._peer_topos.pop(name, None)
                self.transport.remove_peer(name)

    @property
    def peers(self) -> dict[str, Peer]:
        return dict(self._peers)

    def peer(self, peer: str | Peer) -> Peer:
        name = peer.name if isinstance(peer, Peer) else peer
        try:
            return self._peers[name]
        except KeyError:
            raise UnknownPeerError(
                f"agent {self.name!r} has no peer {name!r} (connected: "
                f"{sorted(self._peers) or 'none'}); connect first"
            ) from None

    def _on_side_message(self, msg):
        if isinstance(msg, md.HandshakeRequest):
            try:
                self.connect(msg.hello)
            except (IncompatiblePeerError, HandshakeError) as exc:
                self.rejected.append((msg.hello.agent_name, str(exc)))
                log.warning("agent %s refused peer %s: %s", self.name, msg.hello.agent_name, exc)
                return md.HandshakeReject(agent_name=self.name, reason=str(exc))
            return md.HandshakeAccept(hello=self.hello)
        if isinstance(msg, md.TransferNotice):
            self._notices.append(msg)
            return md.Ack()
        if isinstance(msg, md.AgentHello):
            return md.HandshakeAccept(hello=self.hello)  # a probe: who are you?
        return md.ErrorReply(reason=f"unexpected {type(msg).__name__}")

    # -------------------------------------------------------------- transfers
    def read_blocks(
        self,
        peer: str | Peer,
        remote_block_ids,
        local_block_ids,
        timeout: float | None = None,
        **kw,
    ) -> TransferResult:
        """Pull: the peer's ``remote_block_ids`` land in our ``local_block_ids``.

        Keywords: ``request_id`` (carried by the completion notice), ``num_tokens``
        (token-space plan for different block sizes), ``heads`` (a ``HeadMap``;
        default from both sides' TP ranks), ``notify`` (tell the holder when done),
        ``staging`` (override the agent's mode).
        """
        return self.finish(self.post_read(peer, remote_block_ids, local_block_ids, **kw), timeout)

    def write_blocks(
        self,
        peer: str | Peer,
        local_block_ids,
        remote_block_ids,
        timeout: float | None = None,
        **kw,
    ) -> TransferResult:
        """Push: our ``local_block_ids`` land in the peer's ``remote_block_ids``."""
        return self.finish(self.post_write(peer, local_block_ids, remote_block_ids, **kw), timeout)

    def post_read(
        self,
        peer: str | Peer,
        remote_block_ids,
        local_block_ids,
        *,
        request_id: str = "",
        num_tokens: int | None = None,
        heads: HeadMap | None = None,
        notify: bool = True,
        staging: str | None = None,
    ) -> PendingRequest:
        """Post a pull without waiting; ``finish`` waits for it (several can overlap)."""
        p = self.peer(peer)
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        heads = heads or head_map(p.spec, p.tp_rank, self.spec, self.tp_rank, p.name)
        r_ids, l_ids = _ids(remote_block_ids), _ids(local_block_ids)
        plan = TransferPlan.between(p.spec, self.spec, r_ids, l_ids, num_tokens, **heads.kwargs())
        mode = staging or self.staging
        if mode not in STAGING_MODES:
            raise ValueError(f"staging must be one of {STAGING_MODES}, got {mode!r}")
        note = self._notice_bytes(request_id, "READ", plan.total_bytes) if notify else b""
        if mode == "always" or (mode == "auto" and plan.fragmented):
            pending = self._post_staged(p, r_ids, l_ids, num_tokens, heads, request_id, note)
            if pending is not None:
                pending.started = started
                return pending
        with self._lock:
            xfer = self.transport.post(
                "READ", p.name, plan.dst_region, plan.dst_offset, plan.src_region,
                plan.src_offset, plan.nbytes, note,
            )  # fmt: skip
        return PendingRequest(
            "READ", p, request_id, xfer, started, plan.num_descriptors, plan.total_bytes
        )

    def post_write(
        self,
        peer: str | Peer,
        local_block_ids,
        remote_block_ids,
        *,
        request_id: str = "",
        num_tokens: int | None = None,
        heads: HeadMap | None = None,
        notify: bool = True,
    ) -> PendingRequest:
        """Post a push without waiting (fragmented pushes go direct: see README)."""
        p = self.peer(peer)
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        heads = heads or head_map(self.spec, self.tp_rank, p.spec, p.tp_rank, p.name)
        plan = TransferPlan.between(
            self.spec, p.spec, _ids(local_block_ids), _ids(remote_block_ids), num_tokens,
            **heads.kwargs(),
        )  # fmt: skip
        note = self._notice_bytes(request_id, "WRITE", plan.total_bytes) if notify else b""
        with self._lock:
            xfer = self.transport.post(
                "WRITE", p.name, plan.src_region, plan.src_offset, plan.dst_region,
                plan.dst_offset, plan.nbytes, note,
            )  # fmt: skip
        return PendingRequest(
            "WRITE", p, request_id, xfer, started, plan.num_descriptors, plan.total_bytes
        )

    def finish(self, pending: PendingRequest, timeout: float | None = None) -> TransferResult:
        """Wait (bounded) for a posted request; on failure tell the peer and raise."""
        timeout = self.timeout if timeout is None else timeout
        try:
            self.transport.wait(pending.xfer, timeout)
            if pending.staged is not None:
                relayout(pending.staged, *pending.relayout_args)
        except TransferError as exc:
            self._tell_failure(pending, exc)
            raise
        finally:
            self._give_back_when_quiet(pending)
        pending.done = True
        return TransferResult(
            bytes=pending.nbytes,
            descriptors=pending.descriptors,
            seconds=time.perf_counter() - pending.started,
            staged=pending.staged is not None,
            engine_descriptors=pending.xfer.engine_descriptors,
            op=pending.op,
            peer=pending.peer.name,
            request_id=pending.request_id,
        )

    def _give_back_when_quiet(self, pending: PendingRequest) -> None:
        """Return a staged read's buffer, but only once the engine can no longer write it."""
        release, pending._release = pending._release, None
        if release is None:
            return
        if self.transport.quiesced(pending.xfer):
            release()
            return
        log.warning("agent %s: staging buffer of %s held until the engine lets go of it",
                    self.name, pending.request_id)  # fmt: skip

        def wait_then_release() -> None:
            while not self.transport.quiesced(pending.xfer):
                time.sleep(0.05)
            release()

        threading.Thread(target=wait_then_release, name=f"stage-hold-{self.name}",
                         daemon=True).start()  # fmt: skip

    def _post_staged(self, p, r_ids, l_ids, num_tokens, heads, request_id, note):
        topo = self._peer_topos.get(p.name)
        if topo is None:
            topo = self._peer_topos[p.name] = TransferTopology.from_spec(p.spec)
        stage = plan_stage(topo, r_ids)
        try:
            buf, tensor, region = self._staging.acquire(stage.total_bytes, self.timeout)
        except StagingUnsupported as exc:
            log.info("staging not possible (%s); reading the plan directly", exc)
            return None
        except TimeoutError as exc:
            raise TransferTimeoutError(f"agent {self.name!r}: {exc}") from None
        try:
            with self._lock:
                xfer = self.transport.post(
                    "READ", p.name, np.full(stage.nbytes.size, region, dtype=np.int64),
                    stage.stage_offset, stage.src_region, stage.src_offset, stage.nbytes, note,
                )  # fmt: skip
        except BaseException:
            self._staging.give_back(buf)
            raise
        args = (tensor, p.spec, self._layers, r_ids, l_ids, num_tokens, heads)
        return PendingRequest(
            "READ", p, request_id, xfer, 0.0, int(stage.nbytes.size), stage.wire_bytes,
            staged=stage, relayout_args=args, _release=lambda: self._staging.give_back(buf),
        )  # fmt: skip

    def _notice_bytes(self, request_id: str, op: str, nbytes: int) -> bytes:
        return sign_notice(
            self._secret,
            md.encode_notice(
                md.TransferNotice(request_id=request_id, sender=self.name, op=op, nbytes=nbytes)
            ),
        )

    def _tell_failure(self, pending: PendingRequest, exc: Exception) -> None:
        """Best effort, off the caller's thread: the peer learns the request failed."""
        address = pending.peer.side_channel
        if not address:
            return
        notice = md.TransferNotice(
            request_id=pending.request_id,
            sender=self.name,
            op=pending.op,
            status="failed",
            detail=str(exc)[:500],
        )

        def send() -> None:
            try:
                request(address, notice, min(self.timeout, 2.0), self._secret)
            except TransferError as err:
                log.info("could not tell %s that %s failed: %s", address, pending.request_id, err)

        threading.Thread(target=send, name=f"notice-{self.name}", daemon=True).start()

    # ---------------------------------------------------------------- notices
    def notifications(self) -> list[md.TransferNotice]:
        """New notices from peers (engine notifications and side-channel messages)."""
        with self._notice_lock:
            out = list(self._held_notices)
            self._held_notices.clear()
            with self._lock:
                raw = self.transport.notifications()
            for peer, data in raw:
                try:
                    out.append(md.decode_notice(verify_notice(self._secret, data)))
                except HandshakeError as exc:
                    log.warning("agent %s: bad notification from %s: %s", self.name, peer, exc)
            while self._notices:
                out.append(self._notices.popleft())
        return out

    def wait_notice(self, request_id: str, timeout: float | None = None) -> md.TransferNotice:
        """The notice of ``request_id``; other notices stay for ``notifications()``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.perf_counter() + timeout
        pause = 1e-4
        while True:
            got = self.notifications()
            match = next((n for n in got if n.request_id == request_id), None)
            with self._notice_lock:
                self._held_notices.extend(n for n in got if n is not match)
            if match is not None:
                return match
            now = time.perf_counter()
            if now >= deadline:
                raise TransferTimeoutError(
                    f"agent {self.name!r}: no notice for request {request_id!r} in {timeout:.3g} s"
                )
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 5e-3)

    # ---------------------------------------------------------------- closing
    def close(self) -> None:
        """Stop the side channel, drop peers, deregister everything (idempotent)."""
        side, self.side = getattr(self, "side", None), None
        if side is not None:
            side.close()
        staging = getattr(self, "_staging", None)
        if staging is not None:
            with contextlib.suppress(TransferError):
                staging.close()
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.close()

    def __enter__(self) -> KVTransferAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"KVTransferAgent({self.name!r}, {self.backend}, tp {self.tp_rank}/{self.tp_size}, "
            f"{len(self.spec.regions)} regions, peers {sorted(self._peers)})"
        )


__all__ = [
    "HeadMap",
    "KVTransferAgent",
    "LayoutError",
    "PendingRequest",
    "TransferFailedError",
    "TransferResult",
]

"""``KVTransferAgent``: moves blocks of a paged KV cache to and from peer agents.

The agent owns one transport (NIXL or Mooncake, with the same-host transport beside
it when ``local="auto"``) with the cache's topology regions and a probe scratch
registered once, a zmq side channel for handshakes and notices, its peers
(peer_table.py), their probed paths (probe.py) and its notices (notices.py). A
request plans with ``TransferPlan.between`` (coalesced descriptors, int64 arrays)
and posts them as one engine request; fragmented reads are staged
(staged_reads.py, staging.py). Per request the state machine is::

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
from collections.abc import Mapping

import numpy as np
import torch
from kvbridge.connector.transfer import metadata as md
from kvbridge.connector.transfer.errors import (
    IncompatiblePeerError,
    TransferError,
    TransferFailedError,
)
from kvbridge.connector.transfer.notices import NoticeBox
from kvbridge.connector.transfer.peer_table import PeerTable
from kvbridge.connector.transfer.peers import Peer
from kvbridge.connector.transfer.probe import (
    PROBE_TIMEOUT,
    PathReport,
    ProbeScratch,
    hello_fields,
    make_scratch,
    probe,
)
from kvbridge.connector.transfer.side_channel import SideChannelServer, request
from kvbridge.connector.transfer.staged_reads import StagedReads
from kvbridge.connector.transfer.staging import relayout
from kvbridge.connector.transfer.tp_mapping import HeadMap
from kvbridge.connector.transfer.transfer_request import PendingRequest, TransferResult
from kvbridge.connector.transfer.transport import (
    DEFAULT_BACKEND,
    LOCAL_BACKEND,
    LOCAL_MODES,
    MemRegion,
    Transport,
    create_transport,
)
from kvbridge.topology import LayoutError, TopologySpec, TransferPlan, TransferTopology

log = logging.getLogger(__name__)

STAGING_MODES = ("auto", "always", "never")


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


def _check_staging(mode: str) -> None:
    if mode not in STAGING_MODES:
        raise ValueError(f"staging must be one of {STAGING_MODES}, got {mode!r}")


class KVTransferAgent:
    """Registers a cache's regions once and moves its blocks to and from peers.

    ``caches``: ``{layer: tensor or views}`` (or a ``layouts.KVCache``), views block
    dim first unless ``block_dim`` says otherwise. ``backend``: a name in
    ``transport.BACKENDS``. ``host``: the address peers reach this process on (Mooncake's
    engine and the side channel bind there). ``side_channel_port``: serve
    handshakes and notices (0: any free port; ``None``: no side channel).
    ``timeout``: default seconds for every wait. ``staging``: ``"auto"`` stages
    fragmented reads, ``"always"`` every read, ``"never"`` none. ``tp_rank`` /
    ``tp_size`` / ``total_kv_heads``: this agent's tensor-parallel position and the
    model's KV heads (0: heads per rank x ``tp_size``; fewer than ``tp_size`` means
    replicated heads, see ``tp_mapping``); head ranges are mapped once per peer.
    ``local``: ``"auto"`` also offers the same-host transport and uses it with peers
    of this host that offer it too (``"off"``: only ``backend``). ``probe_bytes``:
    scratch for the path probe at ``connect_to`` (``None``: 4 MiB on a GPU, 1 MiB on
    the host; 0: no probe); a direction below ``path_warn_fraction`` of
    ``expected_bandwidth`` (bytes/s; 0: the better direction) is logged as degraded
    and requests prefer the other (``direction``). ``degrade``: test hook, ``{op:
    bytes/s}`` throttles this agent's posts of ``op`` (0 fails them).
    """

    def __init__(
        self,
        name: str,
        caches,
        backend: str = DEFAULT_BACKEND,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        total_kv_heads: int = 0,
        host: str = "127.0.0.1",
        side_channel_port: int | None = 0,
        side_channel_bind: str | None = None,
        secret: bytes | None = None,
        timeout: float = 30.0,
        staging: str = "auto",
        max_staging_bytes: int = 1 << 30,
        block_dim: int = 0,
        transport_options: Mapping | None = None,
        local: str = "off",
        probe_bytes: int | None = None,
        path_warn_fraction: float = 0.25,
        expected_bandwidth: float = 0.0,
        degrade: Mapping[str, float] | None = None,
    ):
        if not name or not isinstance(name, str):
            raise ValueError("agent name must be a non-empty string")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"bad tensor-parallel rank {tp_rank} of {tp_size}")
        _check_staging(staging)
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.name, self.backend = name, backend
        self.instance_id = uuid.uuid4().hex  # this incarnation (peers see it in the hello)
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
        if local not in LOCAL_MODES:
            raise ValueError(f"local must be one of {LOCAL_MODES}, got {local!r}")
        self._lock = threading.RLock()  # guards the transport
        opts = dict(transport_options or {})
        opts.setdefault("host", host)
        self.transport: Transport = create_transport(backend, name, **opts)
        if local == "auto" and backend != LOCAL_BACKEND:
            from kvbridge.connector.transfer.transport.routed import with_local

            self.transport = with_local(self.transport, host)  # same-host peers: local
        for op, rate in (degrade or {}).items():
            self.transport.degrade(op, rate)
        self.path_warn_fraction = float(path_warn_fraction)
        self.expected_bandwidth = float(expected_bandwidth)
        self.paths: dict[str, PathReport] = {}  # per peer, from the probe at connect_to
        self.on_path: list = []  # callbacks(PathReport) after each probe
        self._scratch: ProbeScratch | None = None
        self._peers = PeerTable(
            name, backend, self.spec, tp_rank, tp_size, self.transport, self._lock, total_kv_heads
        )
        self.rejected = self._peers.rejected  # (peer, reason) we refused
        self._notices = NoticeBox(name, self.transport, self._lock, secret, self.timeout)
        self.side: SideChannelServer | None = None
        try:
            for r in self.spec.regions:
                idx = self.transport.register_region(MemRegion(r.addr, r.nbytes, r.device))
                assert idx == r.index
            self._scratch = make_scratch(self.transport, self.spec.regions[0].device, probe_bytes)
            if side_channel_port is not None:
                self.side = SideChannelServer(
                    self._on_side_message,
                    host=side_channel_bind or host,
                    port=side_channel_port,
                    secret=secret,
                    name=name,
                )
            self._side_address = f"{host}:{self.side.port}" if self.side else ""
            self._staging = StagedReads(
                self.transport, self._lock, self.spec.regions[0].device, max_staging_bytes,
                self.timeout, name,
            )  # fmt: skip
            self.hello = md.AgentHello(
                agent_name=name,
                backend=backend,
                engine_metadata=self.transport.engine_metadata(),
                topology=self.spec.encode(),
                compat_hash=self.spec.compat_hash,
                layout_hash=self.spec.layout_hash,
                tp_rank=tp_rank,
                tp_size=tp_size,
                total_kv_heads=total_kv_heads,
                side_channel=self._side_address,
                instance_id=self.instance_id,
                **hello_fields(self._scratch),
                local_metadata=self.transport.local_metadata(),
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
        if isinstance(peer_metadata, md.AgentHello):
            return self._peers.add(peer_metadata)
        return self._peers.add(md.decode_hello(peer_metadata))

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
        peer = self._peers.add(reply.hello)
        self.probe(peer, min(timeout / 3, PROBE_TIMEOUT))  # the caller still pulls after
        return peer

    def probe(self, peer: str | Peer, timeout: float = PROBE_TIMEOUT) -> PathReport | None:
        """Move the probe scratch both ways with ``peer`` and record the path (``paths``);
        ``None`` when either side has no scratch."""
        p = self.peer(peer)
        if self._scratch is None or p.probe_region is None:
            return None
        report = probe(
            self.transport, self._scratch, p.name, p.probe_region,
            engine=self.transport.engine_of(p.name).backend,
            warn_fraction=self.path_warn_fraction, expected_bps=self.expected_bandwidth,
            timeout=timeout, lock=self._lock,
        )  # fmt: skip
        self.paths[p.name] = report
        for callback in list(self.on_path):
            callback(report)
        return report

    def tell(self, address: str, request_id: str, op: str, status: str, detail: str = ""):
        """Send a notice about ``request_id`` to the side channel at ``address`` (best effort)."""
        self._notices.tell(address, request_id, op, status, detail)

    def direction(self, peer: str | Peer) -> str:
        """``"READ"`` (pull) or ``"WRITE"`` (ask the holder to push), from the probe."""
        report = self.paths.get(peer.name if isinstance(peer, Peer) else peer)
        return report.direction if report is not None else "READ"

    def disconnect(self, peer: str | Peer) -> None:
        self._peers.remove(peer)
        self.paths.pop(peer.name if isinstance(peer, Peer) else peer, None)

    @property
    def peers(self) -> dict[str, Peer]:
        return self._peers.snapshot()

    def peer(self, peer: str | Peer) -> Peer:
        """The connected peer (``UnknownPeerError`` if not connected)."""
        return self._peers.get(peer)

    def _on_side_message(self, msg):
        if isinstance(msg, md.HandshakeRequest):
            return self._peers.answer(msg, self.hello)
        if isinstance(msg, md.TransferNotice):
            self._notices.deliver(msg)
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
        heads = heads or p.heads.for_op("READ")
        r_ids, l_ids = _ids(remote_block_ids), _ids(local_block_ids)
        mode = staging or self.staging
        _check_staging(mode)
        args = (p.spec, self.spec, r_ids, l_ids, num_tokens)
        # fragmented layout pairs are staged without building their plan (staged_reads.py)
        key = (p.spec.layout_hash, self.spec.layout_hash, num_tokens is None, heads)
        per_token = self._staging.known(key) if mode == "auto" else None
        plan = None
        if per_token is None:
            plan = TransferPlan.between(*args, **heads.kwargs())
            if mode == "auto" and plan.fragmented:
                self._staging.learn(key, plan, lambda: TransferPlan.check(*args, **heads.kwargs()))
            nbytes = plan.total_bytes
        else:
            nbytes = per_token * TransferPlan.check(*args, **heads.kwargs())
        note = self._notices.signed(request_id, "READ", nbytes) if notify else b""
        if plan is None or mode == "always" or (mode == "auto" and plan.fragmented):
            pending = self._staging.post(
                p, self._peers.topology(p), self._layers, r_ids, l_ids, num_tokens, heads,
                request_id, note, started,
            )  # fmt: skip
            if pending is not None:
                return pending
        if plan is None:  # staging turned out impossible: the plan after all
            plan = TransferPlan.between(*args, **heads.kwargs())
        return self._post_plan("READ", p, plan, request_id, note, started)

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
        heads = heads or p.heads.for_op("WRITE")
        plan = TransferPlan.between(
            self.spec, p.spec, _ids(local_block_ids), _ids(remote_block_ids), num_tokens,
            **heads.kwargs(),
        )  # fmt: skip
        note = self._notices.signed(request_id, "WRITE", plan.total_bytes) if notify else b""
        return self._post_plan("WRITE", p, plan, request_id, note, started)

    def _post_plan(
        self, op: str, p: Peer, plan: TransferPlan, request_id: str, note: bytes, started: float
    ) -> PendingRequest:
        """Post ``plan`` as one engine request: a read lands on its destination side
        (ours), a write comes from its source side (ours)."""
        src, dst = (plan.src_region, plan.src_offset), (plan.dst_region, plan.dst_offset)
        local, remote = (dst, src) if op == "READ" else (src, dst)
        with self._lock:
            xfer = self.transport.post(op, p.name, *local, *remote, plan.nbytes, note)
        return PendingRequest(
            op, p, request_id, xfer, started, plan.num_descriptors, plan.total_bytes
        )

    def finish(self, pending: PendingRequest, timeout: float | None = None) -> TransferResult:
        """Wait (bounded) for a posted request; on failure tell the peer and raise."""
        timeout = self.timeout if timeout is None else timeout
        try:
            self.transport.wait(pending.xfer, timeout)
            if pending.staged is not None:
                pending.relayout_done = relayout(pending.staged, *pending.relayout_args)
        except TransferError as exc:
            self._notices.tell_failure(
                pending.peer.side_channel, pending.request_id, pending.op, exc
            )
            raise
        finally:
            self._staging.give_back_when_quiet(pending)
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

    # ---------------------------------------------------------------- notices
    def notifications(self) -> list[md.TransferNotice]:
        """New notices from peers (engine notifications and side-channel messages)."""
        return self._notices.notifications()

    def wait_notice(self, request_id: str, timeout: float | None = None) -> md.TransferNotice:
        """The notice of ``request_id``; other notices stay for ``notifications()``."""
        return self._notices.wait_notice(request_id, self.timeout if timeout is None else timeout)

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
            f"{len(self.spec.regions)} regions, peers {sorted(self.peers)})"
        )


__all__ = ["HeadMap", "KVTransferAgent", "LayoutError", "PathReport", "PendingRequest",
           "TransferFailedError", "TransferResult"]  # fmt: skip

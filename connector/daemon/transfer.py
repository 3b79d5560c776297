"""A daemon's transfer endpoint: its ``KVTransferAgent``, peers and completion notices.

The prefill side only serves (the agent's side channel answers handshakes; a
notice thread turns the decode side's completion notices into lease ends). The
decode side handshakes once per prefill engine (cached; dropped after a failed
transfer so the next request handshakes again) and pulls with ``read_blocks``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvbridge.connector.agent import KVTransferAgent
from kvbridge.connector.daemon.runtime import DaemonRuntime

NOTICE_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class PullResult:
    bytes: int
    descriptors: int
    seconds: float
    handshake_seconds: float = 0.0
    staged: bool = False


class TransferEndpoint:
    """Owns the agent of one daemon (registered once over the daemon's whole cache)."""

    def __init__(self, rt: DaemonRuntime) -> None:
        cfg = rt.cfg
        self.rt = rt
        self.agent = KVTransferAgent(
            rt.name,
            rt.cache,
            backend=cfg.backend,
            host=cfg.public_host,
            side_channel_port=cfg.side_port,
            side_channel_bind=cfg.host,
            timeout=cfg.transfer_timeout,
        )
        self.compat_hash = self.agent.spec.compat_hash
        self.side_address = self.agent.side_channel_address
        self.side_port = self.agent.side.port if self.agent.side is not None else 0
        self._connect_lock = threading.Lock()
        self._on_done: Callable[[str], None] | None = None
        self._stop = threading.Event()
        self._notice_thread: threading.Thread | None = None

    # ------------------------------------------------------------ prefill side
    def on_peer_done(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(request_id)`` when a peer reports it finished reading a request."""
        self._on_done = callback
        self._notice_thread = threading.Thread(
            target=self._notice_loop, name="kvbridge-notices", daemon=True
        )
        self._notice_thread.start()

    def _notice_loop(self) -> None:
        log = self.rt.log
        while not self._stop.wait(NOTICE_POLL_SECONDS):
            try:
                notices = self.agent.notifications()
            except Exception:
                log.exception("reading transfer notices failed")
                continue
            for n in notices:
                if n.status == "done" and n.op == "READ":
                    log.debug(
                        "peer finished reading",
                        extra={"request_id": n.request_id, "peer": n.sender},
                    )
                    self._on_done(n.request_id)
                else:
                    log.warning(
                        "peer reported a failed transfer; the lease ends on Release or expiry",
                        extra={"request_id": n.request_id, "peer": n.sender, "detail": n.detail},
                    )

    # ------------------------------------------------------------- decode side
    def _peer(self, engine_name: str, side_address: str, timeout: float) -> tuple[object, float]:
        with self._connect_lock:
            peer = self.agent.peers.get(engine_name)
            if peer is not None:
                return peer, 0.0
            t0 = time.perf_counter()
            peer = self.agent.connect_to(side_address, timeout=timeout)
            if peer.name != engine_name:
                self.agent.disconnect(peer)
                raise RuntimeError(
                    f"side channel {side_address} belongs to engine {peer.name!r}, "
                    f"the handle names {engine_name!r}"
                )
            seconds = time.perf_counter() - t0
        self.rt.log.info(
            "handshake done",
            extra={"peer": engine_name, "address": side_address, "seconds": round(seconds, 6)},
        )
        return peer, seconds

    def pull(self, handle, local_block_ids: list[int], timeout: float) -> PullResult:
        """Read the handle's blocks into ``local_block_ids`` (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        peer, handshake = self._peer(handle.engine_name, handle.side_channel_address, timeout)
        try:
            r = self.agent.read_blocks(
                peer,
                list(handle.block_ids),
                local_block_ids,
                timeout=max(deadline - time.monotonic(), 1e-3),
                request_id=handle.request_id,
                notify=True,
            )
        except Exception:
            self.agent.disconnect(handle.engine_name)  # re-handshake next time
            raise
        return PullResult(r.bytes, r.descriptors, r.seconds, handshake, r.staged)

    def close(self) -> None:
        self._stop.set()
        if self._notice_thread is not None:
            self._notice_thread.join(2.0)
        self.agent.close()

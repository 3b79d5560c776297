"""A daemon's transfer endpoint: its ``KVTransferAgent``, peers and completion notices.

The prefill side only serves (the agent's side channel answers handshakes; a
notice thread turns the decode side's completion notices into lease ends). The
decode side pulls through ``pull.Puller`` (handshake once per prefill engine,
bounded waits, transfers given up on are abandoned to the engine, never cancelled
under it; see pull.py).

With a side-channel secret (``--side-secret-file``) every side-channel message is
HMAC-SHA256 signed; completion notices are only honoured from the lease's owner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvbridge.connector.serving.daemon.pull import Puller
from kvbridge.connector.serving.daemon.runtime import DaemonRuntime
from kvbridge.connector.transfer.agent import KVTransferAgent
from kvbridge.connector.transfer.transport import transport_info

NOTICE_POLL_SECONDS = 0.01

__all__ = ["TransferEndpoint"]


class TransferEndpoint:
    """Owns the agent of one daemon (registered once over the daemon's whole cache)."""

    def __init__(self, rt: DaemonRuntime, secret: bytes | None = None) -> None:
        cfg = rt.cfg
        self.rt = rt
        self.agent = KVTransferAgent(
            rt.name,
            rt.cache,
            backend=cfg.backend,
            host=cfg.public_host,
            side_channel_port=cfg.side_port,
            side_channel_bind=cfg.host,
            secret=secret,
            timeout=cfg.transfer_timeout,
            transport_options=transport_info(cfg.backend).load().daemon_options(cfg),
        )
        self.compat_hash = self.agent.spec.compat_hash
        self.side_address = self.agent.side_channel_address
        self.side_port = self.agent.side.port if self.agent.side is not None else 0
        self.puller = Puller(self.agent, rt.log)  # the decode side's pulls
        self._on_done: Callable[[str, str], None] | None = None
        self._stop = threading.Event()
        self._notice_thread: threading.Thread | None = None

    # ------------------------------------------------------------ prefill side
    def on_peer_done(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(request_id, sender)`` when a peer reports it finished reading."""
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
                    self._on_done(n.request_id, n.sender)
                else:
                    log.warning(
                        "peer reported a failed transfer; the lease ends on Release or expiry",
                        extra={"request_id": n.request_id, "peer": n.sender, "detail": n.detail},
                    )

    def close(self) -> None:
        self._stop.set()
        self.puller.close()
        if self._notice_thread is not None:
            self._notice_thread.join(2.0)
        self.agent.close()

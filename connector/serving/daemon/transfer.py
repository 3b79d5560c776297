"""A daemon's transfer endpoint: its ``KVTransferAgent``, peers, paths and notices.

The prefill side serves (the agent's side channel answers handshakes; a notice
thread turns the decode side's completion notices into lease ends) and pushes when
asked (push.py). The decode side pulls through ``pull.Puller`` (handshake and path
probe once per prefill engine, bounded waits, transfers given up on are abandoned
to the engine, never cancelled under it; see pull.py), or asks for a push when the
probe found reads from that peer degraded; the notice thread keeps the push notices
(``write_notice``). Every probe's result goes to Stats (``rt.paths``), to
``kvbridge_peer_bandwidth_bytes_per_second`` and, when degraded, to the log.

With a side-channel secret (``--side-secret-file``) every side-channel message is
HMAC-SHA256 signed; completion notices are only honoured from the lease's owner.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from kvbridge.connector.serving.daemon.config import parse_degrade
from kvbridge.connector.serving.daemon.pull import Puller
from kvbridge.connector.serving.daemon.runtime import DaemonRuntime
from kvbridge.connector.transfer.agent import KVTransferAgent, PathReport
from kvbridge.connector.transfer.metadata import TransferNotice
from kvbridge.connector.transfer.transport import transport_info

NOTICE_POLL_SECONDS = 0.01
MAX_KEPT_NOTICES = 4096

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
            local=cfg.local_transport,
            probe_bytes=cfg.probe_bytes,
            path_warn_fraction=cfg.path_warn_fraction,
            expected_bandwidth=cfg.expected_bandwidth_gbps * 1e9,
            degrade=parse_degrade(cfg.degrade),
        )
        self.agent.on_path.append(self._on_path)
        self.compat_hash = self.agent.spec.compat_hash
        self.side_address = self.agent.side_channel_address
        self.side_port = self.agent.side.port if self.agent.side is not None else 0
        self.puller = Puller(self.agent, rt.log)  # the decode side's pulls
        self._on_done: Callable[[str, str], None] | None = None
        self._stop = threading.Event()
        # WRITE notices of pushes into our blocks, by (request id, sender)
        self._writes: OrderedDict[tuple[str, str], TransferNotice] = OrderedDict()
        self._writes_cond = threading.Condition()
        self._notice_thread = threading.Thread(
            target=self._notice_loop, name="kvbridge-notices", daemon=True
        )
        self._notice_thread.start()

    def _on_path(self, report: PathReport) -> None:
        rt = self.rt
        rt.paths[report.peer] = report
        rt.metrics.set_path(rt.cfg.role, report.peer, report.read_bps, report.write_bps)
        rt.log.info(
            "peer path probed",
            extra={"peer": report.peer, "engine": report.engine, "transport": report.transport,
                   "read_gbps": round(report.read_bps / 1e9, 3),
                   "write_gbps": round(report.write_bps / 1e9, 3),
                   "direction": report.direction, "degraded": list(report.degraded)},
        )  # fmt: skip

    # ------------------------------------------------------------ prefill side
    def on_peer_done(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(request_id, sender)`` when a peer reports it finished reading."""
        self._on_done = callback

    # ------------------------------------------------------------- decode side
    def write_notice(self, request_id: str, sender: str, timeout: float) -> TransferNotice | None:
        """The WRITE notice (``done``, ``failed`` or ``released``) ``sender`` sent for
        ``request_id``, waiting at most ``timeout`` s (``None``: none yet)."""
        deadline = time.monotonic() + timeout
        with self._writes_cond:
            while True:
                n = self._writes.get((request_id, sender))
                left = deadline - time.monotonic()
                if (n is not None and n.status != "failed") or left <= 0:
                    return n
                self._writes_cond.wait(left)

    def _keep_write(self, n: TransferNotice) -> None:
        with self._writes_cond:
            key = (n.request_id, n.sender)
            old = self._writes.get(key)
            if old is None or old.status == "failed":  # done/released win over failed
                self._writes[key] = n
            while len(self._writes) > MAX_KEPT_NOTICES:
                self._writes.popitem(last=False)
            self._writes_cond.notify_all()

    def _notice_loop(self) -> None:
        log = self.rt.log
        while not self._stop.wait(NOTICE_POLL_SECONDS):
            try:
                notices = self.agent.notifications()
            except Exception:
                log.exception("reading transfer notices failed")
                continue
            for n in notices:
                if n.op == "WRITE":  # a peer pushed (or gave up pushing) into our blocks
                    self._keep_write(n)
                elif n.status == "done" and n.op == "READ" and self._on_done is not None:
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

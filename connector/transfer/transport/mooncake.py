"""Mooncake transfer-engine backend: ``tcp`` here, ``rdma`` where present.

The engine runs with ``P2PHANDSHAKE`` metadata (no etcd): a peer is addressed by
its session id ``host:rpc_port``, which is this backend's engine metadata.
Registration is one ``register_memory`` call per region. A request is a sequence
of ``batch_transfer_sync`` calls of at most ``max_batch`` descriptors (the TCP
transport rejects deeper per-peer queues), run on a worker thread so the caller's
wait is bounded by its own timeout; the last batch carries the engine
notification (``TransferNotify``), which reaches the peer after the data.

Mooncake's Python API has no cancel: after a timeout, remaining batches are
skipped and the batch in flight ends at the engine's own timeout
(``MC_TRANSFER_TIMEOUT``, set from ``engine_timeout``).

Quiescence (``quiesced``): a job is quiet once its worker returned, unless an
engine call failed: the sync call returns at the first failed task or at its
timeout while other slices may still be in flight (the TCP transport's reads land
whenever the socket delivers), so the destination stays unsafe for
``drain_seconds`` after such a failure (default: the ~15 min after which Linux TCP
abandons a stalled connection). The first job to a new session, and every job
after one that failed, first checks with a TCP connect that the session still
accepts connections (only then: the peer's engine logs a warning per such
connect); a peer that is gone fails the job before any engine call, and its
destination is quiet at once.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvbridge.connector.transfer.errors import (
    DescriptorError,
    EngineUnavailableError,
    TransferFailedError,
)
from kvbridge.connector.transfer.transport.base import (
    EngineDescriptors,
    MemRegion,
    Op,
    Transport,
    import_engine,
)

log = logging.getLogger(__name__)

PIP_NAME = "mooncake-transfer-engine-non-cuda"
PROBE_SECONDS = 1.0  # TCP connect check of a peer's session before a job's first batch
#: Defaults for the engine's environment knobs (set before the engine starts,
#: never overriding what the user set). Measured in bench/README.md.
MC_DEFAULTS = {
    "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER": "8192",
    "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER": "8192",
}


@dataclass(eq=False)
class _Job:
    cancel: threading.Event
    future: Future | None = None
    engine_failed_at: float | None = None  # monotonic time an engine call failed


class MooncakeTransport(Transport):
    """A Mooncake ``TransferEngine`` reachable at ``host:<rpc port>``.

    ``host`` must be the address peers reach this process on. ``protocol``:
    ``"tcp"`` or ``"rdma"``; ``max_batch``: descriptors per engine call;
    ``engine_timeout``: seconds before the engine itself fails a stuck batch.
    """

    backend = "mooncake"

    @classmethod
    def daemon_options(cls, cfg: Any) -> dict[str, Any]:
        """Mooncake cannot cancel a batch, and after a failed one cannot say when its
        slices stop writing: let an abandoned batch finish (a long engine timeout, so
        it usually ends by completing and its blocks come back at once), keep enough
        workers for other transfers meanwhile, and quarantine the destination of a
        failed batch for ``engine_drain_seconds``."""
        return {
            "engine_timeout": float(max(120, math.ceil(4 * cfg.transfer_timeout))),
            "workers": 16,
            "drain_seconds": cfg.engine_drain_seconds,
        }

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        protocol: str = "tcp",
        device_name: str = "",
        max_batch: int = 1024,
        engine_timeout: float = 30.0,
        workers: int = 4,
        drain_seconds: float = 930.0,
    ):
        super().__init__(name)
        for key, value in {**MC_DEFAULTS, "MC_TRANSFER_TIMEOUT": str(int(engine_timeout))}.items():
            os.environ.setdefault(key, value)
        mod = import_engine("mooncake.engine", PIP_NAME, "mooncake")
        self._mod = mod
        self._engine = mod.TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise EngineUnavailableError(
                f"Mooncake engine {name!r} failed to start ({protocol} on {host!r}, rc={rc})"
            )
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self.max_batch = max(1, int(max_batch))
        self._sessions: dict[str, str] = {}
        self._verified: set[str] = set()  # sessions that accepted a connection lately
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"mc-{name}")
        self.drain_seconds = float(drain_seconds)

    def engine_metadata(self) -> bytes:
        return self.session.encode()

    # ------------------------------------------------------------ registration
    def _register(self, region: MemRegion) -> Any:
        if region.is_cuda and not getattr(self._mod, "SUPPORT_CUDA", False):
            raise EngineUnavailableError(
                f"this Mooncake build cannot register GPU memory ({region.device}); install "
                "'mooncake-transfer-engine' (the CUDA build) instead of "
                f"{PIP_NAME!r}"
            )
        location = f"cuda:{region.device_index}" if region.is_cuda else "cpu:0"
        rc = self._engine.register_memory(region.addr, region.nbytes, location)
        if rc != 0:
            raise TransferFailedError(
                f"Mooncake could not register {region.nbytes} bytes at {region.addr:#x} "
                f"(rc={rc}; overlapping an earlier registration?)"
            )
        return region.addr

    def _deregister(self, handle: Any) -> None:
        self._engine.unregister_memory(handle)

    # ------------------------------------------------------------------- peers
    def _add_peer(self, peer: str, engine_metadata: bytes) -> None:
        try:
            session = bytes(engine_metadata).decode()
        except UnicodeDecodeError:
            session = ""
        host, _, port = session.rpartition(":")
        if not host or not port.isdigit():
            raise DescriptorError(
                f"peer {peer!r}: Mooncake metadata must be a 'host:port' session id, "
                f"got {engine_metadata[:64]!r}"
            )
        self._sessions[peer] = session
        self._verified.discard(session)

    def _remove_peer(self, peer: str) -> None:
        self._verified.discard(self._sessions.pop(peer, ""))

    # --------------------------------------------------------------- transfers
    def _post(self, op: Op, peer: str, descs: EngineDescriptors, notify: bytes) -> Any:
        try:
            msg = notify.decode() if notify else ""
        except UnicodeDecodeError:
            raise DescriptorError("Mooncake notifications must be UTF-8 text") from None
        mc = self._mod
        opcode = mc.TransferOpcode.Read if op == "READ" else mc.TransferOpcode.Write
        note = mc.TransferNotify(self.name, msg) if msg else None
        session = self._sessions[peer]
        cancel = threading.Event()
        la, ra, nb = descs.local_addr.tolist(), descs.remote_addr.tolist(), descs.nbytes.tolist()
        job = _Job(cancel)
        job.future = self._pool.submit(self._run, job, session, la, ra, nb, opcode, note)
        return job

    @staticmethod
    def _refused(session: str) -> str:
        """Why ``session`` cannot be reached ("" if it accepts a TCP connection or the
        check is inconclusive: only a refused connection proves the peer is gone)."""
        host, _, port = session.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), PROBE_SECONDS):
                return ""
        except ConnectionRefusedError as exc:
            return str(exc)
        except (OSError, ValueError):
            return ""

    def _run(self, job: _Job, session, la, ra, nb, opcode, note) -> str:
        if session not in self._verified:
            refused = self._refused(session)
            if refused:  # no engine call made: nothing can land in the destination
                return f"failed: Mooncake peer session {session} refuses connections ({refused})"
            self._verified.add(session)
        step = self.max_batch
        for start in range(0, len(nb), step):
            if job.cancel.is_set():
                return "failed: cancelled"
            end = start + step
            last = end >= len(nb)
            try:
                rc = self._engine.batch_transfer_sync(
                    session, la[start:end], ra[start:end], nb[start:end], opcode,
                    note if last else None,
                )  # fmt: skip
            except BaseException:
                job.engine_failed_at = time.monotonic()
                self._verified.discard(session)
                raise
            if rc != 0:
                job.engine_failed_at = time.monotonic()
                self._verified.discard(session)
                return (
                    f"failed: Mooncake batch_transfer_sync to {session} returned {rc} "
                    f"(descriptors {start}..{min(end, len(nb))} of {len(nb)}; peer gone?)"
                )
        return "done"

    def _check(self, handle: _Job) -> str:
        if not handle.future.done():
            return "pending"
        try:
            return handle.future.result()
        except Exception as exc:
            return f"failed: {type(exc).__name__}: {exc}"

    def _release(self, handle: _Job) -> None:
        handle.cancel.set()
        handle.future.cancel()

    def _quiesced(self, handle: _Job) -> bool:
        """Quiet once the worker returned, and ``drain_seconds`` after a failed engine call."""
        if not handle.future.done():
            return False
        failed = handle.engine_failed_at
        return failed is None or time.monotonic() - failed >= self.drain_seconds

    def _notifications(self) -> list[tuple[str, bytes]]:
        return [(n.name, n.msg.encode()) for n in self._engine.get_notifies()]

    def _close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sessions.clear()

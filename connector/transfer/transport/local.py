"""Same-host transport: GPU memory through CUDA IPC, host memory through cma.

For peers on this host (same boot, same PID and network namespace) a transfer is
a plain copy done by the initiator: GPU regions are exported at registration as
CUDA IPC handles (cuda_ipc.py) and mapped once per peer, so a request's coalesced
ranges become ``cuMemcpyDtoDAsync`` calls on one stream (HBM or NVLink speed);
host regions are read or written with ``process_vm_readv`` / ``process_vm_writev``
(cross-memory attach, no copy through a socket), cut into pieces spread over
``workers`` threads. Host <-> GPU pairs are refused (the network engines do them).

Notifications go over a unix socket (zmq PUSH -> the peer's PULL, an ``ipc://``
path in the temp directory) once the initiator has seen its copies complete, so
they reach the peer after the data, as the engines' do. A copy cannot be
cancelled: a released transfer is quiet once its copies finished (``quiesced``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import tempfile
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from kvbridge.connector.transfer.errors import DescriptorError, HandshakeError, TransferFailedError
from kvbridge.connector.transfer.transport.base import (
    EngineDescriptors,
    MemRegion,
    Op,
    Transport,
)

log = logging.getLogger(__name__)

#: Host descriptors are cut into pieces of at most this many bytes for the workers.
PIECE_BYTES = 8 << 20
IOV_MAX = 1024


def host_identity() -> str:
    """This process's host for the local transport: boot id, PID and network namespace.

    Processes in other PID namespaces cannot attach to each other's memory, and
    peers in other network namespaces are treated as other nodes (containers).
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    parts = [boot]
    for ns in ("pid", "net"):
        try:
            parts.append(str(os.stat(f"/proc/self/ns/{ns}").st_ino))
        except OSError:
            parts.append("?")
    return "/".join(parts)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
for _fn in (_libc.process_vm_readv, _libc.process_vm_writev):
    _fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                    ctypes.c_ulong, ctypes.c_ulong]  # fmt: skip
    _fn.restype = ctypes.c_ssize_t


def cma_copy(op: Op, pid: int, local: np.ndarray, remote: np.ndarray, nbytes: np.ndarray) -> None:
    """``READ``: remote -> local, ``WRITE``: local -> remote, in ``pid``'s address space."""
    fn = _libc.process_vm_readv if op == "READ" else _libc.process_vm_writev
    local, remote, nbytes = local.copy(), remote.copy(), nbytes.copy()
    i = 0
    while i < nbytes.size:
        j = min(i + IOV_MAX, nbytes.size)
        liov = np.empty((j - i, 2), dtype=np.uint64)
        riov = np.empty((j - i, 2), dtype=np.uint64)
        liov[:, 0], riov[:, 0] = local[i:j], remote[i:j]
        liov[:, 1] = riov[:, 1] = nbytes[i:j]
        got = fn(pid, liov.ctypes.data, j - i, riov.ctypes.data, j - i, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise TransferFailedError(
                f"cma {op} with pid {pid} failed: {errno.errorcode.get(err, err)} "
                f"({os.strerror(err)})"
            )
        if got == 0:
            raise TransferFailedError(f"cma {op} with pid {pid} moved nothing")
        # partial transfers stop at an iovec boundary or inside one: resume there
        done = np.cumsum(nbytes[i:j])
        k = int(np.searchsorted(done, got, side="right"))
        if k < j - i:
            into = got - (int(done[k - 1]) if k else 0)
            local[i + k] += into
            remote[i + k] += into
            nbytes[i + k] -= into
        i += k


@dataclass(eq=False)
class _Job:
    op: Op
    peer: str
    notify: bytes
    device: int = -1  # CUDA device of a GPU copy, -1 for host memory
    event: Any = None
    futures: list[Future] = field(default_factory=list)
    notified: bool = False
    finished: bool = False


@dataclass
class _RemotePeer:
    pid: int
    notify: str
    starts: np.ndarray  # sorted region start addresses (the peer's)
    ends: np.ndarray
    delta: np.ndarray  # mapped address - peer address (0 for host memory)
    cuda: np.ndarray
    opened: list[tuple[bytes, int]]  # (ipc handle, device) to close
    sock: Any = None


class LocalTransport(Transport):
    """Copies between processes of one host (``host`` is accepted and unused)."""

    backend = "local"
    poll_max_seconds = 20e-6  # copies at HBM speed end within a millisecond or two

    def __init__(self, name: str, *, host: str | None = None, workers: int = 2):
        super().__init__(name)
        self.host_id = host_identity()
        self._zmq = zmq.Context.instance()
        self._inbox = self._zmq.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        path = os.path.join(tempfile.gettempdir(), f"kvb-{uuid.uuid4().hex[:20]}.sock")
        self._endpoint, self._path = f"ipc://{path}", path
        self._inbox.bind(self._endpoint)
        self._sock_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"local-{name}")
        self.workers = workers
        self._exports: list[dict] = []
        self._remote: dict[str, _RemotePeer] = {}
        self._cuda = None

    def _driver(self):
        if self._cuda is None:
            from kvbridge.connector.transfer.transport.cuda_ipc import CudaDriver

            self._cuda = CudaDriver.get()
        return self._cuda

    # ------------------------------------------------------------ registration
    def engine_metadata(self) -> bytes:
        return json.dumps({
            "host": self.host_id, "pid": os.getpid(), "notify": self._endpoint,
            "regions": [e for e in self._exports if e is not None],
        }).encode()  # fmt: skip

    def _register(self, region: MemRegion) -> Any:
        entry = {"addr": region.addr, "nbytes": region.nbytes, "cuda": region.is_cuda,
                 "device": region.device_index, "ipc": "", "offset": 0}  # fmt: skip
        if region.is_cuda:
            handle, offset = self._driver().export(region.addr, region.device_index)
            entry.update(ipc=handle.hex(), offset=offset)
        self._exports.append(entry)
        return len(self._exports) - 1

    def _deregister(self, handle: Any) -> None:
        self._exports[handle] = None

    def path_info(self, peer: str) -> str:
        r = self._remote.get(peer)
        return "cuda-ipc" if r is not None and r.cuda.any() else "cma"

    # ------------------------------------------------------------------- peers
    def same_host(self, engine_metadata: bytes) -> bool:
        """Whether a peer's local-transport metadata names this host and memory of the
        same kind as ours (host <-> GPU pairs are left to the network engines)."""
        try:
            meta = json.loads(engine_metadata)
            theirs = {bool(r["cuda"]) for r in meta["regions"]}
        except (ValueError, AttributeError, KeyError, TypeError):
            return False
        ours = {bool(e["cuda"]) for e in self._exports if e is not None}
        return meta.get("host") == self.host_id and (not ours or theirs == ours)

    def _add_peer(self, peer: str, engine_metadata: bytes) -> None:
        try:
            meta = json.loads(engine_metadata)
            regions = sorted(meta["regions"], key=lambda r: r["addr"])
            pid, notify = int(meta["pid"]), str(meta["notify"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HandshakeError(f"peer {peer!r}: bad local-transport metadata: {exc}") from None
        if meta.get("host") != self.host_id:
            raise HandshakeError(
                f"peer {peer!r} is not on this host (local transport needs the same boot, "
                "PID and network namespace)"
            )
        opened: list[tuple[bytes, int]] = []
        delta = []
        try:
            for r in regions:
                if not r["cuda"] or pid == os.getpid():
                    delta.append(0)
                    continue
                handle, dev = bytes.fromhex(r["ipc"]), self._device_for(r)
                base = self._driver().open(handle, dev)
                opened.append((handle, dev))
                delta.append(base + int(r["offset"]) - int(r["addr"]))
        except BaseException:
            for handle, dev in opened:
                self._driver().close(handle, dev)
            raise
        self._remote[peer] = _RemotePeer(
            pid, notify,
            np.array([r["addr"] for r in regions], dtype=np.int64),
            np.array([r["addr"] + r["nbytes"] for r in regions], dtype=np.int64),
            np.array(delta, dtype=np.int64),
            np.array([bool(r["cuda"]) for r in regions], dtype=bool),
            opened,
        )  # fmt: skip

    def _device_for(self, region: dict) -> int:
        """The local device to map a peer's GPU region on (ours, else the peer's ordinal)."""
        mine = [e["device"] for e in self._exports if e is not None and e["cuda"]]
        return mine[0] if mine else int(region["device"])

    def _remove_peer(self, peer: str) -> None:
        r = self._remote.pop(peer, None)
        if r is None:
            return
        with self._sock_lock:
            if r.sock is not None:
                r.sock.close(0)
        for handle, dev in r.opened:
            with contextlib.suppress(TransferFailedError):
                self._driver().close(handle, dev)

    # --------------------------------------------------------------- transfers
    def _map(self, r: _RemotePeer, addr: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(r.starts, addr, side="right") - 1
        if (idx < 0).any() or (addr + nbytes > r.ends[np.maximum(idx, 0)]).any():
            raise DescriptorError("a descriptor lies outside the peer's exported regions")
        return addr + r.delta[idx]

    def _post(self, op: Op, peer: str, descs: EngineDescriptors, notify: bytes) -> Any:
        r = self._remote[peer]
        d = descs
        if d.local_cuda != d.remote_cuda:
            raise DescriptorError("the local transport copies host<->host or GPU<->GPU only")
        remote = self._map(r, d.remote_addr, d.nbytes)
        job = _Job(op, peer, notify)
        if d.local_cuda:
            job.device = int(d.local_dev[0])
            src, dst = (remote, d.local_addr) if op == "READ" else (d.local_addr, remote)
            job.event = self._driver().copy(job.device, dst, src, d.nbytes)
            return job
        local, nbytes = d.local_addr, d.nbytes
        limit = max(PIECE_BYTES, -(-int(nbytes.sum()) // (4 * self.workers)))
        if int(nbytes.max()) > limit:  # cut big ranges so the workers share them
            pieces = -(-nbytes // limit)
            idx = np.repeat(np.arange(nbytes.size), pieces)
            within = (np.arange(idx.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * limit
            local, remote = local[idx] + within, remote[idx] + within
            nbytes = np.minimum(nbytes[idx] - within, limit)
        for part in np.array_split(np.arange(nbytes.size), min(self.workers, nbytes.size)):
            job.futures.append(self._pool.submit(
                cma_copy, op, r.pid, local[part], remote[part], nbytes[part]
            ))  # fmt: skip
        return job

    def _state(self, job: _Job) -> str:
        if job.device >= 0:
            try:
                return "done" if self._driver().done(job.device, job.event) else "pending"
            except TransferFailedError as exc:
                return f"failed: {exc}"
        if not all(f.done() for f in job.futures):
            return "pending"
        for f in job.futures:
            if f.cancelled():
                return "failed: cancelled"
            if f.exception() is not None:
                return f"failed: {f.exception()}"
        return "done"

    def _check(self, handle: _Job) -> str:
        state = self._state(handle)
        if state != "pending":
            self._finish(handle, state == "done")
        return state

    def _finish(self, job: _Job, ok: bool) -> None:
        """Once: tell the peer (after the data) and free the event."""
        if job.finished:
            return
        job.finished = True
        if job.event is not None:
            with contextlib.suppress(TransferFailedError):
                self._driver().destroy(job.device, job.event)
            job.event = None
        if ok and job.notify:
            self._send(job.peer, job.notify)

    def _send(self, peer: str, payload: bytes) -> None:
        r = self._remote.get(peer)
        if r is None:
            return
        with self._sock_lock:
            if r.sock is None:
                r.sock = self._zmq.socket(zmq.PUSH)
                r.sock.setsockopt(zmq.LINGER, 1000)
                r.sock.setsockopt(zmq.SNDTIMEO, 1000)
                r.sock.connect(r.notify)
            try:
                r.sock.send_multipart([self.name.encode(), payload])
            except zmq.ZMQError as exc:
                log.warning("local transport could not notify %s: %s", peer, exc)

    def _release(self, handle: _Job) -> None:
        for f in handle.futures:
            f.cancel()

    def _quiesced(self, handle: _Job) -> bool:
        if handle.finished:
            return True
        if self._state(handle) == "pending":
            return False
        self._finish(handle, False)
        return True

    def _notifications(self) -> list[tuple[str, bytes]]:
        out = []
        with self._sock_lock:
            while True:
                try:
                    sender, payload = self._inbox.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except ValueError:  # a malformed frame set
                    continue
                out.append((sender.decode(errors="replace"), payload))
        return out

    def _close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._sock_lock:
            self._inbox.close(0)
        with contextlib.suppress(OSError):
            os.unlink(self._path)


__all__ = ["LocalTransport", "cma_copy", "host_identity"]

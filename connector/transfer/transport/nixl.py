"""NIXL backend (UCX): host memory here, GPU memory (``VRAM``) where present.

Registration is one ``register_memory`` call per region. A request is one NIXL
transfer: the descriptor arrays become two ``Nx3`` ``(addr, len, dev)`` uint64
arrays (vectorised, no Python loop), NIXL validates them against the registered
regions in C++ and posts them; ``notify`` rides on the transfer and reaches the
peer after the data. Why per-request lists rather than per-peer prepped lists
indexed per request: connector/README.md ("Descriptor lists").
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import threading
import time
from typing import Any

import numpy as np
from kvbridge.connector.transfer.errors import (
    EngineUnavailableError,
    HandshakeError,
    TransferFailedError,
)
from kvbridge.connector.transfer.transport.base import (
    EngineDescriptors,
    MemRegion,
    Op,
    Transport,
)

log = logging.getLogger(__name__)

PIP_NAME = "nixl-cu12"
#: UCX settings applied with ``os.environ.setdefault`` before the first agent starts.
UCX_DEFAULTS: dict[str, str] = {}


def split_descriptors(limit: int, d: EngineDescriptors) -> EngineDescriptors:
    """Cut descriptors longer than ``limit`` bytes into pieces (vectorised).

    UCX's multi-threaded backend spreads the descriptors of one request over its
    threads; a few huge ranges would keep one thread busy (see README).
    """
    pieces = -(-d.nbytes // limit)
    idx = np.repeat(np.arange(d.nbytes.size), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    within = (np.arange(idx.size) - first) * limit
    return dataclasses.replace(
        d,
        local_addr=d.local_addr[idx] + within,
        local_dev=d.local_dev[idx],
        remote_addr=d.remote_addr[idx] + within,
        remote_dev=d.remote_dev[idx],
        nbytes=np.minimum(d.nbytes[idx] - within, limit),
    )


def _rdma_devices() -> list[str]:
    try:
        return os.listdir("/sys/class/infiniband")
    except OSError:
        return []


def ucx_environment() -> dict[str, str]:
    """UCX environment defaults for this host.

    Without RDMA devices, UCX's InfiniBand modules are not loaded: they pull the
    system's libibverbs providers and with them a second copy of libnl, whose
    destructor crashes every process at exit (SIGSEGV in ``rtnl_tc_unregister``).
    """
    env = dict(UCX_DEFAULTS)
    if not _rdma_devices():
        env["UCX_MODULES"] = "^ib,rdmacm"
    return env


#: Sleep of NIXL's progress thread between idle polls. The Python wrapper sets 0,
#: which spins a core per agent even when idle (measured: 0.7 core); see README.
PROGRESS_DELAY_US = 100
ADD_PEER_ATTEMPTS = 4
#: UCX backend threads; a request's descriptors are spread over them.
NUM_THREADS = 2
#: Host-memory descriptors are cut into pieces before posting so the threads share
#: a coalesced request (a few huge ranges keep one thread busy): about SPLIT_PIECES
#: pieces per request, none smaller than SPLIT_BYTES (measured: bench/README.md).
SPLIT_BYTES = 64 << 10
SPLIT_PIECES = 8192
_CTOR_LOCK = threading.Lock()


def _make_agent(mod, name: str, cfg, progress_delay_us: int):
    """``nixl_agent(name, cfg)`` with the progress thread's delay set.

    The wrapper builds its ``nixlAgentConfig`` internally and hard-codes
    ``pthrDelay = 0``; the bindings' constructor is wrapped for this one call.
    """
    api = sys.modules[mod.nixl_agent.__module__]
    bind = api.nixlBind
    original = bind.nixlAgent

    def construct(agent_name, agent_config):
        agent_config.pthrDelay = int(progress_delay_us)
        return original(agent_name, agent_config)

    with _CTOR_LOCK:
        bind.nixlAgent = construct
        try:
            return mod.nixl_agent(name, cfg)
        finally:
            bind.nixlAgent = original


#: Import names of the NIXL wheels, tried in order (CUDA 12 build, CUDA 13 build, meta).
MODULES = ("nixl_cu12", "nixl_cu13", "nixl")


def _nixl():
    """The NIXL Python module (``nixl_agent``, ``nixl_agent_config``, ...)."""
    errors = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
            if hasattr(mod, "nixl_agent"):
                return mod
            mod = importlib.import_module(f"{name}._api")
            return mod
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise EngineUnavailableError(
        f"the nixl backend needs the {PIP_NAME!r} package (pip install {PIP_NAME}; "
        f"'nixl-cu13' on CUDA 13); imports failed: {'; '.join(errors)}"
    )


class NixlTransport(Transport):
    """A NIXL agent with one UCX backend.

    ``num_threads``: UCX backend threads sharing a request's descriptors;
    ``split_bytes``: smallest piece host descriptors are cut into (0: never cut);
    ``progress_thread`` / ``progress_delay_us``: NIXL's progress thread (needed:
    the target side of a read progresses nothing else) and its idle sleep;
    ``ucx_devices``: restrict UCX to these devices (e.g. ``"eth0"``; cold start and
    NIC selection); ``host`` is accepted and unused (UCX publishes every usable
    address itself); ``error_handling``: UCX peer-failure detection (``"peer"``: a dead
    peer fails transfers instead of hanging them).
    """

    backend = "nixl"

    def __init__(
        self,
        name: str,
        *,
        host: str | None = None,
        num_threads: int = NUM_THREADS,
        num_workers: int = 1,
        progress_thread: bool = True,
        ucx_devices: str = "",
        error_handling: str = "peer",
        progress_delay_us: int = PROGRESS_DELAY_US,
        split_bytes: int = SPLIT_BYTES,
    ):
        super().__init__(name)
        for key, value in ucx_environment().items():
            os.environ.setdefault(key, value)
        mod = _nixl()
        cfg = mod.nixl_agent_config(
            enable_prog_thread=progress_thread,
            backends=[],
            # the agent's side-channel thread may add peers while another thread posts
            sync_mode=mod.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        try:
            self._agent = _make_agent(mod, name, cfg, progress_delay_us)
            params = {
                "ucx_error_handling_mode": error_handling,
                "num_workers": str(num_workers),
                "ucx_devices": ucx_devices,
            }
            if num_threads > 0:
                params["num_threads"] = str(num_threads)
            for attempt in range(ADD_PEER_ATTEMPTS):  # same interface race as _add_peer
                try:
                    self._agent.create_backend("UCX", params)
                    break
                except Exception:
                    if attempt + 1 == ADD_PEER_ATTEMPTS:
                        raise
                    time.sleep(0.05 * 2**attempt)
        except Exception as exc:
            raise EngineUnavailableError(f"NIXL agent {name!r} could not start UCX: {exc}") from exc
        self._leaked: list[Any] = []
        self.split_bytes = int(split_bytes)

    # ------------------------------------------------------------ registration
    def engine_metadata(self) -> bytes:
        return bytes(self._agent.get_agent_metadata())

    @staticmethod
    def _mem_type(cuda: bool) -> str:
        return "VRAM" if cuda else "DRAM"

    def _register(self, region: MemRegion) -> Any:
        desc = [(region.addr, region.nbytes, region.device_index, "")]
        try:
            return self._agent.register_memory(desc, self._mem_type(region.is_cuda))
        except Exception as exc:
            raise TransferFailedError(
                f"NIXL could not register {region.nbytes} bytes at {region.addr:#x} "
                f"({region.device}): {exc}"
            ) from exc

    def _deregister(self, handle: Any) -> None:
        self._agent.deregister_memory(handle)

    # ------------------------------------------------------------------- peers
    def _add_peer(self, peer: str, engine_metadata: bytes) -> None:
        for attempt in range(ADD_PEER_ATTEMPTS):
            try:
                name = self._agent.add_remote_agent(engine_metadata)
                break
            except Exception as exc:
                # UCX fails endpoint creation when a network interface vanishes while
                # it enumerates them (veths of other processes): retry a few times
                if attempt + 1 == ADD_PEER_ATTEMPTS:
                    raise HandshakeError(
                        f"NIXL rejected the metadata of peer {peer!r}: {exc}"
                    ) from exc
                log.warning("NIXL add_remote_agent(%s) failed (%s); retrying", peer, exc)
                time.sleep(0.05 * 2**attempt)
        if isinstance(name, bytes):
            name = name.decode()
        if name != peer:
            self._agent.remove_remote_agent(name)
            raise HandshakeError(
                f"peer {peer!r} sent NIXL metadata of agent {name!r}; names must match"
            )
        try:  # warm the UCX endpoint now rather than on the first request
            self._agent.make_connection(peer)
        except Exception as exc:
            log.debug("NIXL make_connection(%s) failed: %s", peer, exc)

    def _remove_peer(self, peer: str) -> None:
        try:
            self._agent.remove_remote_agent(peer)
        except Exception as exc:
            log.debug("NIXL remove_remote_agent(%s): %s", peer, exc)

    # --------------------------------------------------------------- transfers
    @staticmethod
    def _descs(addr: np.ndarray, dev: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        out = np.empty((addr.size, 3), dtype=np.uint64)
        out[:, 0] = addr
        out[:, 1] = nbytes
        out[:, 2] = dev
        return out

    def _post(self, op: Op, peer: str, descs: EngineDescriptors, notify: bytes) -> Any:
        limit = 0 if descs.cuda else self._split_limit(descs.nbytes)
        if limit and int(descs.nbytes.max()) > limit:
            descs = split_descriptors(limit, descs)
        d, agent = descs, self._agent
        local = agent.get_xfer_descs(
            self._descs(d.local_addr, d.local_dev, d.nbytes), self._mem_type(d.local_cuda)
        )
        remote = agent.get_xfer_descs(
            self._descs(d.remote_addr, d.remote_dev, d.nbytes), self._mem_type(d.remote_cuda)
        )
        try:
            handle = agent.initialize_xfer(op, local, remote, peer, notify)
        except Exception as exc:
            raise TransferFailedError(
                f"NIXL could not prepare a {op} of {d.nbytes.size} descriptors with peer "
                f"{peer!r}: {exc}"
            ) from exc
        try:
            state = agent.transfer(handle, notify)
        except Exception as exc:
            self._release(handle)
            raise TransferFailedError(
                f"NIXL {op} with peer {peer!r} failed to post: {exc}"
            ) from exc
        if state == "ERR":
            self._release(handle)
            raise TransferFailedError(f"NIXL {op} with peer {peer!r} failed to post")
        return handle

    def _split_limit(self, nbytes: np.ndarray) -> int:
        """Piece size for a host request (0: no splitting)."""
        if self.split_bytes <= 0:
            return 0
        return max(self.split_bytes, -(-int(nbytes.sum()) // SPLIT_PIECES))

    def engine_descriptors(self, nbytes: np.ndarray, cuda: bool) -> int:
        limit = 0 if cuda else self._split_limit(nbytes)
        if not limit:
            return int(nbytes.size)
        return int((-(-nbytes // limit)).sum())

    def _check(self, handle: Any) -> str:
        try:
            state = self._agent.check_xfer_state(handle)
        except Exception as exc:  # remote disconnect and friends
            return f"failed: {type(exc).__name__}: {exc}"
        if state == "DONE":
            return "done"
        if state == "PROC":
            return "pending"
        return "failed: NIXL reported an error (peer gone or memory not registered)"

    def _release(self, handle: Any) -> None:
        try:
            handle.release()
        except Exception as exc:
            log.warning("NIXL could not release a transfer handle yet: %s", exc)
            self._leaked.append(handle)

    def _quiesced(self, handle: Any) -> bool:
        """A released handle is quiet unless NIXL refused to release it (still active)."""
        if not any(h is handle for h in self._leaked):
            return True
        try:
            handle.release()  # NIXL releases once the backend can cancel or has finished
        except Exception:
            return False
        self._leaked = [h for h in self._leaked if h is not handle]
        return True

    def _notifications(self) -> list[tuple[str, bytes]]:
        out = []
        for peer, msgs in self._agent.get_new_notifs().items():
            name = peer.decode() if isinstance(peer, bytes) else peer
            out.extend((name, bytes(m)) for m in msgs)
        return out

    def _close(self) -> None:
        for handle in self._leaked:
            with contextlib.suppress(Exception):
                handle.release()
        self._leaked.clear()
        self._agent = None

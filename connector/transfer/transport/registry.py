"""The transport registry: engine name -> where its class lives and what it needs.

Adding a transport is one module with a ``Transport`` subclass plus one entry
here; the CLI's choices, daemon config validation, the Helm schema test and the
test parametrisation read ``TRANSPORTS`` / ``BACKENDS``. Entries name their class
lazily, so listing transports imports no engine.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbridge.connector.transfer.transport.base import Transport


@dataclass(frozen=True)
class TransportInfo:
    """One registered transport."""

    name: str
    target: str  # "module:Class"
    engine_modules: tuple[str, ...]  # import names of the engine's Python package (any one)
    pip_name: str
    summary: str
    same_host: bool = False  # reaches peers of this host only

    def load(self) -> type[Transport]:
        """The transport class (imports its module, not yet the engine)."""
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)

    def available(self) -> bool:
        """Whether the engine's Python package is installed (nothing is imported)."""
        for mod in self.engine_modules:
            try:
                if importlib.util.find_spec(mod.split(".")[0]) is not None:
                    return True
            except (ImportError, ValueError):
                continue
        return False


_PKG = "kvbridge.connector.transfer.transport"

TRANSPORTS: dict[str, TransportInfo] = {
    info.name: info
    for info in (
        TransportInfo(
            "nixl",
            f"{_PKG}.nixl:NixlTransport",
            ("nixl_cu12", "nixl_cu13", "nixl"),
            "nixl-cu12",
            "NIXL over UCX (host memory; GPU memory where built with CUDA)",
        ),
        TransportInfo(
            "mooncake",
            f"{_PKG}.mooncake:MooncakeTransport",
            ("mooncake",),
            "mooncake-transfer-engine-non-cuda",
            "Mooncake transfer engine, P2P handshake, tcp or rdma",
        ),
        TransportInfo(
            "local",
            f"{_PKG}.local:LocalTransport",
            ("zmq",),
            "pyzmq",
            "same-host copies: CUDA IPC for GPU memory, cross-memory attach for host memory",
            same_host=True,
        ),
    )
}

#: Registered transport names, the default first.
BACKENDS: tuple[str, ...] = tuple(TRANSPORTS)
DEFAULT_BACKEND = BACKENDS[0]
#: Transports that reach other hosts (the same-host one is used beside them: ``LOCAL_MODES``).
NETWORK_BACKENDS: tuple[str, ...] = tuple(n for n, t in TRANSPORTS.items() if not t.same_host)
LOCAL_BACKEND: str = next(n for n, t in TRANSPORTS.items() if t.same_host)
#: ``KVTransferAgent(local=...)``: offer the same-host transport beside a network engine.
LOCAL_MODES = ("auto", "off")


def transport_info(backend: str) -> TransportInfo:
    """The registry entry of ``backend``; ``ValueError`` listing the known ones."""
    try:
        return TRANSPORTS[backend]
    except KeyError:
        raise ValueError(
            f"unknown transfer backend {backend!r}; supported: {', '.join(BACKENDS)}"
        ) from None

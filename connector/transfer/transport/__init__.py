"""Transports: one interface (base.py), one module per engine, a registry (registry.py)."""

from __future__ import annotations

from typing import Any

from kvbridge.connector.transfer.transport.base import (
    EngineDescriptors,
    MemRegion,
    PendingTransfer,
    RegionTable,
    Transport,
    import_engine,
)
from kvbridge.connector.transfer.transport.registry import (
    BACKENDS,
    DEFAULT_BACKEND,
    LOCAL_BACKEND,
    LOCAL_MODES,
    NETWORK_BACKENDS,
    TRANSPORTS,
    TransportInfo,
    transport_info,
)


def create_transport(backend: str, name: str, **options: Any) -> Transport:
    """A started transport of ``backend`` named ``name``.

    Options go to the backend's class (``host``, the address peers reach this
    process on, is accepted by every transport); a missing engine raises
    ``EngineUnavailableError`` naming the package to install.
    """
    return transport_info(backend).load()(name, **options)


__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "LOCAL_BACKEND",
    "LOCAL_MODES",
    "NETWORK_BACKENDS",
    "TRANSPORTS",
    "EngineDescriptors",
    "MemRegion",
    "PendingTransfer",
    "RegionTable",
    "Transport",
    "TransportInfo",
    "create_transport",
    "import_engine",
    "transport_info",
]

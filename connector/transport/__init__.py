"""Transports: one interface (base.py), one module per engine, imported lazily."""

from __future__ import annotations

from typing import Any

from .base import (
    EngineDescriptors,
    MemRegion,
    PendingTransfer,
    RegionTable,
    Transport,
    import_engine,
)

BACKENDS = ("nixl", "mooncake")


def create_transport(backend: str, name: str, **options: Any) -> Transport:
    """A started transport of ``backend`` named ``name``.

    Options go to the backend (``NixlTransport`` / ``MooncakeTransport``); a
    missing engine raises ``EngineUnavailableError`` naming the package to install.
    """
    if backend == "nixl":
        from .nixl import NixlTransport

        options.pop("host", None)  # UCX publishes every usable address itself
        return NixlTransport(name, **options)
    if backend == "mooncake":
        from .mooncake import MooncakeTransport

        return MooncakeTransport(name, **options)
    raise ValueError(f"unknown transfer backend {backend!r}; supported: {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "EngineDescriptors",
    "MemRegion",
    "PendingTransfer",
    "RegionTable",
    "Transport",
    "create_transport",
    "import_engine",
]

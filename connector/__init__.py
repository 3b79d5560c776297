"""kvbridge.connector: transports, handshake, transfer agent, daemons, CLI.

``KVTransferAgent`` and friends import lazily, so ``import kvbridge.connector``
(e.g. by the CLI) loads neither torch nor an engine.
"""

from __future__ import annotations

_LAZY = {
    "KVTransferAgent": "agent",
    "TransferResult": "transfer_request",
    "PendingRequest": "transfer_request",
    "HeadMap": "peers",
    "Peer": "peers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)

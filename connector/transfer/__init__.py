"""kvbridge.connector.transfer: the KV transfer library.

Agent, transports (a registry: ``transport.TRANSPORTS``), zmq side channel,
staging, wire metadata, peers and errors. Imports nothing from
``kvbridge.connector.serving``. Public names import lazily (no torch or engine
on ``import``).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "KVTransferAgent": "kvbridge.connector.transfer.agent",
    "TransferResult": "kvbridge.connector.transfer.transfer_request",
    "PendingRequest": "kvbridge.connector.transfer.transfer_request",
    "HeadMap": "kvbridge.connector.transfer.tp_mapping",
    "Peer": "kvbridge.connector.transfer.peers",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)

"""kvbridge.connector: the transfer library and the serving application built on it.

* ``kvbridge.connector.transfer``: the library (agent, transports, side channel,
  staging, wire metadata, peers, errors). It never imports the application.
* ``kvbridge.connector.serving``: the application (daemons, model, CLI, demo).

``KVTransferAgent`` and friends are re-exported lazily, so ``import
kvbridge.connector`` (e.g. by the CLI) loads neither torch nor an engine.
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

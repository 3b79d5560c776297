"""kvbridge.connector: the transfer library and the serving application built on it.

* ``kvbridge.connector.transfer``: the library (agent, transports, side channel,
  staging, wire metadata, peers, errors). It never imports the application.
* ``kvbridge.connector.serving``: the application (daemons, model, CLI, demo).

``KVTransferAgent`` and friends are re-exported lazily, so ``import
kvbridge.connector`` (e.g. by the CLI) loads neither torch nor an engine.
"""

from __future__ import annotations

from kvbridge.connector.transfer import _LAZY


def __getattr__(name: str):
    if name in _LAZY:  # the library's public names, imported lazily
        from kvbridge.connector import transfer

        return getattr(transfer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)

"""Test parametrisation over the transport registry (one source of engine names).

``BACKENDS`` are the network engines (the same-host transport has tests of its own:
tests/connector/test_local_transport.py).
"""

from __future__ import annotations

import pytest
from kvbridge.connector.transfer.transport import LOCAL_BACKEND, NETWORK_BACKENDS, TRANSPORTS

BACKENDS = NETWORK_BACKENDS

__all__ = ["BACKENDS", "LOCAL_BACKEND", "available", "backend_params", "require"]


def available(backend: str) -> bool:
    """Whether ``backend``'s engine package is installed (nothing is imported)."""
    return TRANSPORTS[backend].available()


def require(backend: str) -> str:
    """Skip the calling test unless ``backend``'s engine is installed."""
    if not available(backend):
        pytest.skip(f"{TRANSPORTS[backend].pip_name} is not installed")
    return backend


def backend_params() -> list:
    """``pytest.param`` per network transport, skipped where its engine is missing."""
    return [
        pytest.param(
            b,
            marks=pytest.mark.skipif(
                not available(b), reason=f"{TRANSPORTS[b].pip_name} is not installed"
            ),
        )
        for b in BACKENDS
    ]

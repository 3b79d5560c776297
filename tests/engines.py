"""Test parametrisation over the transport registry (one source of engine names)."""

from __future__ import annotations

import pytest
from kvbridge.connector.transfer.transport import BACKENDS, TRANSPORTS

__all__ = ["BACKENDS", "available", "backend_params", "require"]


def available(backend: str) -> bool:
    """Whether ``backend``'s engine package is installed (nothing is imported)."""
    return TRANSPORTS[backend].available()


def require(backend: str) -> str:
    """Skip the calling test unless ``backend``'s engine is installed."""
    if not available(backend):
        pytest.skip(f"{TRANSPORTS[backend].pip_name} is not installed")
    return backend


def backend_params() -> list:
    """``pytest.param`` per registered transport, skipped where its engine is missing."""
    return [
        pytest.param(
            b,
            marks=pytest.mark.skipif(
                not available(b), reason=f"{TRANSPORTS[b].pip_name} is not installed"
            ),
        )
        for b in BACKENDS
    ]

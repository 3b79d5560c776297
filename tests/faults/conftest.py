"""Fixtures of the fault tests: engines present, a fresh test network per test."""

from __future__ import annotations

import pytest
from engines import BACKENDS, require
from netlab import NetLab, unavailable


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return require(request.param)


@pytest.fixture
def lab():
    """A namespace + veth (root, ip, tc, nft); deleted afterwards even on failure."""
    why = unavailable()
    if why:
        pytest.skip(why)
    net = NetLab()
    try:
        yield net
    finally:
        net.close()

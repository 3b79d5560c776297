"""Fixtures of the fault tests: engines present, a fresh test network per test."""

from __future__ import annotations

import importlib.util

import pytest
from netlab import NetLab, unavailable


@pytest.fixture(params=["nixl", "mooncake"])
def backend(request) -> str:
    module = {"nixl": "nixl_cu12", "mooncake": "mooncake"}[request.param]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    return request.param


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

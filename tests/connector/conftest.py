"""Fixtures of the transport/agent tests: two peer processes per backend per session."""

from __future__ import annotations

import pytest
from engines import BACKENDS, require
from xfer_harness import PeerProcess


@pytest.fixture(scope="session")
def peer_processes():
    procs: dict[tuple[str, str], PeerProcess] = {}
    yield procs
    for p in procs.values():
        p.close()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return require(request.param)


@pytest.fixture
def procs(peer_processes, backend) -> tuple[PeerProcess, PeerProcess]:
    """Two OS processes hosting agents of ``backend`` (spawned once per session)."""
    out = []
    for side in ("a", "b"):
        key = (backend, side)
        if key not in peer_processes or not peer_processes[key].proc.is_alive():
            peer_processes[key] = PeerProcess(backend)
        out.append(peer_processes[key])
    return tuple(out)

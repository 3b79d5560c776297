"""Fixtures of the transport/agent tests: two peer processes per backend per session."""

from __future__ import annotations

import pytest
from xfer_harness import PeerProcess

BACKENDS = ("nixl", "mooncake")


def _engine_available(backend: str) -> bool:
    try:
        if backend == "nixl":
            import nixl_cu12  # noqa: F401
        else:
            import mooncake.engine  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def peer_processes():
    procs: dict[tuple[str, str], PeerProcess] = {}
    yield procs
    for p in procs.values():
        p.close()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if not _engine_available(request.param):
        pytest.skip(f"{request.param} engine not installed")
    return request.param


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

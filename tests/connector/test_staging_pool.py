"""StagingPool: bounded buffers, and a buffer still read by a relayout is not reused early."""

from __future__ import annotations

import pytest
from kvbridge.connector.transfer.staging import StagingPool, StagingUnsupported
from kvbridge.connector.transfer.transport import create_transport


class FakeEvent:
    """Stands in for the relayout's CUDA event (the CPU has none): counts waits."""

    def __init__(self) -> None:
        self.waits = 0

    def synchronize(self) -> None:
        self.waits += 1


@pytest.fixture()
def pool():
    transport = create_transport("local", "staging-test")
    p = StagingPool(transport, "cpu", max_bytes=8 << 20, max_buffers=2)
    yield p
    p.close()
    transport.close()


def test_buffer_given_back_with_an_event_waits_for_it_before_reuse(pool):
    buf = pool.acquire(1 << 20, timeout=1.0)[0]

    event = FakeEvent()
    pool.give_back(buf, event)
    assert event.waits == 0  # giving back does not block the finishing request
    again = pool.acquire(1 << 20, timeout=1.0)[0]
    assert again is buf and event.waits == 1  # the next user waited for the relayout
    assert buf.ready is None
    pool.give_back(again)
    pool.acquire(1 << 20, timeout=1.0)
    assert event.waits == 1  # waited once only


def test_pool_bounds_buffers_and_bytes(pool):
    a = pool.acquire(1 << 20, timeout=1.0)[0]
    pool.acquire(1 << 20, timeout=1.0)
    with pytest.raises(TimeoutError):
        pool.acquire(1 << 20, timeout=0.05)
    pool.give_back(a)
    with pytest.raises(StagingUnsupported):
        pool.acquire(9 << 20, timeout=0.05)

"""Units of the churn hardening: Release tombstones, peer status mapping, rate-limited
warnings, the side-channel probe, the default engine name. (Against real daemons:
tests/faults/test_churn*.py.)"""

from __future__ import annotations

import logging
import re
import socket
import time

import grpc
import pytest
from kvbridge.connector.serving.daemon.admission import RateLimitedLog, worker_count
from kvbridge.connector.serving.daemon.allocator import BlockAllocator
from kvbridge.connector.serving.daemon.config import DaemonConfig
from kvbridge.connector.serving.daemon.leases import (
    TOMBSTONE_SECONDS,
    LeaseRevokedError,
    LeaseTable,
)
from kvbridge.connector.serving.daemon.pull import Puller, PullError, probe
from kvbridge.connector.serving.daemon.status import none_answered, peer_code, peer_failure
from kvbridge.connector.transfer.errors import PeerUnreachableError

S = grpc.StatusCode


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_release_before_grant_leaves_a_tombstone_that_refuses_the_lease():
    alloc, clock = BlockAllocator(8), _Clock()
    leases = LeaseTable(alloc, clock=clock)
    assert leases.release("r1", "by peer") is None and leases.num_tombstones == 1
    blocks = alloc.allocate(2)
    with pytest.raises(LeaseRevokedError, match="released by its peer"):
        leases.grant("r1", blocks, "peer", 10)
    assert leases.num_leases == 0 and leases.num_tombstones == 0  # consumed
    lease = leases.grant("r2", blocks, "peer", 10)
    assert leases.release("r2", "pulled") is lease and alloc.num_free == 8
    # a tombstone is forgotten after TOMBSTONE_SECONDS (the reaper's pass)
    leases.release("r3", "by peer")
    clock.now += TOMBSTONE_SECONDS + 1
    leases.expire_due()
    assert leases.num_tombstones == 0
    leases.grant("r3", alloc.allocate(1), "peer", 10)  # granted: the tombstone is gone


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        (S.UNAUTHENTICATED, S.FAILED_PRECONDITION),
        (S.PERMISSION_DENIED, S.FAILED_PRECONDITION),
        (S.UNIMPLEMENTED, S.FAILED_PRECONDITION),
        (S.INVALID_ARGUMENT, S.FAILED_PRECONDITION),
        (S.RESOURCE_EXHAUSTED, S.RESOURCE_EXHAUSTED),
        (S.UNAVAILABLE, S.UNAVAILABLE),
        (S.DEADLINE_EXCEEDED, S.DEADLINE_EXCEEDED),
        (S.INTERNAL, S.UNAVAILABLE),
        (S.UNKNOWN, S.UNAVAILABLE),
        (S.CANCELLED, S.UNAVAILABLE),
    ],
)
def test_peer_errors_are_wrapped_never_passed_through(theirs, ours):
    err = peer_failure("prefill daemon p:1", _RpcError(theirs, "why"))
    assert err.code == ours == peer_code(theirs)
    assert f"call to prefill daemon p:1 ended with {theirs.name}: why" in str(err)
    gone = peer_failure("prefill daemon p:1", _RpcError(theirs, "why"), caller_gone=True)
    assert gone.code == S.CANCELLED


def test_none_answered_prefers_capacity_over_unavailable():
    full = peer_failure("a", _RpcError(S.RESOURCE_EXHAUSTED, "full"))
    down = peer_failure("b", _RpcError(S.UNAVAILABLE, "down"))
    assert none_answered([down, full]).code == S.RESOURCE_EXHAUSTED
    assert none_answered([down]).code == S.UNAVAILABLE
    assert none_answered([]).code == S.UNAVAILABLE


def test_rate_limited_warnings_say_how_many_were_suppressed(caplog):
    log = RateLimitedLog(logging.getLogger("kvbridge.test.rate"), every=0.2)
    with caplog.at_level(logging.WARNING):
        logged = [log.warning("k", "refused") for _ in range(50)]
        time.sleep(0.25)
        logged.append(log.warning("k", "refused"))
        logged.append(log.warning("other", "refused"))
    assert logged.count(True) == 3
    assert [r.suppressed for r in caplog.records] == [0, 49, 0]


def test_probe_fails_fast_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        t0 = time.monotonic()
        with pytest.raises(PeerUnreachableError, match="refuses connections"):
            probe(f"127.0.0.1:{port}", 5.0)
        assert time.monotonic() - t0 < 3.0  # refused at once, not the 5 s timeout
        s.listen()
        probe(f"127.0.0.1:{port}", 5.0)  # listening: passes


def test_default_engine_name_is_new_at_every_start_and_stable_within_one():
    a, b = DaemonConfig(role="prefill"), DaemonConfig(role="prefill")
    assert a.name == b.name  # one process, one name
    assert re.fullmatch(r"prefill-.+-\d+-[0-9a-f]{6}", a.name), a.name
    assert DaemonConfig(role="prefill", engine_name="x").name == "x"
    assert worker_count(a.max_requests) > a.max_requests  # workers kept for control calls


class _Agent:
    """Stand-in transfer agent: no peer yet, records disconnects."""

    def __init__(self) -> None:
        self.peers: dict = {}
        self.disconnected: list[str] = []

    def disconnect(self, name: str) -> None:
        self.disconnected.append(name)


def test_a_wait_for_another_handshake_that_times_out_drops_no_peer():
    """Timing out behind another request's handshake is retryable and leaves the peer
    that handshake makes alone (dropping it failed pulls posting to it: unknown peer)."""
    agent = _Agent()
    puller = Puller(agent, logging.getLogger("test"))
    busy = pytest.raises(PullError, match="another handshake did not finish")
    with puller._connect_lock, busy as err:  # another request is handshaking
        puller.connect("prefill-0", "127.0.0.1:1", 0.01)
    assert err.value.retryable and not err.value.posted
    assert agent.disconnected == []

"""Daemons SIGKILLed mid-transfer (real processes, a rate-limited veth so the pull is slow).

* prefill killed while the decode daemon pulls: the request fails with a clear status
  within the transfer timeout, the decode daemon frees every block (after the
  engine lets go of them), and once a prefill daemon is back the next request succeeds;
* decode killed after the prefill leased its blocks: the lease expires and the blocks
  are freed, visible in Stats and /metrics.
"""

from __future__ import annotations

import time

import grpc
import pytest
from faultkit import (
    Pair,
    assert_clean,
    gen,
    healthy,
    in_thread,
    prompt_ids,
    record,
    reference_tokens,
    stats,
    wait_for,
)
from kvbridge.connector.serving.daemon.health import LIVENESS_SERVICE
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

pytestmark = [pytest.mark.faults, pytest.mark.netns]

TRANSFER_TIMEOUT = 6.0


def _wait_transferring(stub, request_id: str) -> None:
    wait_for(
        lambda: (
            (r := record(stub, request_id)) is not None and r.state == pb.REQUEST_STATE_TRANSFERRING
        ),
        30,
        f"{request_id} transferring",
        every=0.02,
    )


def test_prefill_sigkill_mid_transfer(backend, lab, tmp_path):
    pair = Pair(lab, backend, tmp_path, decode_args=(
        "--transfer-timeout", str(TRANSFER_TIMEOUT), "--request-timeout", "10"))  # fmt: skip
    try:
        pair.start()
        ids = prompt_ids(6, seed=1)  # 6 blocks, 196 KB: ~5 s at 300 kbit/s
        lab.shape("300kbit")
        fut = in_thread(gen, pair.d, ids, 4, "victim")
        _wait_transferring(pair.d, "victim")
        time.sleep(0.3)
        t0 = time.monotonic()
        pair.prefill.kill()
        with pytest.raises(grpc.RpcError) as info:
            fut.result(timeout=60)
        elapsed = time.monotonic() - t0
        err = info.value
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "KV pull" in err.details() or "prefill" in err.details(), err.details()
        assert elapsed < TRANSFER_TIMEOUT + 4, f"failed after {elapsed:.1f} s"
        rec = record(pair.d, "victim")
        assert rec.state == pb.REQUEST_STATE_FAILED and rec.error
        wait_for(lambda: (s := stats(pair.d)).blocks_in_use == 0 and s.quarantined_blocks == 0,
                 20, "decode frees the blocks of the failed pull")  # fmt: skip
        s = stats(pair.d)
        assert s.counters.transfer_failures >= 1 and s.guard_band_bytes_changed == 0
        assert healthy(pair.decode, LIVENESS_SERVICE)  # up, and
        # not ready while its only prefill daemon is dead (the pool checks every second)
        wait_for(lambda: not healthy(pair.decode), 5, "readiness follows the dead prefill")
        # a prefill daemon comes back on the same address: requests succeed again
        lab.unshape()
        pair.start_prefill()
        deadline, attempts = time.monotonic() + 20, 0
        while True:
            attempts += 1
            try:
                g = gen(pair.d, ids, 4, f"after-{attempts}")
                break
            except grpc.RpcError as exc:  # the decode's channel may still be in backoff
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() < deadline, exc.details()
                time.sleep(0.5)
        assert g.token_ids == reference_tokens(ids, 4) and g.transfer.kv_checksum
        assert attempts <= 6
        assert_clean(pair)
    finally:
        pair.close()


def test_decode_killed_after_prefill_lease_expires(lab, tmp_path):
    """The prefill's lease is the only thing that frees its blocks here (NIXL; the lease
    logic is the same for both engines)."""
    lease = 3.0
    pair = Pair(lab, "nixl", tmp_path, prefill_args=("--lease-seconds", str(lease)),
                decode_args=("--transfer-timeout", "30"))  # fmt: skip
    try:
        pair.start()
        before = pair.prefill.metrics()
        lab.shape("200kbit")  # a 6-block pull would take ~8 s, longer than the lease
        fut = in_thread(gen, pair.d, prompt_ids(6, seed=2), 4, "orphan")
        _wait_transferring(pair.d, "orphan")
        pair.decode.kill()
        with pytest.raises(grpc.RpcError):
            fut.result(timeout=30)
        s = stats(pair.p)
        assert s.leased_blocks == 6, "the prefill holds the blocks for the dead peer"
        waited = wait_for(lambda: stats(pair.p).leased_blocks == 0, lease + 5, "lease expiry")
        assert waited <= lease + 2
        s = stats(pair.p)
        assert s.blocks_in_use == 0 and s.free_blocks == s.num_blocks
        assert s.counters.lease_expiries == 1 and s.guard_band_bytes_changed == 0
        rid = next(r for r in s.requests if r.request_id.endswith("/orphan"))
        assert rid.state == pb.REQUEST_STATE_FAILED and "lease expired" in rid.error
        m = pair.prefill.metrics()
        assert m["kvbridge_lease_expiries_total"] == before["kvbridge_lease_expiries_total"] + 1
        assert m["kvbridge_blocks_leased"] == 0 and m["kvbridge_blocks_in_use"] == 0
        assert healthy(pair.prefill)
    finally:
        pair.close()

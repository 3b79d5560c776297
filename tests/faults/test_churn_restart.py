"""A prefill daemon restarted under the same engine name and the same addresses (a
container whose daemon is PID 1): the decode daemon sees a new incarnation in the
handle, handshakes again, and serves the first request after the restart without a
failed transfer, a retry or a quarantined block (both engines). The gRPC channel,
in reconnect backoff after the restart, is waited for within the deadline instead
of failing the request."""

from __future__ import annotations

import pytest
from engines import backend_params
from faultkit import LAYOUTS, daemon_args, gen, prompt_ids, reference_tokens, stats
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("backend", backend_params())
def test_restarted_prefill_is_a_new_peer(backend, tmp_path):
    pl, dl = LAYOUTS[backend]
    grpc_port, side_port = free_port(), free_port()
    p_args = daemon_args(backend, pl, "--grpc-port", str(grpc_port), "--side-port",
                         str(side_port))  # fmt: skip

    def prefill(run: int) -> DaemonProcess:
        return DaemonProcess("prefill", p_args, tmp_path / f"run{run}", "restart-p").start()

    first = prefill(0)
    first.wait_ready(90)
    decode = DaemonProcess(
        "decode", daemon_args(backend, dl, "--side-port", str(free_port()), "--prefill",
                              first.target), tmp_path, "restart-d").start()  # fmt: skip
    second = None
    try:
        decode.wait_ready(90)
        with decode.channel() as ch:
            d = pb_grpc.KVBridgeServiceStub(ch)
            ids = prompt_ids(2, 31)
            assert gen(d, ids, 3).token_ids == reference_tokens(ids, 3)
            first.kill()
            second = prefill(1)
            second.wait_ready(90)
            assert second.info["engine_name"] == first.info["engine_name"]
            before = stats(d).counters
            ids = prompt_ids(3, 32)
            g = gen(d, ids, 3, timeout=30)  # the first request after the restart
            assert g.token_ids == reference_tokens(ids, 3)
            assert g.transfer.attempts == 1
            s = stats(d)
            assert s.quarantined_blocks == 0
            assert s.counters.transfer_failures == before.transfer_failures
            assert s.counters.transfer_retries == before.transfer_retries
            assert s.counters.requests_failed == before.requests_failed
    finally:
        codes = [p.terminate(20) for p in (decode, second) if p is not None]
        first.kill()
    assert codes == [0] * len(codes)

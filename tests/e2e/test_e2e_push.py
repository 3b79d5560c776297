"""Direction choice between real daemons: a decode daemon whose reads are degraded
(test hook ``--degrade READ=0``) has the prefill daemon push, byte-exact (KV checksum
and tokens against the monolithic model), with the path in Stats and /metrics; a
decode daemon on the same host pulls through the local transport; a prefill
daemon killed mid-push leaves the decode's blocks quarantined until the drain time,
then freed."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from e2e_cluster import BLOCK_SIZE, Client, daemon_args
from engines import BACKENDS, LOCAL_BACKEND, available
from kvbridge.connector.serving.client import generate
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, generate_monolithic
from kvbridge.connector.serving.procs import DaemonProcess
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

if not available(BACKENDS[0]):
    pytest.skip(f"the {BACKENDS[0]} engine is not installed", allow_module_level=True)
BACKEND = BACKENDS[0]
CFG = ModelConfig()


def _ids(blocks: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, CFG.vocab_size) for _ in range(blocks * BLOCK_SIZE)]


def _reference(ids: list[int], n: int) -> list[int]:
    return generate_monolithic(LlamaModel.random(CFG), ids, n, layout="nhd", block_size=BLOCK_SIZE)


def _wait(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def _start(*procs: DaemonProcess) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.wait_ready(90)


def test_degraded_reads_push_and_same_host_pulls_local(tmp_path):
    args = daemon_args(BACKEND, "packed", "--local-transport", "auto")
    prefill = DaemonProcess("prefill", args, tmp_path, name="pp-prefill")
    procs = [prefill]
    try:
        _start(prefill)
        pushed = DaemonProcess("decode", daemon_args(
            BACKEND, "nhd", "--prefill", prefill.target, "--degrade", "READ=0"),
            tmp_path, name="pp-decode-push")  # fmt: skip
        local = DaemonProcess("decode", daemon_args(
            BACKEND, "hnd", "--prefill", prefill.target, "--local-transport", "auto"),
            tmp_path, name="pp-decode-local")  # fmt: skip
        procs += [pushed, local]
        _start(pushed, local)
        d, p, lo = Client(pushed.target), Client(prefill.target), Client(local.target)
        for i in range(2):
            ids = _ids(2 + i, seed=i)
            g = generate(d.stub, prompt_token_ids=ids, max_new_tokens=4, verify_kv=True,
                         request_id=f"push-{i}", timeout=120)  # fmt: skip
            assert g.token_ids == _reference(ids, 4)
            t = g.transfer
            assert (t.direction, t.engine, t.prefill_engine) == ("push", BACKEND, prefill.name)
            assert t.kv_checksum and t.bytes == t.num_blocks * 32768
        s = d.stats()
        (path,) = s.peer_paths
        assert path.peer == prefill.name and path.engine == BACKEND
        assert path.direction == "WRITE" and list(path.degraded) == ["READ"]
        assert "test hook" in path.read_error and path.write_bytes_per_second > 0
        assert path.probe_bytes == 1 << 20 and path.probed_unix_ms > 0
        m = pushed.metrics()
        key = "kvbridge_peer_bandwidth_bytes_per_second{op=%s,peer=" + prefill.name + "}"
        assert m[key % "read"] == 0 and m[key % "write"] > 0
        assert s.blocks_in_use == 0 and s.quarantined_blocks == 0
        ps = p.stats()
        assert ps.leased_blocks == 0 and ps.blocks_in_use == 0 and ps.counters.lease_expiries == 0
        assert ps.counters.leases_released >= 2
        _bad_pushes(p, pushed)
        # the other decode daemon shares the host: it pulls through the local transport
        ids = _ids(3, seed=7)
        g = generate(lo.stub, prompt_token_ids=ids, max_new_tokens=4, verify_kv=True,
                     timeout=120)  # fmt: skip
        assert g.token_ids == _reference(ids, 4)
        assert (g.transfer.direction, g.transfer.engine) == ("pull", LOCAL_BACKEND)
        (path,) = lo.stats().peer_paths
        assert path.engine == LOCAL_BACKEND and path.transport == "cma"
        assert path.direction == "READ" and not path.degraded
        for c in (d, p, lo):
            c.close()
    finally:
        codes = [proc.terminate(30) for proc in reversed(procs)]
    assert codes == [0] * len(procs), [proc.log_tail() for proc in procs]


def test_prefill_killed_mid_push(tmp_path):
    """The push runs at 16 kB/s (test hook), the prefill is SIGKILLed mid-way: the request
    fails cleanly, the decode holds the blocks the push could still write until its
    drain time (no notice can come), then frees them; a new prefill serves again."""
    drain = 3.0
    prefill_args = daemon_args(BACKEND, "packed", "--degrade", "WRITE=16000")
    prefill = DaemonProcess("prefill", prefill_args, tmp_path, name="kp-prefill")
    procs = [prefill]
    try:
        _start(prefill)
        decode = DaemonProcess("decode", daemon_args(
            BACKEND, "nhd", "--prefill", prefill.target, "--degrade", "READ=0",
            "--engine-drain-seconds", str(drain), "--pull-retries", "0"),
            tmp_path, name="kp-decode")  # fmt: skip
        procs.append(decode)
        _start(decode)
        d = Client(decode.target)
        ids = _ids(3, seed=11)  # 96 kB: about 6 s at 16 kB/s
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(err=_call(d, ids)), daemon=True)
        thread.start()
        _wait(lambda: any(r.state == pb.REQUEST_STATE_TRANSFERRING for r in d.stats().requests),
              30, "the push")  # fmt: skip
        time.sleep(1.0)
        prefill.kill()
        thread.join(30)
        err = out["err"]
        assert isinstance(err, grpc.RpcError), err
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "push" in err.details(), err.details()
        s = d.stats()
        assert s.quarantined_blocks > 0, "blocks the dead push could write were freed at once"
        assert s.counters.transfer_failures >= 1
        waited = _wait(lambda: (x := d.stats()).quarantined_blocks == 0 and x.blocks_in_use == 0,
                       drain + 10, "quarantine to end")  # fmt: skip
        assert waited <= drain + 5
        # a prefill daemon on the same address serves again (pushes again: reads still fail)
        port = prefill.target.rsplit(":", 1)[1]
        again = [*prefill_args[:-2], "--grpc-port", port]  # same addresses, full speed
        prefill = DaemonProcess("prefill", again, tmp_path, name="kp-prefill")
        procs[0] = prefill
        _start(prefill)
        deadline = time.monotonic() + 20
        while True:
            try:
                g = generate(d.stub, prompt_token_ids=ids, max_new_tokens=3, verify_kv=True,
                             timeout=60)  # fmt: skip
                break
            except grpc.RpcError as exc:
                assert time.monotonic() < deadline, exc.details()
                time.sleep(0.5)
        assert g.token_ids == _reference(ids, 3) and g.transfer.direction == "push"
        d.close()
    finally:
        for proc in reversed(procs):
            proc.terminate(30)


def _bad_pushes(p: Client, decode: DaemonProcess) -> None:
    """Push refusals name what is wrong, post nothing, and leave the lease to Release."""
    h = p.stub.Prefill(pb.PrefillRequest(request_id="bad-push", prompt_token_ids=_ids(2, 3),
                                         requester=decode.name), timeout=30).handle  # fmt: skip

    def push(**kw):
        args = {"request_id": h.request_id, "engine_name": decode.name,
                "block_ids": [1, 2], "timeout_seconds": 5.0, **kw}  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            p.stub.Push(pb.PushRequest(**args), timeout=30)
        return info.value.code(), info.value.details()

    assert push(request_id="nope")[0] == grpc.StatusCode.NOT_FOUND
    code, details = push(engine_name="intruder")
    assert code == grpc.StatusCode.PERMISSION_DENIED and decode.name in details
    assert push(block_ids=[1])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert push(timeout_seconds=-1.0)[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = push(block_ids=[1, 10**6])  # outside the decode's cache: nothing posted
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "LayoutError" in details, details
    assert p.stub.Release(pb.ReleaseRequest(request_id=h.request_id), timeout=30).released


def _call(client: Client, ids: list[int]):
    try:
        return generate(client.stub, prompt_token_ids=ids, max_new_tokens=3, verify_kv=True,
                        request_id="victim", timeout=60)  # fmt: skip
    except grpc.RpcError as exc:
        return exc


def test_push_given_up_releases_the_quarantine(tmp_path):
    """A push slower than the decode's transfer timeout is given up by the prefill (its
    engine keeps going, never cancelled); the decode holds the blocks until the prefill
    says its engine is done with them (long before the drain time), then frees them."""
    prefill = DaemonProcess("prefill", daemon_args(BACKEND, "packed", "--degrade", "WRITE=24000"),
                            tmp_path, name="gu-prefill")  # fmt: skip
    procs = [prefill]
    try:
        _start(prefill)
        decode = DaemonProcess("decode", daemon_args(
            BACKEND, "nhd", "--prefill", prefill.target, "--transfer-direction", "push",
            "--transfer-timeout", "1.5", "--engine-drain-seconds", "120", "--pull-retries", "0"),
            tmp_path, name="gu-decode")  # fmt: skip
        procs.append(decode)
        _start(decode)
        d = Client(decode.target)
        err = _call(d, _ids(3, seed=12))  # 96 kB: about 4 s at 24 kB/s
        assert isinstance(err, grpc.RpcError) and "push" in err.details(), err
        assert d.stats().quarantined_blocks > 0
        waited = _wait(lambda: (x := d.stats()).quarantined_blocks == 0 and x.blocks_in_use == 0,
                       30, "the prefill's released notice")  # fmt: skip
        assert waited < 20  # the notice, not the 120 s drain time
        d.close()
    finally:
        codes = [proc.terminate(30) for proc in reversed(procs)]
    assert codes == [0, 0], [proc.log_tail() for proc in procs]

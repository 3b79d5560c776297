"""The decode engine's own process through real daemons (``--engine-process``, on by
default for CPU devices): tokens equal the monolithic run, and a SIGKILLed engine
process fails the running request and refuses new ones with a clear status, frees
every block, turns liveness NOT_SERVING, and leaves the daemon answering."""

from __future__ import annotations

import os
import random
import signal
import time

import grpc
import psutil
import pytest
from e2e_cluster import Client, daemon_args
from engines import require
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbridge.connector.serving.daemon.health import LIVENESS_SERVICE
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, generate_monolithic
from kvbridge.connector.serving.procs import DaemonProcess
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

BACKEND = "nixl"


def _alive(proc: DaemonProcess) -> bool:
    with proc.channel() as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=10
        )
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(ModelConfig().vocab_size) for _ in range(n)]


def _request(rid: str, prompt: list[int], n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, max_new_tokens=n)


def test_engine_process_serves_and_its_death_is_contained(tmp_path):
    require(BACKEND)
    prefill = DaemonProcess("prefill", daemon_args(BACKEND, "packed"), tmp_path, name="prefill")
    decode = None
    try:
        prefill.start().wait_ready(90)
        args = daemon_args(BACKEND, "nhd", "--prefill", prefill.target, "--engine-process", "on")
        decode = DaemonProcess("decode", args, tmp_path, name="decode").start()
        decode.wait_ready(90)
        children = psutil.Process(decode.proc.pid).children()  # + multiprocessing's tracker
        engines = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(engines) == 1, [c.cmdline() for c in children]
        client = Client(decode.target)
        prompt = _prompt(21, 1)
        got = [t for m in client.stub.Generate(_request("ok", prompt, 12), timeout=60)
               for t in m.token_ids]  # fmt: skip
        assert got == generate_monolithic(LlamaModel.random(ModelConfig()), prompt, 12)

        call = client.stub.Generate(_request("victim", _prompt(9, 2), 900), timeout=60)
        assert next(call).token_ids  # streaming
        t0 = time.monotonic()
        os.kill(engines[0].pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert time.monotonic() - t0 < 10
        assert info.value.code() == grpc.StatusCode.INTERNAL, info.value.details()
        assert "engine process died" in info.value.details()
        with pytest.raises(grpc.RpcError) as late:
            list(client.stub.Generate(_request("late", _prompt(5, 3), 4), timeout=60))
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE, late.value.details()
        assert "engine process died" in late.value.details()
        deadline = time.monotonic() + 20
        while client.stats(False).blocks_in_use:  # freed once the stream ended
            assert time.monotonic() < deadline, "decode blocks not freed"
            time.sleep(0.05)
        assert not _alive(decode)  # liveness: the orchestrator restarts the daemon
        client.close()
    finally:
        for p in (decode, prefill):
            if p is not None:
                p.terminate(30)

"""Helpers of the fault tests: a prefill daemon in a test namespace, a decode daemon
outside it, their stubs, the monolithic reference and bounded waits."""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbridge.connector.serving.client import Generation, generate
from kvbridge.connector.serving.daemon.security import ClientAuth
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, generate_monolithic
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc
from netlab import NetLab

LAYOUTS = {"nixl": ("packed", "nhd"), "mooncake": ("interleaved", "hnd")}  # prefill, decode
NUM_BLOCKS = 64
BLOCK_SIZE = 16
GUARD_BYTES = 4096
CFG = ModelConfig()
# codes a failed request may end with: each names what went wrong in its details
CLEAN_FAILURES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


# Mooncake cannot confirm when a failed batch stops writing: its blocks stay quarantined
# this long (production default ~15 min; the peers here die or come back within seconds)
ENGINE_DRAIN_SECONDS = 5


def daemon_args(backend: str, layout: str, *extra: str) -> list[str]:
    return [
        "--backend", backend, "--kv-layout", layout, "--num-blocks", str(NUM_BLOCKS),
        "--block-size", str(BLOCK_SIZE), "--grpc-port", "0", "--metrics-port", "0",
        "--guard-bytes", str(GUARD_BYTES), "--engine-drain-seconds",
        str(ENGINE_DRAIN_SECONDS), "--insecure", *extra,
    ]  # fmt: skip


def prompt_ids(num_blocks: int, seed: int) -> list[int]:
    """A random prompt of exactly ``num_blocks`` full blocks."""
    rng = random.Random(seed)
    return [rng.randrange(1, CFG.vocab_size) for _ in range(num_blocks * BLOCK_SIZE)]


@functools.cache
def _reference_model() -> LlamaModel:
    return LlamaModel.random(CFG)


@functools.cache
def _reference(ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(generate_monolithic(_reference_model(), list(ids), n, block_size=BLOCK_SIZE))


def reference_tokens(ids: list[int], n: int) -> list[int]:
    """Tokens of the same model run in one process (the ground truth of a generation)."""
    return list(_reference(tuple(ids), n))


class Pair:
    """A prefill daemon inside ``lab``'s namespace and a decode daemon outside it.

    UCX is pinned to TCP on the veth (shared memory would bypass the link).
    """

    def __init__(
        self,
        lab: NetLab,
        backend: str,
        log_dir: Path,
        prefill_args: tuple[str, ...] = (),
        decode_args: tuple[str, ...] = (),
    ) -> None:
        self.lab, self.backend, self.log_dir = lab, backend, log_dir
        self.prefill_args, self.decode_args = prefill_args, decode_args
        self.prefill: DaemonProcess | None = None
        self.decode: DaemonProcess | None = None
        self._channels: list[grpc.Channel] = []
        self.grpc_port = free_port(lab.host_addr)
        self.side_port = free_port(lab.host_addr)

    def start_prefill(self) -> DaemonProcess:
        pl, _ = LAYOUTS[self.backend]
        args = daemon_args(self.backend, pl, *self.prefill_args)
        args += ["--grpc-port", str(self.grpc_port), "--side-port", str(self.side_port)]
        env = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": self.lab.ns_dev}
        self.prefill = DaemonProcess(
            "prefill", args, self.log_dir, f"{self.backend}-p", host=self.lab.ns_addr,
            wrap=self.lab.wrap, env=env,
        ).start()  # fmt: skip
        self.prefill.wait_ready(60)
        return self.prefill

    def start_decode(self) -> DaemonProcess:
        _, dl = LAYOUTS[self.backend]
        args = daemon_args(self.backend, dl, "--side-port", "0", *self.decode_args)
        args += ["--prefill", f"{self.lab.ns_addr}:{self.grpc_port}"]
        env = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": self.lab.host_dev}
        self.decode = DaemonProcess(
            "decode", args, self.log_dir, f"{self.backend}-d", host=self.lab.host_addr, env=env
        ).start()
        self.decode.wait_ready(60)
        return self.decode

    def start(self) -> Pair:
        self.start_prefill()
        self.start_decode()
        return self

    def stub(self, proc: DaemonProcess) -> pb_grpc.KVBridgeServiceStub:
        ch = proc.channel()
        self._channels.append(ch)
        return pb_grpc.KVBridgeServiceStub(ch)

    @property
    def d(self) -> pb_grpc.KVBridgeServiceStub:
        return self.stub(self.decode)

    @property
    def p(self) -> pb_grpc.KVBridgeServiceStub:
        return self.stub(self.prefill)

    def close(self) -> dict[str, int | None]:
        for ch in self._channels:
            ch.close()
        return {p.name: p.terminate(20) for p in (self.decode, self.prefill) if p is not None}


def local_daemon(
    role: str,
    backend: str,
    log_dir: Path,
    name: str,
    *extra: str,
    client: ClientAuth | None = None,
    insecure: bool = True,
) -> DaemonProcess:
    """A started daemon on loopback (prefill layout or decode layout of ``backend``)."""
    layout = LAYOUTS[backend][0 if role == "prefill" else 1]
    args = daemon_args(backend, layout, "--side-port", "0", *extra)
    if not insecure:
        args.remove("--insecure")
    proc = DaemonProcess(role, args, log_dir, name, client=client).start()
    proc.wait_ready(60)
    return proc


def stats(stub: pb_grpc.KVBridgeServiceStub, finished: bool = True) -> pb.StatsResponse:
    return stub.Stats(pb.StatsRequest(include_finished=finished), timeout=10)


def record(stub: pb_grpc.KVBridgeServiceStub, request_id: str) -> pb.RequestStatus | None:
    return next((r for r in stats(stub).requests if r.request_id == request_id), None)


def healthy(proc: DaemonProcess, service: str = "") -> bool:
    """SERVING for ``service``: readiness (``""``, a decode daemon needs a live prefill
    daemon) or liveness (``LIVENESS_SERVICE``: the daemon is up)."""
    with proc.channel() as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def wait_for(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll ``pred`` until true; the seconds it took. AssertionError naming ``what``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)
    return time.monotonic() - t0


def in_thread(fn: Callable, *args, **kw) -> Future:
    """Run ``fn`` in a daemon thread; the future holds its result or exception."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args, **kw))
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return fut


def gen(stub, ids: list[int], n: int, request_id: str = "", timeout: float = 60) -> Generation:
    return generate(stub, prompt_token_ids=ids, max_new_tokens=n, request_id=request_id,
                    timeout=timeout, verify_kv=True)  # fmt: skip


def check_outcome(outcome, ids: list[int], n: int) -> str:
    """``"ok"`` for byte-exact KV (checksum and tokens), ``"failed"`` for a clean failure."""
    if isinstance(outcome, Generation):
        assert outcome.token_ids == reference_tokens(ids, n), "tokens differ from the reference"
        assert outcome.transfer.kv_checksum, "verify_kv returned no checksum"
        return "ok"
    assert isinstance(outcome, grpc.RpcError), f"unexpected {type(outcome).__name__}: {outcome}"
    assert outcome.code() in CLEAN_FAILURES, (outcome.code(), outcome.details())
    assert outcome.details(), "a failure without a message"
    return "failed"


def assert_clean(pair: Pair, timeout: float = 20.0) -> None:
    """Nothing held on either side, guard bands intact, both daemons SERVING."""
    d, p = pair.d, pair.p
    wait_for(lambda: (s := stats(d, False)).blocks_in_use == 0 and s.quarantined_blocks == 0
             and not s.requests, timeout, "decode blocks freed")  # fmt: skip
    wait_for(lambda: (s := stats(p, False)).leased_blocks == 0 and s.blocks_in_use == 0,
             timeout, "prefill leases ended")  # fmt: skip
    for stub in (d, p):
        assert stats(stub).guard_band_bytes_changed == 0
    # a decode daemon is ready again once its health check of the prefill passes (~1 s)
    wait_for(lambda: healthy(pair.decode) and healthy(pair.prefill), timeout, "both ready")
    assert pair.decode.metrics()["kvbridge_blocks_in_use"] == 0
    assert pair.prefill.metrics()["kvbridge_blocks_leased"] == 0

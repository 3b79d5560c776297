"""End to end: real daemon processes, real gRPC, real NIXL / Mooncake engines.

Per backend, two prefill daemons with different KV layouts serve one decode
daemon with a third layout (round robin); every generation must equal the
monolithic run of the same model token for token.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from e2e_cluster import BLOCK_SIZE, Client, daemon_args, kv_bytes_per_block
from engines import BACKENDS, available
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kvbridge.connector.serving.client import generate
from kvbridge.connector.serving.model import (
    ByteTokenizer,
    LlamaModel,
    ModelConfig,
    generate_monolithic,
)
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

# The engines run in the daemon processes; don't load them into the test process.
for _engine in BACKENDS:
    if not available(_engine):
        pytest.skip(f"the {_engine} engine is not installed", allow_module_level=True)

# backend -> (prefill layouts, decode layout)
LAYOUTS = {
    "nixl": (("packed", "hnd"), "nhd"),
    "mooncake": (("interleaved", "cross_layer"), "head_groups"),
}
PROMPTS = ["The quick brown fox", "Disaggregated prefill, paged decode", "KV" * 20, "é✓ unicode"]
MAX_NEW = 8
TTFT_PHASES = Path(__file__).resolve().parents[2] / "bench" / "ttft_phases.py"
CFG = ModelConfig()


@pytest.fixture(scope="module")
def reference() -> LlamaModel:
    return LlamaModel.random(CFG)


def monolithic(model: LlamaModel, prompt: str, n: int = MAX_NEW) -> list[int]:
    ids = ByteTokenizer(CFG.vocab_size).encode(prompt)
    return generate_monolithic(model, ids, n, layout="nhd", block_size=BLOCK_SIZE)


class Cluster:
    def __init__(self, backend: str, log_dir) -> None:
        (pl1, pl2), dl = LAYOUTS[backend]
        self.backend = backend
        self.prefills = [
            DaemonProcess(
                "prefill", daemon_args(backend, layout), log_dir, name=f"{backend}-prefill-{layout}"
            )
            for layout in (pl1, pl2)
        ]
        self.decode: DaemonProcess | None = None
        self.clients: list[Client] = []
        self.log_dir = log_dir
        self.decode_layout = dl

    def start(self) -> Cluster:
        for p in self.prefills:
            p.start()
        for p in self.prefills:
            p.wait_ready(90)
        targets = [a for p in self.prefills for a in ("--prefill", p.target)]
        self.decode = DaemonProcess(
            "decode",
            daemon_args(
                self.backend, self.decode_layout, "--prefill-policy", "round-robin", *targets
            ),
            self.log_dir,
            name=f"{self.backend}-decode-{self.decode_layout}",
        ).start()
        self.decode.wait_ready(90)
        self.d = Client(self.decode.target)
        self.p = [Client(p.target) for p in self.prefills]
        self.clients = [self.d, *self.p]
        return self

    def stop(self) -> dict[str, int | None]:
        for c in self.clients:
            c.close()
        procs = [self.decode, *self.prefills]
        return {p.name: p.terminate(30) for p in procs if p is not None}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def cluster(request, tmp_path_factory):
    c = Cluster(request.param, tmp_path_factory.mktemp(f"e2e-{request.param}"))
    try:
        c.start()
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), (codes, [p.log_tail() for p in c.prefills])
    for log in c.log_dir.glob("*.log"):
        errors = [line for line in log.read_text().splitlines() if '"level": "error"' in line]
        assert not errors, f"{log.name}: {errors[:3]}"


def test_tokens_match_monolithic_across_two_prefill_daemons(cluster, reference):
    per_block = kv_bytes_per_block(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim)
    src_layouts = set()
    for i, prompt in enumerate(PROMPTS):
        gen = generate(
            cluster.d.stub,
            prompt=prompt,
            max_new_tokens=MAX_NEW,
            request_id=f"seq-{i}",
            timeout=120,
        )
        assert gen.token_ids == monolithic(reference, prompt), prompt
        assert gen.finish_reason == "FINISH_REASON_LENGTH"
        t = gen.transfer
        n_tokens = len(ByteTokenizer(CFG.vocab_size).encode(prompt))
        assert t.num_tokens == n_tokens and t.num_blocks == -(-n_tokens // BLOCK_SIZE)
        assert t.bytes == t.num_blocks * per_block
        assert t.descriptors >= 1 and t.transfer_seconds > 0
        assert t.dst_layout == cluster.decode_layout
        src_layouts.add((t.prefill_target, t.src_layout))
    assert len(src_layouts) == 2  # round robin used both prefill daemons (both layouts)
    # each request's time to first token by phase, as bench/ttft_phases.py reads them
    spec = importlib.util.spec_from_file_location("ttft_phases", TTFT_PHASES)
    phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phases)
    first = phases.records(cluster.decode.log_path, "first token")
    marks = {rec["request_id"]: rec for rec in first}
    for i in range(len(PROMPTS)):
        m = marks[f"seq-{i}"]
        assert m["to_prefilled_s"] > 0 and m["to_pulled_s"] > 0 and m["to_first_token_s"] >= 0
        assert "to_verified_s" not in m  # no checksum asked for


def test_concurrent_generations_match_monolithic(cluster, reference):
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = generate(
                cluster.d.stub, prompt=PROMPTS[i], max_new_tokens=MAX_NEW, timeout=120
            ).token_ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert results == {i: monolithic(reference, p) for i, p in enumerate(PROMPTS)}


def test_stats_and_metrics_reflect_the_requests(cluster):
    before = cluster.d.stats().counters
    m_before = cluster.decode.metrics()
    gens = [
        generate(cluster.d.stub, prompt=p, max_new_tokens=3, request_id=f"stats-{i}")
        for i, p in enumerate(PROMPTS[:2])
    ]
    d = cluster.d.stats()
    c = d.counters
    assert c.requests_done - before.requests_done == 2
    assert c.transfers - before.transfers == 2
    assert c.bytes_transferred - before.bytes_transferred == sum(g.transfer.bytes for g in gens)
    assert c.descriptors - before.descriptors == sum(g.transfer.descriptors for g in gens)
    assert c.tokens_generated - before.tokens_generated == 6
    assert (
        d.role == pb.ROLE_DECODE
        and d.kv_layout == cluster.decode_layout
        and d.backend == cluster.backend
    )
    assert d.blocks_in_use == 0 and d.free_blocks == d.num_blocks
    by_id = {r.request_id: r for r in d.requests}
    for i, g in enumerate(gens):
        r = by_id[f"stats-{i}"]
        assert r.state == pb.REQUEST_STATE_DONE and r.num_generated_tokens == 3
        assert r.bytes == g.transfer.bytes and r.peer == g.transfer.prefill_target
    m = cluster.decode.metrics()
    assert m["kvbridge_transfer_bytes_total"] - m_before["kvbridge_transfer_bytes_total"] == sum(
        g.transfer.bytes for g in gens
    )
    assert m["kvbridge_transfer_seconds_count"] - m_before["kvbridge_transfer_seconds_count"] == 2
    assert m["kvbridge_transfer_descriptors_total"] == c.descriptors
    assert m["kvbridge_requests_total{state=done}"] == c.requests_done
    assert m["kvbridge_blocks_in_use"] == 0
    # prefill side: every lease released by the decode daemon, nothing held, nothing expired
    for client, proc in zip(cluster.p, cluster.prefills, strict=True):
        s = client.stats()
        assert s.role == pb.ROLE_PREFILL and s.leased_blocks == 0 and s.blocks_in_use == 0
        assert s.counters.leases_released >= 1 and s.counters.lease_expiries == 0
        assert all(r.state == pb.REQUEST_STATE_DONE for r in s.requests)
        pm = proc.metrics()
        assert pm["kvbridge_blocks_leased"] == 0 and pm["kvbridge_lease_expiries_total"] == 0
        assert pm["kvbridge_leases_released_total"] == s.counters.leases_released


def test_prefill_lease_expires_or_is_released(cluster):
    p, proc = cluster.p[0], cluster.prefills[0]
    expiries = proc.metrics()["kvbridge_lease_expiries_total"]
    tokens = list(range(1, 40))  # 3 blocks
    h = p.stub.Prefill(
        pb.PrefillRequest(
            request_id="orphan", prompt_token_ids=tokens, requester="nobody", lease_seconds=0.3
        ),
        timeout=30,
    ).handle
    assert len(h.block_ids) == 3 and 0 < h.lease_seconds_left <= 0.3
    assert p.stats().leased_blocks == 3
    deadline = time.monotonic() + 10
    while p.stats().leased_blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    s = p.stats()
    assert s.leased_blocks == 0 and s.blocks_in_use == 0
    orphan = next(r for r in s.requests if r.request_id == "orphan")
    assert orphan.state == pb.REQUEST_STATE_FAILED and "lease expired" in orphan.error
    assert proc.metrics()["kvbridge_lease_expiries_total"] == expiries + 1
    # Release ends a lease at once; a second Release finds nothing
    h = p.stub.Prefill(
        pb.PrefillRequest(request_id="released", prompt_token_ids=tokens, requester="x"), timeout=30
    ).handle
    r = p.stub.Release(pb.ReleaseRequest(request_id=h.request_id, reason="test"), timeout=10)
    assert r.released and r.freed_blocks == 3
    assert not p.stub.Release(pb.ReleaseRequest(request_id=h.request_id), timeout=10).released
    assert p.stats().leased_blocks == 0


def test_bad_requests_get_clear_errors_and_daemons_stay_up(cluster):
    cases = [
        (cluster.d, pb.GenerateRequest(prompt="x", max_new_tokens=0), "max_new_tokens"),
        (cluster.d, pb.GenerateRequest(prompt_token_ids=[1, 10**6], max_new_tokens=2), "token ids"),
        (cluster.d, pb.GenerateRequest(max_new_tokens=2), "no tokens"),
        (cluster.d, pb.GenerateRequest(prompt="x" * 5000, max_new_tokens=2), "blocks"),
    ]
    for client, req, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(client.stub.Generate(req, timeout=30))
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
        )
    with pytest.raises(grpc.RpcError) as info:
        cluster.d.stub.Prefill(pb.PrefillRequest(prompt_token_ids=[1]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for req, words in [
        (pb.PrefillRequest(prompt_token_ids=[1, -1]), "token ids"),
        (pb.PrefillRequest(prompt_token_ids=[1], lease_seconds=float("nan")), "lease_seconds"),
        (pb.PrefillRequest(prompt_token_ids=[1], lease_seconds=1e300), "lease_seconds"),
        (pb.PrefillRequest(prompt_token_ids=[1], lease_seconds=1e-6), "lease_seconds"),
        (pb.PrefillRequest(prompt_token_ids=[1] * 5000), "blocks"),
        (pb.PrefillRequest(request_id="x" * 600, prompt_token_ids=[1]), "request_id"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            cluster.p[0].stub.Prefill(req, timeout=10)
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
        )
    dup = pb.PrefillRequest(request_id="dup", prompt_token_ids=[1, 2, 3])
    cluster.p[0].stub.Prefill(dup, timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        cluster.p[0].stub.Prefill(dup, timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in info.value.details()
    assert cluster.p[0].stub.Release(pb.ReleaseRequest(request_id="dup"), timeout=10).released
    for c in cluster.clients:
        resp = health_pb2_grpc.HealthStub(c.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert c.stats().blocks_in_use == 0


def test_reflection_lists_the_services(cluster):
    stub = reflection_pb2_grpc.ServerReflectionStub(cluster.d.channel)
    [resp] = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"kvbridge.v1.KVBridgeService", "grpc.health.v1.Health"} <= names


def _wait_state(client: Client, request_id: str, state: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [r for r in client.stats(False).requests if r.request_id == request_id]
        if live and live[0].state == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"{request_id} never reached state {state}")


def _wait_draining(client: Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not client.stats(False).draining:
        assert time.monotonic() < deadline, "the daemon never started draining"
        time.sleep(0.01)


def _refused_while_draining(call) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()


def test_sigterm_drains_in_flight_and_refuses_new_requests(cluster, reference):
    """Own daemons: a prefill, and a decode whose first --prefill target is dead."""
    if cluster.backend != "nixl":
        pytest.skip("one backend is enough for the drain test")
    prefill = DaemonProcess("prefill", daemon_args("nixl", "interleaved"), cluster.log_dir,
                            name="drain-prefill").start()  # fmt: skip
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the decode daemon must fail over
    decode = None
    try:
        prefill.wait_ready(90)
        extra = daemon_args("nixl", "hnd", "--prefill", dead, "--prefill", prefill.target,
                            "--prefill-policy", "round-robin")  # fmt: skip
        decode = DaemonProcess("decode", extra, cluster.log_dir, name="drain-decode").start()
        decode.wait_ready(90)
        client, pclient = Client(decode.target), Client(prefill.target)
        # a second daemon on a port in use exits with a clear error (no silent port sharing)
        clash = DaemonProcess(
            "prefill",
            [*daemon_args("nixl", "nhd"), "--grpc-port", str(prefill.info["grpc_port"])],
            cluster.log_dir,
            name="clash-prefill",
        ).start()
        assert clash.proc.wait(60) == 2  # a start-up error: one line naming flag and port
        port = prefill.info["grpc_port"]
        assert f"--grpc-port {port}: cannot bind 127.0.0.1:{port}" in clash.log_tail()
        for i in range(2):  # the dead target is tried last (it fails its health checks)
            g = generate(client.stub, prompt=PROMPTS[i], max_new_tokens=4, timeout=60)
            assert g.token_ids == monolithic(reference, PROMPTS[i], 4)
            assert g.transfer.prefill_target == prefill.target
        # decode: SIGTERM mid-generation; the stream finishes, new requests are refused
        n, out = 600, {}
        t = threading.Thread(target=lambda: out.update(g=generate(
            client.stub, prompt="drain me", max_new_tokens=n, request_id="long")))  # fmt: skip
        t.start()
        _wait_state(client, "long", pb.REQUEST_STATE_DECODING)
        decode.proc.send_signal(15)
        _wait_draining(client)
        _refused_while_draining(lambda: list(client.stub.Generate(
            pb.GenerateRequest(prompt="late", max_new_tokens=2), timeout=10)))  # fmt: skip
        t.join(120)
        assert out["g"].token_ids == monolithic(reference, "drain me", n)
        assert decode.proc.wait(60) == 0
        # prefill: SIGTERM with a lease held; Release still works and lets it exit
        tokens = list(range(1, 20))
        held = pb.PrefillRequest(
            request_id="held", prompt_token_ids=tokens, requester="x", lease_seconds=60
        )
        pclient.stub.Prefill(held, timeout=30)
        prefill.proc.send_signal(15)
        _wait_draining(pclient)
        _refused_while_draining(lambda: pclient.stub.Prefill(
            pb.PrefillRequest(prompt_token_ids=tokens), timeout=10))  # fmt: skip
        time.sleep(0.5)
        assert prefill.proc.poll() is None  # still waiting for the lease
        assert pclient.stub.Release(pb.ReleaseRequest(request_id="held"), timeout=10).released
        assert prefill.proc.wait(30) == 0
        client.close()
        pclient.close()
    finally:
        for proc in (decode, prefill):
            if proc is not None:
                proc.terminate(10)


def test_release_aborts_a_generation_and_frees_its_blocks(cluster):
    out: dict = {}

    def run() -> None:
        try:
            generate(cluster.d.stub, prompt="abort me", max_new_tokens=400, request_id="abort")
        except grpc.RpcError as exc:
            out["code"] = exc.code()

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = [r for r in cluster.d.stats(False).requests if r.request_id == "abort"]
        if live and live[0].state == pb.REQUEST_STATE_DECODING:
            break
        time.sleep(0.02)
    r = cluster.d.stub.Release(pb.ReleaseRequest(request_id="abort", reason="test"), timeout=10)
    assert r.released and r.freed_blocks == -(-(len("abort me") + 1 + 400) // BLOCK_SIZE)
    t.join(60)
    assert out.get("code") == grpc.StatusCode.CANCELLED
    s = cluster.d.stats()
    rec = next(x for x in s.requests if x.request_id == "abort")
    assert rec.state == pb.REQUEST_STATE_FAILED and "aborted" in rec.error
    assert 0 < rec.num_generated_tokens < 400 and s.blocks_in_use == 0
    assert not cluster.d.stub.Release(pb.ReleaseRequest(request_id="abort"), timeout=10).released


def test_cli_generate_and_stats(cluster, reference):
    cmd = [sys.executable, "-m", "kvbridge.connector.serving.cli"]
    res = subprocess.run(
        [*cmd, "generate", "--target", cluster.decode.target, "--prompt", PROMPTS[0],
         "--prompt", PROMPTS[1], "--max-new-tokens", "5", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    outs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [o["token_ids"] for o in outs] == [monolithic(reference, p, 5) for p in PROMPTS[:2]]
    assert all(int(o["transfer"]["bytes"]) > 0 for o in outs)
    res = subprocess.run([*cmd, "stats", "--target", cluster.prefills[0].target],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    assert stats["role"] == "ROLE_PREFILL" and stats["engine_name"] == cluster.prefills[0].name
    res = subprocess.run(
        [*cmd, "generate", "--target", cluster.decode.target, "--prompt-tokens", "1,99999"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1 and "INVALID_ARGUMENT" in res.stderr

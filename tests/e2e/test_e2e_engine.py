"""Continuous batching through real daemons: join/leave mid-run, cancel, queueing, sampling.

One prefill daemon (``packed``) and one decode daemon (``nhd``) as processes, real
gRPC, the NIXL engine. The decode cache is small (12 blocks of 16 tokens) so that
queueing for blocks is reachable; every greedy generation must equal the
monolithic run of the same model.
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from e2e_cluster import BLOCK_SIZE, Client, daemon_args
from engines import require
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, generate_monolithic
from kvbridge.connector.serving.procs import DaemonProcess
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

CFG = ModelConfig()
NUM_BLOCKS = 12
BACKEND = "nixl"


@pytest.fixture(scope="module")
def reference() -> LlamaModel:
    return LlamaModel.random(CFG)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    require(BACKEND)
    log_dir = tmp_path_factory.mktemp("e2e-engine")
    prefill = DaemonProcess("prefill", daemon_args(BACKEND, "packed"), log_dir, name="prefill")
    decode = None
    try:
        prefill.start().wait_ready(90)
        args = daemon_args(BACKEND, "nhd", "--prefill", prefill.target, "--max-waiting", "2")
        args[args.index("--num-blocks") + 1] = str(NUM_BLOCKS)
        decode = DaemonProcess("decode", args, log_dir, name="decode").start()
        decode.wait_ready(90)
        client = Client(decode.target)
        yield client
        client.close()
    finally:
        codes = [p.terminate(30) for p in (decode, prefill) if p is not None]
    assert codes == [0] * len(codes)
    for log in log_dir.glob("*.log"):
        errors = [line for line in log.read_text().splitlines() if '"level": "error"' in line]
        assert not errors, f"{log.name}: {errors[:3]}"


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(CFG.vocab_size) for _ in range(n)]


def _stream(client: Client, rid: str, prompt: list[int], max_new: int, **kw):
    return client.stub.Generate(
        pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, max_new_tokens=max_new, **kw),
        timeout=120,
    )


def _tokens(call) -> list[int]:
    return [t for msg in call for t in msg.token_ids]


def _wait(cond, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _live(client: Client) -> dict[str, int]:
    return {r.request_id: r.state for r in client.stats(False).requests}


def test_requests_joining_and_leaving_mid_run_equal_monolithic(pair, reference):
    # (prompt length, new tokens): 1-2 blocks each, so all fit in the 12 blocks together
    spec = [(5, 20), (30, 3), (1, 14), (17, 9), (9, 1), (2, 26)]
    prompts = [_prompt(n, 10 + i) for i, (n, _) in enumerate(spec)]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            got[i] = _tokens(_stream(pair, f"mix-{i}", prompts[i], spec[i][1]))
        except BaseException as exc:
            errors.append(exc)

    threads = []
    for i in range(len(spec)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        time.sleep(0.03)  # later requests join while earlier ones decode
    for t in threads:
        t.join(120)
    assert not errors
    for i, (p, (_, new)) in enumerate(zip(prompts, spec, strict=True)):
        want = generate_monolithic(reference, p, new, block_size=BLOCK_SIZE)
        assert got[i] == want, f"request {i}"
    _wait(lambda: pair.stats().blocks_in_use == 0, 10, "blocks to be freed")


def test_cancelled_request_frees_its_blocks_while_others_continue(pair, reference):
    keep_prompt = _prompt(4, 2)  # 4 + 100 tokens: 7 blocks
    out: dict = {}

    def keep() -> None:
        out["tokens"] = _tokens(_stream(pair, "keeps-going", keep_prompt, 100))

    t = threading.Thread(target=keep)
    t.start()
    _wait(lambda: _live(pair).get("keeps-going") == pb.REQUEST_STATE_DECODING, 60, "decoding")
    cancel_call = _stream(pair, "cancel-me", _prompt(3, 1), 77)  # 3 + 77 tokens: 5 blocks
    assert next(cancel_call).token_ids  # the prefill's token
    assert next(cancel_call).token_ids  # the engine's: it is in the batch
    cancel_call.cancel()  # the client goes away mid-stream
    snap: dict = {}

    def freed() -> bool:
        snap["s"] = pair.stats(False)
        return snap["s"].blocks_in_use == 7  # the cancelled request's 5 blocks came back

    _wait(freed, 30, "the cancelled request's blocks to be freed")
    live = {r.request_id: r.state for r in snap["s"].requests}
    assert "cancel-me" not in live
    assert live.get("keeps-going") == pb.REQUEST_STATE_DECODING  # the other one goes on
    t.join(60)
    want = generate_monolithic(reference, keep_prompt, 100, block_size=BLOCK_SIZE)
    assert out["tokens"] == want
    rec = next(r for r in pair.stats().requests if r.request_id == "cancel-me")
    assert rec.state == pb.REQUEST_STATE_FAILED and 1 < rec.num_generated_tokens < 77
    _wait(lambda: pair.stats().blocks_in_use == 0, 10, "blocks to be freed")


def test_requests_queue_for_blocks_and_past_the_bound_are_refused(pair, reference):
    # each needs 10 of the 12 blocks (10 + 150 tokens): one at a time
    prompts = {rid: _prompt(10, 20 + i) for i, rid in enumerate(("q-a", "q-b", "q-c"))}
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def run(rid: str) -> None:
        try:
            got[rid] = _tokens(_stream(pair, rid, prompts[rid], 150))
        except BaseException as exc:
            errors.append(exc)

    threads = {rid: threading.Thread(target=run, args=(rid,)) for rid in prompts}
    threads["q-a"].start()
    _wait(lambda: _live(pair).get("q-a") == pb.REQUEST_STATE_DECODING, 60, "q-a to decode")
    threads["q-b"].start()
    threads["q-c"].start()
    _wait(lambda: {"q-b", "q-c"} <= set(_live(pair)), 30, "q-b and q-c to queue")
    live = _live(pair)
    assert live["q-b"] == live["q-c"] == pb.REQUEST_STATE_WAITING  # queued, not failed
    with pytest.raises(grpc.RpcError) as err:  # the queue holds 2: a third is refused
        _tokens(_stream(pair, "q-d", _prompt(10, 99), 150))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already wait" in err.value.details()
    for t in threads.values():
        t.join(180)
    assert not errors
    for rid, p in prompts.items():
        assert got[rid] == generate_monolithic(reference, p, 150, block_size=BLOCK_SIZE), rid
    _wait(lambda: pair.stats().blocks_in_use == 0, 10, "blocks to be freed")


def test_sampling_is_seeded_and_checked(pair, reference):
    p = _prompt(6, 3)
    kw = {"temperature": 1.3, "top_p": 0.95, "top_k": 40, "seed": 7}
    a = _tokens(_stream(pair, "s-1", p, 20, **kw))
    b = _tokens(_stream(pair, "s-2", p, 20, **kw))
    greedy = generate_monolithic(reference, p, 20, block_size=BLOCK_SIZE)
    assert a == b and a != greedy and a[0] == greedy[0]  # the first token is the prefill's
    for bad, field in (({"temperature": -1.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                       ({"top_k": -2}, "top_k")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            _tokens(_stream(pair, "s-bad", p, 4, **bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()

"""The OpenAI-compatible HTTP API of a real decode daemon, with real clients.

One authenticated pair of daemons (TLS, bearer token, signed side channel) serving
a tiny checkpoint with a chat template; the ``openai`` package and ``httpx`` talk to
the decode daemon's HTTP port. Ground truth: the same checkpoint run in one process
(``http_kit.Reference``) and a chat template rendered by hand.

Sampling runs in the decode engine: the same seed and temperature give the same text.
"""

from __future__ import annotations

import json
import ssl
import time

import grpc
import httpx
import pytest
from engines import BACKENDS, available
from faults.certs import TestCA, secret_file
from http_kit import BLOCK_SIZE, Reference, write_checkpoint
from kvbridge.connector.serving.daemon.security import ClientAuth
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")
BACKEND = next((b for b in BACKENDS if available(b)), None)
NUM_BLOCKS = 256  # a tiny model: 8 KiB a block; room for long generations
MODEL_DIR = "tiny-chat-llama"  # the served model name (basename of --model-path)


class Setup:
    def __init__(self, tmp, prefill: DaemonProcess, decode: DaemonProcess, ref: Reference,
                 token: str, ca: str, client: ClientAuth) -> None:  # fmt: skip
        self.tmp, self.prefill, self.decode, self.ref = tmp, prefill, decode, ref
        self.token, self.client = token, client
        self.ca = ssl.create_default_context(cafile=ca)
        self.base = decode.http_url

    def openai(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=token or self.token, base_url=self.base + "/v1", max_retries=0,
            http_client=httpx.Client(verify=self.ca, timeout=120),
        )  # fmt: skip

    def http(self, token: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.base, verify=self.ca, headers=headers, **kw)

    def stats(self) -> pb.StatsResponse:
        with self.client.channel(self.decode.target) as ch:
            return pb_grpc.KVBridgeServiceStub(ch).Stats(
                pb.StatsRequest(include_finished=True), timeout=10
            )


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    if BACKEND is None:
        pytest.skip("no transfer engine installed")
    tmp = tmp_path_factory.mktemp("http")
    ckpt = write_checkpoint(tmp / MODEL_DIR, seed=int(time.time()) % 10_000)
    ca = TestCA(tmp)
    leaf = ca.leaf("daemon")
    token, side = secret_file(tmp / "token"), secret_file(tmp / "side", 48)
    auth = ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key), "--tls-ca", str(ca.path),
            "--auth-token-file", str(token), "--side-secret-file", str(side)]  # fmt: skip
    client = ClientAuth.from_files(str(ca.path), str(leaf.cert), str(leaf.key), str(token))
    common = ["--backend", BACKEND, "--num-blocks", str(NUM_BLOCKS), "--block-size",
              str(BLOCK_SIZE), "--metrics-port", "0", "--model-path", str(ckpt),
              "--transfer-timeout", "20", *auth]  # fmt: skip
    pport = free_port()
    # side channels on any free port (bound by the daemon itself: no race with others)
    prefill = DaemonProcess("prefill", [*common, "--grpc-port", str(pport), "--side-port", "0"],
                            tmp, "http-p", client=client)  # fmt: skip
    decode = DaemonProcess("decode", [*common, "--grpc-port", "0", "--side-port", "0",
                           "--prefill", f"127.0.0.1:{pport}"], tmp, "http-d",
                           client=client)  # fmt: skip
    procs = [prefill.start(), decode.start()]
    try:
        for p in procs:
            p.wait_ready(90)
        yield Setup(tmp, prefill, decode, Reference(ckpt), token.read_text().strip(),
                    str(ca.path), client)  # fmt: skip
    finally:
        codes = [p.terminate(30) for p in (decode, prefill)]
    assert codes == [0, 0], decode.log_tail()


def test_models_and_health_need_the_token(s):
    assert json.loads(s.decode.ready_file.read_text())["http_port"] == s.decode.info["http_port"]
    models = s.openai().models.list()
    assert [m.id for m in models.data] == [MODEL_DIR]
    with s.http() as c:
        assert c.get("/health").json() == {"status": "ok"}
    refused_before = s.stats().counters.auth_failures
    with httpx.Client(base_url=s.base, verify=s.ca) as c:
        for path in ("/health", "/v1/models"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        s.openai(token="not-the-token-but-long-enough").completions.create(
            model=MODEL_DIR, prompt="hi", max_tokens=2
        )
    assert s.stats().counters.auth_failures == refused_before + 3
    with pytest.raises((httpx.RemoteProtocolError, httpx.ConnectError)):  # TLS only
        httpx.get(s.base.replace("https", "http") + "/health", timeout=5).raise_for_status()


def test_completion_equals_the_monolithic_run_and_counts_usage(s):
    prompt, n = "Disaggregated serving", 9
    out = s.openai().completions.create(model=MODEL_DIR, prompt=prompt, max_tokens=n)
    assert out.object == "text_completion" and out.model == MODEL_DIR
    assert out.choices[0].text == s.ref.text(prompt, n)
    assert out.choices[0].finish_reason == "length"
    prompt_len = len(s.ref.tok.encode(prompt))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_len, n)
    assert out.usage.total_tokens == prompt_len + n
    rec = next(r for r in s.stats().requests if r.request_id == out.id)
    assert rec.state == pb.REQUEST_STATE_DONE  # the HTTP front read the stream to its end


def test_token_id_prompt_and_streaming_with_usage(s):
    ids = s.ref.tok.encode("token ids")
    want = s.ref.text("token ids", 7)
    chunks = list(s.openai().completions.create(
        model=MODEL_DIR, prompt=ids, max_tokens=7, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want and len({c.id for c in chunks}) == 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_stop_strings_and_stop_token_ids(s):
    prompt, n = "Where to stop", 12
    toks = s.ref.tokens(prompt, n)
    texts = s.ref.texts(toks)
    full = "".join(texts)
    # two tokens with text, the later after the earlier and any held-back ones between
    shown = [k for k in range(1, n) if texts[k]]
    assert len(shown) >= 2, texts
    a, b = shown[-2], shown[-1]
    stop = "".join(texts[a : b + 1])  # spans the tokens a..b
    want = full[: full.find(stop)]
    c = s.openai()
    out = c.completions.create(model=MODEL_DIR, prompt=prompt, max_tokens=n, stop=[stop])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (want, "stop")
    assert out.usage.completion_tokens <= b + 1
    streamed = c.completions.create(model=MODEL_DIR, prompt=prompt, max_tokens=n, stop=stop,
                                    stream=True)  # fmt: skip
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop token id (vLLM's stop_token_ids): the generation ends on it, included
    j = toks.index(toks[3])
    out = c.completions.create(model=MODEL_DIR, prompt=prompt, max_tokens=n,
                               extra_body={"stop_token_ids": [toks[3]]})  # fmt: skip
    assert out.choices[0].text == "".join(s.ref.texts(toks[: j + 1]))
    assert (out.choices[0].finish_reason, out.usage.completion_tokens) == ("stop", j + 1)


def test_chat_uses_the_checkpoint_template(s):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": " Hi there "}]}]  # fmt: skip
    rendered = "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    c = s.openai()
    out = c.chat.completions.create(model=MODEL_DIR, messages=messages, max_tokens=6)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == s.ref.text(rendered, 6)
    assert out.usage.prompt_tokens == len(s.ref.tok.encode(rendered))
    chunks = list(c.chat.completions.create(model=MODEL_DIR, messages=messages, max_tokens=6,
                                            stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == s.ref.text(rendered, 6)
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        c.chat.completions.create(model=MODEL_DIR, messages=[{"role": "robot", "content": "x"}])


def test_concurrent_streams_each_get_their_own_tokens(s):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"prompt number {i} " * (i + 1) for i in range(6)]

    def run(i: int) -> str:
        stream = s.openai().completions.create(model=MODEL_DIR, prompt=prompts[i],
                                               max_tokens=5 + i, stream=True)  # fmt: skip
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(run, range(6)))
    assert got == [s.ref.text(p, 5 + i) for i, p in enumerate(prompts)]


def test_seed_reproducibility_and_sampling_fields(s):
    c, prompt = s.openai(), "Same seed, same text"
    greedy = [c.completions.create(model=MODEL_DIR, prompt=prompt, max_tokens=8,
                                   temperature=0).choices[0].text for _ in range(2)]  # fmt: skip
    assert greedy == [s.ref.text(prompt, 8)] * 2
    seeded = [c.completions.create(model=MODEL_DIR, prompt=prompt, max_tokens=8,
                                   temperature=0.9, top_p=0.95, seed=1234).choices[0].text
              for _ in range(2)]  # fmt: skip
    assert seeded[0] == seeded[1] and len(seeded[0]) > 0


def test_unknown_model_n_and_bad_fields_are_refused(s):
    c = s.openai()
    with pytest.raises(openai.NotFoundError) as exc:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        c.completions.create(model=MODEL_DIR, prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):
        c.completions.create(model=MODEL_DIR, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=MODEL_DIR, prompt="x", max_tokens=2, temperature=-1)


def test_malformed_and_oversized_bodies_leave_the_daemon_up(s):
    with s.http() as c:
        for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
            r = c.post("/v1/completions", content=body)
            assert r.status_code == 400, body
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = c.post("/v1/completions", json={"model": MODEL_DIR})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        big = b'{"model": "' + MODEL_DIR.encode() + b'", "prompt": "' + b"a" * (5 << 20) + b'"}'
        r = c.post("/v1/completions", content=big)
        assert r.status_code == 413
        r = c.post("/v1/completions", json={"model": MODEL_DIR, "prompt": "up", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == s.ref.text("up", 3)


def _wait_final(s: Setup, request_id: str, timeout: float = 60.0) -> pb.RequestStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = next((r for r in s.stats().requests if r.request_id == request_id), None)
        if rec is not None and rec.state in (pb.REQUEST_STATE_DONE, pb.REQUEST_STATE_FAILED):
            return rec
        time.sleep(0.1)
    raise AssertionError(f"{request_id} still live after {timeout} s")


def test_client_disconnect_aborts_the_request_and_frees_its_blocks(s):
    m0 = s.decode.metrics()
    body = {"model": MODEL_DIR, "prompt": "a long one", "max_tokens": 4000, "stream": True}
    with s.http() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        line = next(ln for ln in r.iter_lines() if ln.startswith("data: "))
        rid = json.loads(line[6:])["id"]
    rec = _wait_final(s, rid)  # closed mid-stream: the gRPC call was cancelled
    assert rec.state == pb.REQUEST_STATE_FAILED and rec.num_generated_tokens < 4000
    # a non-streaming request whose client gives up
    with s.http() as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={**body, "stream": False, "prompt": "gone"}, timeout=1.0)
    st = s.stats()
    gone = [r for r in st.requests if r.num_prompt_tokens == len(s.ref.tok.encode("gone"))]
    assert gone and _wait_final(s, gone[-1].request_id).state == pb.REQUEST_STATE_FAILED
    st = s.stats()
    assert st.blocks_in_use == 0 and st.free_blocks == NUM_BLOCKS
    m1 = s.decode.metrics()
    key = "kvbridge_request_finished_total{finish_reason=abort}"
    assert m1[key] >= m0[key] + 2


def test_latency_histograms_cover_every_request(s):
    before = s.decode.metrics()
    with s.client.channel(s.decode.target) as ch:  # a gRPC request is measured too
        stream = pb_grpc.KVBridgeServiceStub(ch).Generate(
            pb.GenerateRequest(prompt="over gRPC", max_new_tokens=3), timeout=60
        )
        assert sum(len(msg.token_ids) for msg in stream) == 3
    m = s.decode.metrics()
    with s.http() as c:  # the API port serves the same /metrics (token needed)
        text = c.get("/metrics").text
    assert "kvbridge_time_to_first_token_seconds_bucket" in text and "kvbridge_threads" in text
    key = "kvbridge_request_finished_total{finish_reason=length}"
    assert m[key] == before[key] + 1
    assert m["kvbridge_inter_token_latency_seconds_count"] == (
        before["kvbridge_inter_token_latency_seconds_count"] + 2
    )
    done = sum(v for k, v in m.items() if k.startswith("kvbridge_request_finished_total"))
    assert done >= 10
    assert m["kvbridge_e2e_request_latency_seconds_count"] == done
    for name in ("time_to_first_token", "request_prefill_time", "request_kv_transfer_time",
                 "request_handshake_time", "request_queue_time",
                 "request_prefill_call"):  # fmt: skip
        assert 0 < m[f"kvbridge_{name}_seconds_count"] <= done, name
    assert m["kvbridge_inter_token_latency_seconds_count"] > done
    assert (
        m["kvbridge_time_to_first_token_seconds_sum"]
        < m["kvbridge_e2e_request_latency_seconds_sum"]
    )
    assert m["kvbridge_request_handshake_time_seconds_sum"] > 0  # the first pull shook hands
    assert (  # the call holds the compute
        m["kvbridge_request_prefill_call_seconds_sum"]
        >= m["kvbridge_request_prefill_time_seconds_sum"]
    )


def test_unavailable_prefill_answers_503(s):
    assert s.prefill.terminate(30) == 0
    with pytest.raises(openai.InternalServerError) as exc:
        s.openai().completions.create(model=MODEL_DIR, prompt="nobody home", max_tokens=2)
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == grpc.StatusCode.UNAVAILABLE.name.lower()

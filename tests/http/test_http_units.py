"""Units of the HTTP API above the gRPC call: stop strings, request parsing, the chat
template, error mapping and auth of the ASGI app (a scripted Generate stream stands
in for the daemon; the real daemons are in ``test_http_openai.py``)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import grpc
import pytest
from kvbridge.connector.serving.daemon.config import ConfigError, DaemonConfig, resolve_config
from kvbridge.connector.serving.http.app import MAX_BODY_BYTES, HttpSettings, build_app
from kvbridge.connector.serving.http.chat import ChatTemplate, TemplateError
from kvbridge.connector.serving.http.errors import APIError
from kvbridge.connector.serving.http.protocol import ChatRequest, CompletionRequest, parse
from kvbridge.connector.serving.http.server import served_model_name, start_http
from kvbridge.connector.serving.http.upstream import Completion, loopback_target
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from starlette.testclient import TestClient

TOKEN = b"t" * 24


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "scripted") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Call:
    """A scripted Generate stream: messages, or an exception to raise at that point."""

    def __init__(self, script) -> None:
        self.script, self.cancelled = list(script), False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for item in self.script:
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def msgs(texts: list[str], reason: int = pb.FINISH_REASON_LENGTH, prompt_tokens: int = 5):
    out = [pb.GenerateResponse(token_ids=[1], text=t) for t in texts]
    out[0].transfer.num_tokens = prompt_tokens
    out[-1].finish_reason = reason
    return out


def run_deltas(comp: Completion) -> list[str]:
    async def go():
        return [d async for d in comp.deltas()]

    return asyncio.run(go())


def _brute_force(texts: list[str], stops: list[str]) -> tuple[str, int, bool]:
    """Text, tokens read and whether a stop hit: the first prefix of tokens holding a stop
    string ends the completion before the earliest such string."""
    for k in range(1, len(texts) + 1):
        seen = "".join(texts[:k])
        hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if hits:
            return seen[: min(hits)], k, True
    return "".join(texts), len(texts), False


def test_stop_strings_end_the_stream_at_the_first_token_completing_one():
    rng = random.Random()
    alphabet = "abc"  # small: stops occur often, partial matches too
    for _ in range(300):
        texts = ["".join(rng.choices(alphabet, k=rng.randint(1, 3))) for _ in range(8)]
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(2)]
        want, tokens, hit = _brute_force(texts, stops)
        call = Call(msgs(texts))
        comp = Completion(call, stops)
        assert "".join(run_deltas(comp)) == want, (texts, stops)
        assert comp.finish_reason == ("stop" if hit else "length")
        assert (comp.completion_tokens, comp.prompt_tokens) == (tokens, 5)
        assert call.cancelled  # a no-op after a complete stream, the abort after a stop


def test_stream_without_a_reason_and_failures():
    comp = Completion(Call(msgs(["x", "y"], reason=0)))
    assert "".join(run_deltas(comp)) == "xy" and comp.finish_reason == "stop"
    for code, status in [(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
                         (grpc.StatusCode.UNAVAILABLE, 503),
                         (grpc.StatusCode.INVALID_ARGUMENT, 400),
                         (grpc.StatusCode.INTERNAL, 500)]:  # fmt: skip
        call = Call([*msgs(["a"], reason=0), RpcError(code)])
        with pytest.raises(APIError) as exc:
            run_deltas(Completion(call))
        assert exc.value.status == status and exc.value.code == code.name.lower()
        assert call.cancelled


def test_request_parsing_names_the_field():
    def err(model, body) -> APIError:
        with pytest.raises(APIError) as exc:
            parse(model, body if isinstance(body, bytes) else json.dumps(body).encode())
        assert exc.value.status == 400
        return exc.value

    assert "JSON" in err(CompletionRequest, b"{x").message
    assert "object" in err(CompletionRequest, b"[]").message
    assert err(CompletionRequest, {"prompt": "x"}).param == "model"
    assert err(CompletionRequest, {"model": "m", "prompt": "x", "n": 3}).param == "n"
    assert err(CompletionRequest, {"model": "m", "prompt": "x", "stop": [""]}).param == "stop"
    assert err(CompletionRequest, {"model": "m", "prompt": "x", "echo": True}).param == "echo"
    assert err(CompletionRequest, {"model": "m", "prompt": "x", "top_p": 0}).param == "top_p"
    assert err(ChatRequest, {"model": "m", "messages": []}).param == "messages"
    batch = parse(CompletionRequest, json.dumps({"model": "m", "prompt": ["a", "b"]}).encode())
    with pytest.raises(APIError, match="batch of 2"):
        batch.the_prompt()
    req = parse(CompletionRequest, json.dumps({
        "model": "m", "prompt": [[5, 6, 7]], "stop": ["END", 9], "stop_token_ids": [11],
        "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": -1, "max_tokens": 7,
    }).encode())  # fmt: skip
    g = req.generate_request("rid", req.the_prompt(), req.limit())
    assert list(g.prompt_token_ids) == [5, 6, 7] and g.max_new_tokens == 7
    assert list(g.stop_token_ids) == [9, 11] and req.stop_strings() == ["END"]
    assert (g.top_k, g.seed) == (40, (1 << 64) - 1) and g.HasField("seed")
    assert g.temperature == pytest.approx(0.5) and g.top_p == pytest.approx(0.9)
    g = parse(CompletionRequest, b'{"model": "m", "prompt": "hi"}').generate_request("r", "hi", 16)
    assert not g.HasField("seed") and g.temperature == 0 and g.prompt == "hi"
    chat = parse(ChatRequest, json.dumps({"model": "m", "max_completion_tokens": 3, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]}).encode())  # fmt: skip
    assert chat.template_messages()[0]["content"] == "ab" and chat.limit() == 3


def test_chat_template_from_checkpoint_files(tmp_path: Path):
    assert ChatTemplate.from_checkpoint(None) is None
    assert ChatTemplate.from_checkpoint(tmp_path) is None  # no tokenizer files
    source = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}={{ m | tojson }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    )
    cfg = {"bos_token": {"content": "<B>"}, "eos_token": "<E>",
           "chat_template": [{"name": "tool_use", "template": "no"},
                             {"name": "default", "template": source}]}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = ChatTemplate.from_checkpoint(tmp_path)
    m = [{"role": "user", "content": "é"}]
    assert t.render(m) == '<B>user={"role": "user", "content": "é"}<E>A:'
    assert t.render(m, add_generation_prompt=False).endswith("<E>")
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no ' + messages[0].role) }}")
    with pytest.raises(APIError, match="no user") as exc:
        ChatTemplate.from_checkpoint(tmp_path).render(m)
    assert exc.value.status == 400
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(TemplateError, match="does not compile") as exc:
        ChatTemplate.from_checkpoint(tmp_path)
    assert isinstance(exc.value, ConfigError)  # a start-up error: one line, exit 2


def test_flags_and_defaults():
    cfg = resolve_config("decode", {"http_port": -1}, environ={})
    assert cfg.http_port == -1 and DaemonConfig(role="decode").http_port == 8000
    assert start_http(cfg, None, None, 1) is None  # no HTTP API, nothing bound
    assert start_http(DaemonConfig(role="prefill"), None, None, 1) is None
    with pytest.raises(ConfigError, match="http-port"):
        resolve_config("decode", {}, environ={"KVBRIDGE_HTTP_PORT": "70000"})
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_config("prefill", {"config": str(_yaml(Path("/tmp"), "http_port: 1"))}, {})
    assert served_model_name(DaemonConfig(role="decode")) == "kvbridge-embedded"
    assert served_model_name(DaemonConfig(role="decode", model_path="/m/Llama-3-8B/")) == (
        "Llama-3-8B"
    )
    named = DaemonConfig(role="decode", model_path="/m/x", served_model_name="prod")
    assert served_model_name(named) == "prod"
    assert loopback_target("0.0.0.0", 5) == "127.0.0.1:5"
    assert loopback_target("::", 5) == "[::1]:5" and loopback_target("10.0.0.2", 5) == "10.0.0.2:5"


def _yaml(folder: Path, text: str) -> Path:
    import tempfile

    f = Path(tempfile.mkdtemp(dir=folder)) / "c.yaml"
    f.write_text(text)
    return f


class Upstream:
    def __init__(self) -> None:
        self.script: list = []
        self.requests: list[pb.GenerateRequest] = []

    def generate(self, req, stop=None) -> Completion:
        self.requests.append(req)
        return Completion(Call(self.script), stop)

    async def close(self) -> None:
        pass


def _client(token: bytes | None = None, draining: bool = False, template=None):
    up, refused = Upstream(), []
    s = HttpSettings("m", up, template, token, lambda: draining,
                     lambda p, r: refused.append((p, r)))  # fmt: skip
    return TestClient(build_app(s)), up, refused


def test_app_auth_health_and_error_shapes():
    c, _, refused = _client()
    assert c.get("/health").json() == {"status": "ok"}  # --insecure: no token needed
    assert c.get("/v1/models").json()["data"][0]["id"] == "m"
    c, _, refused = _client(token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        r = c.get("/health", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert len(refused) == 3 and refused[0] == ("/health", "no bearer token")
    ok = {"Authorization": "Bearer " + TOKEN.decode()}
    assert c.get("/v1/models", headers=ok).status_code == 200
    r = c.get("/v2/nothing", headers=ok)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert c.get("/v1/completions", headers=ok).status_code == 405
    big = {**ok, "Content-Length": str(MAX_BODY_BYTES + 1)}
    assert c.post("/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                  headers=big).status_code == 413  # fmt: skip
    c, _, _ = _client(draining=True)
    assert c.get("/health").status_code == 503
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"


def test_app_maps_daemon_failures_and_streams_errors():
    c, up, _ = _client()
    body = {"model": "m", "prompt": "p", "max_tokens": 3}
    for code, status in [(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
                         (grpc.StatusCode.UNAVAILABLE, 503)]:  # fmt: skip
        up.script = [RpcError(code, "full")]
        for stream in (False, True):  # before the first token: a real status either way
            r = c.post("/v1/completions", json={**body, "stream": stream})
            assert r.status_code == status and "full" in r.json()["error"]["message"]
    up.script = [*msgs(["a"], reason=0), RpcError(grpc.StatusCode.INTERNAL, "boom")]
    r = c.post("/v1/completions", json={**body, "stream": True})
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert r.status_code == 200 and json.loads(events[0])["choices"][0]["text"] == "a"
    assert "boom" in json.loads(events[1])["error"]["message"] and events[-1] == "[DONE]"
    up.script = msgs(["x", "y"], reason=pb.FINISH_REASON_STOP)
    r = c.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == "xy" and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert up.requests[-1].max_new_tokens == 3 and up.requests[-1].request_id == r["id"]


def test_a_taken_http_port_is_a_one_line_startup_error(tmp_path: Path):
    import socket
    import subprocess
    import sys

    from kvbridge.connector.serving.procs import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "kvbridge.connector.serving.cli", "decode", "--insecure",
             "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--side-port",
             str(free_port()), "--num-blocks", "8", "--prefill", "127.0.0.1:9",
             "--http-port", str(port), "--ready-file", str(tmp_path / "ready.json")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert res.returncode != 0 and not (tmp_path / "ready.json").exists()
    assert f"cannot bind the HTTP port 127.0.0.1:{port}" in res.stderr.strip().splitlines()[-1]


def test_request_timer_observes_tokens_transfers_and_outcomes():
    from kvbridge.connector.serving.daemon.latency import LatencyMetrics
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    lat = LatencyMetrics(reg, "decode")
    value = lambda name, **kw: reg.get_sample_value(name, {"role": "decode", **kw})
    t = lat.start()
    t.admitted()
    first = pb.GenerateResponse(token_ids=[1])
    first.transfer.prefill_seconds, first.transfer.transfer_seconds = 0.25, 0.125
    t.observe(first)
    t.observe(pb.GenerateResponse(token_ids=[2, 3]))  # an engine step of two tokens
    t.observe(pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH))
    t.finish()
    t.finish()  # idempotent
    assert value("kvbridge_time_to_first_token_seconds_count") == 1
    assert value("kvbridge_inter_token_latency_seconds_count") == 2  # one gap per token
    assert value("kvbridge_request_prefill_time_seconds_sum") == 0.25
    assert value("kvbridge_request_kv_transfer_time_seconds_sum") == 0.125
    assert value("kvbridge_request_queue_time_seconds_count") == 1
    assert value("kvbridge_e2e_request_latency_seconds_count") == 1
    outcomes = [(None, "abort"), (grpc.StatusCode.CANCELLED, "abort"),
                (grpc.StatusCode.UNAVAILABLE, "error")]  # fmt: skip
    for code, _ in outcomes:
        t = lat.start()
        t.fail(code)
        t.finish()
    lat.start().finish()  # ended without a reason: an error
    got = {r: value("kvbridge_request_finished_total", finish_reason=r)
           for r in ("stop", "length", "abort", "error")}  # fmt: skip
    assert got == {"stop": 0, "length": 1, "abort": 2, "error": 2}


def test_first_token_timeline_logs_each_phase_in_order(caplog):
    import logging

    from kvbridge.connector.serving.daemon.latency import log_timeline
    from kvbridge.connector.serving.daemon.states import RequestRecord

    rec = RequestRecord("r1")
    rec.created = t0 = time.monotonic() - 3.0
    rec.marks.update(admitted=t0 + 0.5, prefilled=t0 + 2.0, pulled=t0 + 2.25)  # no checksum
    with caplog.at_level(logging.INFO, logger="tl"):
        log_timeline(logging.getLogger("tl"), rec)
    (r,) = caplog.records
    assert r.getMessage() == "first token" and r.request_id == "r1"
    assert (r.to_admitted_s, r.to_prefilled_s, r.to_pulled_s) == (0.5, 1.5, 0.25)
    assert not hasattr(r, "to_verified_s") and 0.75 <= r.to_first_token_s < 60

"""The OpenAI-compatible routes (Starlette): models, completions, chat completions, health.

Every completion is one ``Generate`` call to the daemon (``upstream.py``); errors
use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvbridge.connector.serving.http.chat import ChatTemplate
from kvbridge.connector.serving.http.errors import APIError
from kvbridge.connector.serving.http.protocol import ChatRequest, CompletionRequest, parse
from kvbridge.connector.serving.http.upstream import (
    ClientGoneError,
    Completion,
    Upstream,
    unless_disconnected,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MAX_BODY_BYTES = 4 << 20  # larger bodies answer 413
CLIENT_CLOSED = 499  # nginx's code: the client went away (nobody reads the answer)


@dataclass
class HttpSettings:
    """What the routes need from the daemon (nothing of the model)."""

    model_name: str
    upstream: Upstream
    template: ChatTemplate | None = None
    token: bytes | None = None  # None: no authentication (--insecure)
    draining: Callable[[], bool] = lambda: False
    on_refused: Callable[[str, str], None] | None = None  # (path, reason)
    max_model_len: int = 0
    created: int = 0
    registry: object | None = None  # the daemon's Prometheus registry: GET /metrics


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer <token>`` on every path, else 401."""

    def __init__(self, app, settings: HttpSettings) -> None:
        self.app = app
        self.settings = settings
        self.expected = b"Bearer " + (settings.token or b"")

    def _reason(self, scope) -> str:
        values = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        if not values:
            return "no bearer token"
        if len(values) > 1:
            return "more than one authorization header"
        return "" if hmac.compare_digest(values[0], self.expected) else "wrong bearer token"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.settings.token is None:
            return await self.app(scope, receive, send)
        reason = self._reason(scope)
        if not reason:
            return await self.app(scope, receive, send)
        if self.settings.on_refused is not None:
            self.settings.on_refused(scope.get("path", ""), reason)
        err = APIError(
            401,
            f"{reason}: this server requires 'Authorization: Bearer <token>' (--auth-token-file)",
            code="invalid_api_key",
        )
        await err.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body; 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"request body larger than {limit} bytes", code="payload_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class OpenAIServer:
    """The routes over ``settings``."""

    def __init__(self, settings: HttpSettings) -> None:
        self.s = settings

    # ------------------------------------------------------------------ simple
    async def health(self, request: Request) -> Response:
        if self.s.draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        """The daemon's Prometheus metrics (as its metrics port serves them), vLLM-style."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.s.registry is None:
            raise APIError(404, "no metrics here", code="404")
        return Response(generate_latest(self.s.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        card = {"id": self.s.model_name, "object": "model", "created": self.s.created,
                "owned_by": "kvbridge", "max_model_len": self.s.max_model_len}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    # ------------------------------------------------------------- completions
    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = parse(CompletionRequest, await read_body(request))
        self._check_model(req.model)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = req.generate_request(rid, req.the_prompt(), req.limit())
        comp = self.s.upstream.generate(gen, req.stop_strings())
        base = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.s.model_name}  # fmt: skip

        def choice(text: str, finish: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if not req.stream:
            text = await unless_disconnected(comp.collect(), request)
            return JSONResponse(
                {**base, "choices": [choice(text, comp.finish_reason)], "usage": comp.usage}
            )
        return await self._stream(
            request, comp, base, req.include_usage(), lambda d: choice(d, None),
            lambda: choice("", comp.finish_reason),
        )  # fmt: skip

    async def chat(self, request: Request) -> Response:
        req: ChatRequest = parse(ChatRequest, await read_body(request))
        self._check_model(req.model)
        if self.s.template is None:
            raise APIError(
                400,
                f"model {self.s.model_name!r} has no chat template (no 'chat_template' in "
                "tokenizer_config.json or chat_template.jinja of --model-path): use "
                "/v1/completions",
                param="messages",
                code="no_chat_template",
            )
        prompt = self.s.template.render(req.template_messages(), add_generation_prompt=True)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        comp = self.s.upstream.generate(
            req.generate_request(rid, prompt, req.limit()), req.stop_strings()
        )
        base = {"id": rid, "created": int(time.time()), "model": self.s.model_name}

        if not req.stream:
            text = await unless_disconnected(comp.collect(), request)
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": comp.finish_reason}  # fmt: skip
            return JSONResponse(
                {**base, "object": "chat.completion", "choices": [choice], "usage": comp.usage}
            )
        base["object"] = "chat.completion.chunk"
        sent_role = False

        def delta(text: str) -> dict:
            nonlocal sent_role
            d = {"content": text}
            if not sent_role:
                d["role"], sent_role = "assistant", True
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": None}

        def last() -> dict:
            return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": comp.finish_reason}

        return await self._stream(request, comp, base, req.include_usage(), delta, last)

    # ----------------------------------------------------------------- helpers
    def _check_model(self, name: str) -> None:
        if name != self.s.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.s.model_name}`",
                param="model",
                code="model_not_found",
            )

    async def _stream(
        self,
        request: Request,
        comp: Completion,
        base: dict,
        include_usage: bool,
        chunk: Callable[[str], dict],
        last: Callable[[], dict],
    ) -> Response:
        """SSE: the first delta is awaited first, so failures before it get their status."""
        deltas = comp.deltas()
        try:
            first = await unless_disconnected(anext(deltas), request)
        except BaseException:
            await deltas.aclose()
            raise
        extra = {"usage": None} if include_usage else {}

        async def events() -> AsyncIterator[bytes]:
            try:
                text, n = first, 0
                while True:
                    if text or n == 0:  # the first chunk even when empty (chat: the role)
                        yield _sse({**base, "choices": [chunk(text)], **extra})
                        n += 1
                    if comp.finish_reason:
                        break
                    text = await anext(deltas)
                yield _sse({**base, "choices": [last()], **extra})
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": comp.usage})
            except StopAsyncIteration:
                pass
            except APIError as exc:
                yield _sse(exc.body())
            finally:
                await deltas.aclose()
            yield _sse("[DONE]")

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()


async def _client_gone(request: Request, exc: ClientGoneError) -> Response:
    return Response(status_code=CLIENT_CLOSED)


def build_app(settings: HttpSettings) -> Starlette:
    """The ASGI app: routes, error handlers, bearer-token middleware outermost."""
    api = OpenAIServer(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await settings.upstream.close()

    return Starlette(
        routes=[
            Route("/health", api.health, methods=["GET"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/metrics", api.metrics, methods=["GET"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            ClientGoneError: _client_gone,
        },
        middleware=[Middleware(BearerAuth, settings=settings)],
        lifespan=lifespan,
    )

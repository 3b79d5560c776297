"""Request bodies of the OpenAI API (the subset served) and their GenerateRequest."""

from __future__ import annotations

import json
from typing import Any

from kvbridge.connector.serving.http.errors import APIError
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default, used for chat too
UINT64 = 1 << 64


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by completions and chat completions; unknown fields are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension; -1 and 0: off
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=UINT64)
    stop: str | list[str | int] | None = None  # strings, or token ids
    stop_token_ids: list[int] | None = None  # vLLM's extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check(self) -> None:
        """Refuse what this server does not do (400 naming the field)."""
        if self.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (leave it 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if any(s == "" for s in self.stop_strings()):
            raise APIError(400, "stop strings must not be empty", param="stop")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop]
        return [s for s in self.stop if isinstance(s, str)]

    def stop_ids(self) -> list[int]:
        listed = self.stop if isinstance(self.stop, list) else []
        return [s for s in listed if isinstance(s, int)] + list(self.stop_token_ids or ())

    def limit(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def generate_request(
        self, request_id: str, prompt: str | list[int], max_tokens: int
    ) -> pb.GenerateRequest:
        req = pb.GenerateRequest(
            request_id=request_id,
            max_new_tokens=max_tokens,
            stop_token_ids=self.stop_ids(),
            temperature=self.temperature or 0.0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            top_k=max(self.top_k or 0, 0),
        )
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.prompt_token_ids.extend(prompt)
        if self.seed is not None:
            req.seed = self.seed % UINT64
        return req


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")

    def the_prompt(self) -> str | list[int]:
        """The one prompt (text or token ids); a batch of several is refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(
                    400, f"one prompt per request (got a batch of {len(p)})", param="prompt"
                )
            p = p[0]
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        return p


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None

    def check(self) -> None:
        super().check()
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages for the chat template: text content parts joined into a string."""
        out = []
        for i, m in enumerate(self.messages):
            if not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] needs a string role", param="messages")
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"):
                        raise APIError(
                            400, f"messages[{i}]: only text content parts are supported",
                            param="messages",
                        )  # fmt: skip
                    texts.append(str(part.get("text", "")))
                content = "".join(texts)
            elif content is not None and not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be text", param="messages")
            out.append({**m, "content": content})
        return out


def parse(model: type[_Request], body: bytes) -> Any:
    """The request of ``body`` (JSON) or a 400 naming what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{loc}: {err['msg']}", param=loc or None) from None
    req.check()
    return req

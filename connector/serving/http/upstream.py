"""The daemon's own gRPC ``Generate``, dialled over loopback, read as text deltas.

The HTTP front never touches the model: every completion is a ``Generate`` call to
the daemon's bound gRPC port with the daemon's own client credentials (TLS, client
certificate and bearer token, as it dials prefill daemons), so the decode engine
stays the single owner of the model. Cancelling the call (client gone, stop string
seen) ends the request in the daemon, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from kvbridge.connector.serving.daemon.security import ClientAuth
from kvbridge.connector.serving.http.errors import APIError
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc
from starlette.requests import Request

T = TypeVar("T")
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


def loopback_target(host: str, port: int) -> str:
    """Where the daemon's own gRPC server answers: loopback for a wildcard bind."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Upstream:
    """A ``grpc.aio`` channel to the daemon, made in the HTTP server's event loop."""

    def __init__(self, target: str, client: ClientAuth) -> None:
        self.target = target
        self.client = client
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.KVBridgeServiceStub | None = None

    def stub(self) -> pb_grpc.KVBridgeServiceStub:
        if self._stub is None:
            creds = self.client.credentials()
            opts = [("grpc.ssl_target_name_override", self.client.server_name)] if (
                creds is not None and self.client.server_name
            ) else []  # fmt: skip
            self._channel = (
                grpc.aio.insecure_channel(self.target, options=opts)
                if creds is None
                else grpc.aio.secure_channel(self.target, creds, options=opts)
            )
            self._stub = pb_grpc.KVBridgeServiceStub(self._channel)
        return self._stub

    def generate(self, req: pb.GenerateRequest, stop: list[str] | None = None) -> Completion:
        """Start ``req``; ``stop``: strings that end the completion (cut before them)."""
        return Completion(self.stub().Generate(req), stop)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


class Completion:
    """One Generate stream as text deltas; stop strings end it early (text cut before them).

    After the deltas: ``finish_reason`` (``stop``/``length``), ``prompt_tokens``
    (``TransferInfo.num_tokens``), ``completion_tokens`` (token ids received).
    A stop string may span several tokens, so up to its length minus one characters
    are held back until they cannot start one.
    """

    def __init__(self, call, stop: list[str] | None = None) -> None:
        self.call = call
        self.stop = [s for s in stop or () if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""  # all text received
        self.sent = 0  # characters of ``text`` handed out

    def _cut(self) -> str:
        """The next delta; sets ``finish_reason`` when a stop string appears."""
        if self.stop:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                delta, self.text = self.text[self.sent : end], self.text[:end]
                self.sent = end
                self.finish_reason = "stop"
                return delta
        end = len(self.text) if self.finish_reason else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : end], end
        return delta

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas (possibly empty) until the stream ends; ``APIError`` on a failure."""
        try:
            async for msg in self.call:
                if msg.HasField("transfer"):
                    self.prompt_tokens = int(msg.transfer.num_tokens)
                self.completion_tokens += len(msg.token_ids)
                self.text += msg.text
                if msg.finish_reason:
                    self.finish_reason = FINISH_REASONS.get(msg.finish_reason, "stop")
                    async for _ in self.call:  # read to the end: the daemon records it done
                        pass
                yield self._cut()
                if self.finish_reason:
                    return
            if self.finish_reason is None:  # the daemon always ends with a reason
                self.finish_reason = "stop"
                yield self._cut()
        except grpc.RpcError as exc:
            raise APIError.from_grpc(exc) from None
        finally:
            self.call.cancel()  # no-op once the call ended; else the daemon aborts it
            # (a stop string ends the call this way: Stats shows the request cancelled)

    async def collect(self) -> str:
        async for _ in self.deltas():
            pass
        return self.text

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class ClientGoneError(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(aw: Awaitable[T], request: Request) -> T:
    """``await aw``, cancelled (``ClientGoneError``) if the client disconnects first."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGoneError

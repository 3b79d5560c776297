"""Wire structs of the agent (msgspec): handshake, replies, transfer notices.

Every message carries ``version``; a message of another wire version is refused
with an error naming both versions before its body is looked at, and a malformed
message is a ``HandshakeError`` naming what is wrong, never a crash.

Side-channel frames are msgpack. Transfer notices riding on engine notifications
are JSON (Mooncake carries text only).
"""

from __future__ import annotations

from typing import Union

import msgspec
from kvbridge.connector.transfer.errors import HandshakeError

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 16 << 20


class AgentHello(msgspec.Struct, tag="hello", kw_only=True):
    """What a peer needs to plan against and reach an agent."""

    version: int = WIRE_VERSION
    agent_name: str
    backend: str
    engine_metadata: bytes
    topology: bytes  # TopologySpec.encode()
    compat_hash: str
    layout_hash: str
    tp_rank: int = 0
    tp_size: int = 1
    total_kv_heads: int = 0  # the model's KV heads; 0: heads per rank x tp_size (no replicas)
    side_channel: str = ""  # "host:port" of the agent's side channel, "" if none
    # random per agent object: a restarted process under the same name is a new peer
    instance_id: str = ""
    # registered scratch memory for the path probe (probe.py); 0 bytes: none
    probe_addr: int = 0
    probe_bytes: int = 0
    probe_device: str = ""
    local_metadata: bytes = b""  # the same-host transport's offer ("" when off)


class HandshakeRequest(msgspec.Struct, tag="handshake", kw_only=True):
    version: int = WIRE_VERSION
    hello: AgentHello


class HandshakeAccept(msgspec.Struct, tag="accept", kw_only=True):
    version: int = WIRE_VERSION
    hello: AgentHello


class HandshakeReject(msgspec.Struct, tag="reject", kw_only=True):
    version: int = WIRE_VERSION
    agent_name: str
    reason: str


class TransferNotice(msgspec.Struct, tag="notice", kw_only=True):
    """A transfer finished (``status="done"``) or failed; sent to the other side."""

    version: int = WIRE_VERSION
    request_id: str
    sender: str
    op: str  # "READ" (the receiver held the blocks) or "WRITE" (the receiver got them)
    # "done" | "failed" | "released" (a failed write can no longer touch the receiver's memory)
    status: str = "done"
    nbytes: int = 0
    detail: str = ""


class Ack(msgspec.Struct, tag="ack", kw_only=True):
    version: int = WIRE_VERSION


class ErrorReply(msgspec.Struct, tag="error", kw_only=True):
    version: int = WIRE_VERSION
    reason: str


Message = Union[  # noqa: UP007 - msgspec needs a Union object
    AgentHello, HandshakeRequest, HandshakeAccept, HandshakeReject, TransferNotice, Ack, ErrorReply
]


class _Envelope(msgspec.Struct):
    version: int = -1
    type: str = ""


_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder(Message)
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_json_decoder = msgspec.json.Decoder(TransferNotice)
_json_envelope = msgspec.json.Decoder(_Envelope)


def encode(msg: Message) -> bytes:
    return _msgpack_encoder.encode(msg)


def _check_version(env: _Envelope, what: str) -> None:
    if env.version != WIRE_VERSION:
        raise HandshakeError(
            f"{what}: peer speaks kvbridge wire version {env.version}, "
            f"this agent speaks version {WIRE_VERSION}"
        )


def decode(data: bytes, expect: type | tuple[type, ...] | None = None, what: str = "message"):
    """Decode a side-channel message; ``HandshakeError`` when malformed or unexpected."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HandshakeError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise HandshakeError(f"{what}: {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        env = _envelope_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise HandshakeError(f"{what}: not a kvbridge message ({exc})") from None
    _check_version(env, what)
    try:
        msg = _msgpack_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise HandshakeError(f"{what}: malformed {env.type or 'message'}: {exc}") from None
    if expect is not None and not isinstance(msg, expect):
        names = (
            expect.__name__ if isinstance(expect, type) else "/".join(t.__name__ for t in expect)
        )
        raise HandshakeError(f"{what}: expected {names}, got {type(msg).__name__}")
    return msg


def decode_hello(data: bytes) -> AgentHello:
    """A peer's ``AgentHello`` (what ``KVTransferAgent.metadata()`` returns)."""
    return decode(data, AgentHello, "peer metadata")


def encode_notice(notice: TransferNotice) -> bytes:
    """A notice as JSON text (fits every engine's notification channel)."""
    return msgspec.json.encode(notice)


def decode_notice(data: bytes) -> TransferNotice:
    try:
        env = _json_envelope.decode(data)
    except msgspec.DecodeError as exc:
        raise HandshakeError(f"transfer notice: not a kvbridge notice ({exc})") from None
    _check_version(env, "transfer notice")
    try:
        return _json_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise HandshakeError(f"transfer notice: malformed: {exc}") from None

"""Wire structs and the zmq side channel: versions, malformed input, signatures, timeouts."""

from __future__ import annotations

import time

import msgspec
import pytest
import torch
import zmq
from kvbridge.connector.transfer import metadata as md
from kvbridge.connector.transfer.errors import (
    HandshakeError,
    IncompatiblePeerError,
    PeerUnreachableError,
)
from kvbridge.connector.transfer.side_channel import SideChannelServer, parse_address, request


def _hello(**kw) -> md.AgentHello:
    base = dict(agent_name="p0", backend="nixl", engine_metadata=b"\x00\x01", topology=b"spec",
                compat_hash="c" * 32, layout_hash="l" * 32, tp_rank=1, tp_size=2,
                side_channel="127.0.0.1:5555")  # fmt: skip
    return md.AgentHello(**{**base, **kw})


def test_hello_round_trip_and_type_check():
    h = _hello()
    assert md.decode_hello(md.encode(h)) == h
    with pytest.raises(HandshakeError, match="expected AgentHello, got Ack"):
        md.decode_hello(md.encode(md.Ack()))


def test_other_wire_version_is_named():
    data = msgspec.msgpack.encode({"type": "hello", "version": 7, "agent_name": "x"})
    with pytest.raises(HandshakeError, match=r"wire version 7.*speaks version 1"):
        md.decode_hello(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\x00garbage",
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"type": "hello", "version": 1}),  # fields missing
        msgspec.msgpack.encode({"type": "nonsense", "version": 1}),
    ],
)
def test_malformed_messages_are_clear_errors(data):
    with pytest.raises(HandshakeError, match=r"peer metadata: (not a kvbridge|malformed)"):
        md.decode_hello(data)


def test_notice_json_round_trip_and_errors():
    n = md.TransferNotice(request_id="r1", sender="d0", op="READ", nbytes=10)
    assert md.decode_notice(md.encode_notice(n)) == n
    assert md.encode_notice(n).decode().isascii()  # Mooncake carries text
    with pytest.raises(HandshakeError, match="not a kvbridge notice"):
        md.decode_notice(b"\x00\x01")
    with pytest.raises(HandshakeError, match="wire version 3"):
        md.decode_notice(b'{"type": "notice", "version": 3}')


def _echo(msg):
    if isinstance(msg, md.AgentHello):
        return md.HandshakeAccept(hello=msg)
    return md.Ack()


def test_side_channel_request_reply_and_garbage_survival():
    server = SideChannelServer(_echo)
    try:
        reply = request(server.address, _hello(), 5.0, expect=md.HandshakeAccept)
        assert reply.hello == _hello()
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{server.address}")
        sock.send(b"\x93not msgpack of ours")
        assert sock.poll(5000)
        err = md.decode(sock.recv())
        sock.close(0)
        assert isinstance(err, md.ErrorReply) and "not a kvbridge message" in err.reason
        assert isinstance(request(server.address, md.Ack(), 5.0), md.Ack)  # still serving
    finally:
        server.close()


def test_side_channel_signatures():
    server = SideChannelServer(_echo, secret=b"s3cret")
    try:
        assert isinstance(request(server.address, md.Ack(), 5.0, secret=b"s3cret"), md.Ack)
        with pytest.raises(HandshakeError, match="bad signature"):
            request(server.address, md.Ack(), 5.0, secret=b"other")
        with pytest.raises(HandshakeError, match=r"requires a shared secret.*unsigned message"):
            request(server.address, md.Ack(), 5.0)
    finally:
        server.close()


def test_unreachable_side_channel_is_bounded():
    t0 = time.perf_counter()
    with pytest.raises(PeerUnreachableError, match=r"did not answer within 0\.3"):
        request("127.0.0.1:9", md.Ack(), 0.3)
    assert time.perf_counter() - t0 < 3
    with pytest.raises(ValueError, match="host:port"):
        parse_address("no-port")


@pytest.fixture(scope="module")
def agent():
    from kvbridge.connector import KVTransferAgent
    from kvbridge.topology import layouts

    cache = layouts.allocate("nhd", num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2,
                             head_dim=8, generator=torch.Generator().manual_seed(0))  # fmt: skip
    with KVTransferAgent("wire-agent", cache, "nixl", side_channel_port=None) as a:
        yield a


def test_agent_refuses_bad_hellos(agent):
    good = md.decode_hello(agent.metadata())
    cases = [
        (msgspec.structs.replace(good, agent_name="wire-agent"), "own name"),
        (msgspec.structs.replace(good, agent_name="x", backend="mooncake"), "'mooncake' backend"),
        (msgspec.structs.replace(good, agent_name="x", tp_rank=2, tp_size=2), "bad tensor-par"),
        (msgspec.structs.replace(good, agent_name="x", topology=b"\x01"), "invalid topology"),
        (msgspec.structs.replace(good, agent_name="x", compat_hash="0" * 32), "do not match"),
    ]
    for hello, reason in cases:
        with pytest.raises(IncompatiblePeerError, match=reason):
            agent.connect(md.encode(hello))
    with pytest.raises(HandshakeError, match="not a kvbridge message"):
        agent.connect(b"\x00garbage")
    assert agent.peers == {}

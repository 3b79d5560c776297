"""Fuzzing of the side channel (decoder and a live daemon's socket) and of the KV handles a
decode daemon receives (a fake prefill daemon answers crafted handles).

Random bytes, other wire versions, wrong types, mismatched topologies and unknown
or impostor senders each get a clear refusal; a handle with out-of-range, negative
or duplicate block ids, a wrong block size, token count, lease, engine or address
fails that one request with a clear status. After every example the daemons are
SERVING, hold no block, and the poison bands around their caches are unchanged.
"""

from __future__ import annotations

import re
from concurrent import futures

import grpc
import msgspec
import pytest
import zmq
from engines import BACKENDS, require
from faultkit import NUM_BLOCKS, gen, healthy, local_daemon, stats, wait_for
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvbridge.connector.serving.daemon.common import SERVICE_NAME
from kvbridge.connector.transfer import metadata as md
from kvbridge.connector.transfer.errors import HandshakeError
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

pytestmark = pytest.mark.faults

SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=SLOW_OK)
SMALL = settings(FUZZ, max_examples=25)

# ----------------------------------------------------------------- decoder only
msg_like = st.dictionaries(
    st.sampled_from(["type", "version", "agent_name", "hello", "request_id", "sender", "op",
                     "status", "reason", "topology", "engine_metadata", "tp_rank"]),
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.binary(max_size=20),
              st.none(), st.sampled_from(["hello", "handshake", "notice", "ack", "error"])),
)  # fmt: skip


@FUZZ
@given(data=st.one_of(st.binary(max_size=256), msg_like.map(msgspec.msgpack.encode)))
def test_decoder_never_fails_unclearly(data):
    try:
        msg = md.decode(data, what="fuzz")
    except HandshakeError as exc:
        assert str(exc).startswith("fuzz: ")
    else:
        assert isinstance(msg, md.Message.__args__)
    try:
        md.decode_notice(data)
    except HandshakeError as exc:
        assert "transfer notice" in str(exc)


@FUZZ
@given(version=st.integers(-(2**63), 2**63 - 1).filter(lambda v: v != md.WIRE_VERSION))
def test_other_wire_versions_are_named(version):
    data = msgspec.msgpack.encode({"type": "ack", "version": version})
    with pytest.raises(HandshakeError, match=rf"wire version {version}\b"):
        md.decode(data)


# ------------------------------------------------------------ a live side channel
@pytest.fixture(scope="module")
def prefill(tmp_path_factory):
    pytest.importorskip("nixl_cu12")
    proc = local_daemon("prefill", "nixl", tmp_path_factory.mktemp("wire"), "wire-p",
                        "--lease-seconds", "20")  # fmt: skip
    try:
        yield proc
    finally:
        code = proc.terminate(20)
    assert code == 0


def _side_address(proc) -> str:
    with proc.channel() as ch:
        h = (
            pb_grpc.KVBridgeServiceStub(ch)
            .Prefill(
                pb.PrefillRequest(request_id="probe", prompt_token_ids=[1], requester="x"),
                timeout=10,
            )
            .handle
        )
        pb_grpc.KVBridgeServiceStub(ch).Release(pb.ReleaseRequest(request_id="probe"), timeout=10)
    return h.side_channel_address


def _send(address: str, frames: list[bytes]) -> list[bytes]:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{address}")
        sock.send_multipart(frames)
        assert sock.poll(5000), "the side channel did not answer"
        return sock.recv_multipart()
    finally:
        sock.close(0)


def _ask(address: str, msg) -> object:
    """One signed-less message to the side channel; its decoded reply."""
    return md.decode(_send(address, [md.encode(msg)])[-1])


def _sound(proc) -> None:
    with proc.channel() as ch:
        s = stats(pb_grpc.KVBridgeServiceStub(ch), False)
    assert s.guard_band_bytes_changed == 0
    assert healthy(proc)


@SMALL
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_live_side_channel_survives_garbage(prefill, frames):
    address = _side_address_cached(prefill)
    reply = _send(address, frames)
    msg = md.decode(reply[-1])
    assert isinstance(msg, (md.ErrorReply, md.Ack, md.HandshakeAccept, md.HandshakeReject))
    if isinstance(msg, md.ErrorReply):
        assert msg.reason
    _sound(prefill)


_ADDRESS: dict[str, str] = {}


def _side_address_cached(proc) -> str:
    if proc.name not in _ADDRESS:
        _ADDRESS[proc.name] = _side_address(proc)
    return _ADDRESS[proc.name]


def test_live_side_channel_refuses_mismatched_peers_and_impostor_notices(prefill):
    address = _side_address_cached(prefill)
    accept = _ask(address, md.AgentHello(
        agent_name="probe", backend="nixl", engine_metadata=b"", topology=b"",
        compat_hash="", layout_hash=""))  # fmt: skip
    real = accept.hello  # a probe hello is answered with the daemon's own hello
    cases = [
        (msgspec.structs.replace(real, agent_name="twin", compat_hash="0" * 32), "match"),
        (msgspec.structs.replace(real, agent_name="twin", topology=b"\x00junk"), "topology"),
        (msgspec.structs.replace(real, agent_name="twin", backend="mooncake"), "backend"),
        (msgspec.structs.replace(real, agent_name="twin", version=9), "wire version 9"),
    ]
    for hello, words in cases:
        reply = _ask(address, md.HandshakeRequest(hello=hello))
        reason = getattr(reply, "reason", "")
        assert isinstance(reply, (md.HandshakeReject, md.ErrorReply)) and words in reason, reply
    # a lease for "owner"; a completion notice from anyone else must not end it
    with prefill.channel() as ch:
        stub = pb_grpc.KVBridgeServiceStub(ch)
        stub.Prefill(pb.PrefillRequest(request_id="leased", prompt_token_ids=list(range(1, 40)),
                                       requester="owner"), timeout=10)  # fmt: skip
        for sender in ("mallory", "", "owner "):
            notice = md.TransferNotice(request_id="leased", sender=sender, op="READ")
            assert isinstance(_ask(address, notice), md.Ack)
        unknown = md.TransferNotice(request_id="no-such-lease", sender="owner", op="READ")
        assert isinstance(_ask(address, unknown), md.Ack)
        wait_for(lambda: prefill.log_path.read_text().count("ignored a completion notice")
                 >= 3, 10, "the impostors' notices handled")  # fmt: skip
        assert stats(stub, False).leased_blocks == 3, "an impostor's notice ended the lease"
        owner = md.TransferNotice(request_id="leased", sender="owner", op="READ")
        assert isinstance(_ask(address, owner), md.Ack)
        wait_for(lambda: stats(stub, False).leased_blocks == 0, 5, "the owner's notice")
    _sound(prefill)


# -------------------------------------------------- crafted handles to a decoder
class FakePrefill(pb_grpc.KVBridgeServiceServicer):
    """Answers Prefill with ``craft(request)`` (a KVHandle), counts Release calls."""

    def __init__(self) -> None:
        self.craft = None
        self.released = 0

    def Prefill(self, request, context):
        return pb.PrefillResponse(handle=self.craft(request))

    def Release(self, request, context):
        self.released += 1
        return pb.ReleaseResponse(released=False)


@pytest.fixture(scope="module", params=BACKENDS)
def crafted(request, tmp_path_factory):
    require(request.param)
    tmp = tmp_path_factory.mktemp(f"craft-{request.param}")
    real = local_daemon("prefill", request.param, tmp, f"real-{request.param}")
    fake = FakePrefill()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_KVBridgeServiceServicer_to_server(fake, server)
    ready = health.HealthServicer()  # a decode daemon is ready once its prefill is
    ready.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(ready, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    decode = local_daemon("decode", request.param, tmp, f"victim-{request.param}",
                          "--prefill", f"127.0.0.1:{port}", "--transfer-timeout", "3",
                          "--request-timeout", "5")  # fmt: skip
    with real.channel() as ch:
        template = (
            pb_grpc.KVBridgeServiceStub(ch)
            .Prefill(
                pb.PrefillRequest(request_id="template", prompt_token_ids=[1, 2, 3]), timeout=10
            )
            .handle
        )
        pb_grpc.KVBridgeServiceStub(ch).Release(pb.ReleaseRequest(request_id="template"))
    try:
        yield real, decode, fake, template
    finally:
        server.stop(1)
        codes = [p.terminate(20) for p in (decode, real)]
    assert codes == [0, 0]


block_lists = st.one_of(
    st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=1, max_size=4, unique=True),
    st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=2, max_size=4).filter(
        lambda ids: len(set(ids)) < len(ids)),  # duplicates
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4),
    st.lists(st.sampled_from([-1, NUM_BLOCKS, NUM_BLOCKS + 1, 2**31, 2**32]), min_size=1,
             max_size=3),
)  # fmt: skip
ALLOWED = {
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL,
}  # fmt: skip


@SMALL
@given(
    ids=block_lists,
    tokens_delta=st.sampled_from([0, 0, 0, 1, -1, 10**6]),
    block_size=st.sampled_from([16, 16, 16, 0, 8, -16, 2**31 - 1]),
    lease=st.one_of(st.just(10.0), st.floats(allow_nan=True, allow_infinity=True)),
    engine=st.sampled_from(["same", "same", "other", ""]),
    address=st.sampled_from(["same", "same", "same", "127.0.0.1:1", "nohost", ":::", "x:99999"]),
    checksum=st.sampled_from(["", "0" * 32, "zz"]),
)
def test_crafted_handles_fail_cleanly(crafted, ids, tokens_delta, block_size, lease, engine,
                                      address, checksum):  # fmt: skip
    real, decode, fake, t = crafted

    def craft(req: pb.PrefillRequest) -> pb.KVHandle:
        return pb.KVHandle(
            request_id=req.request_id,
            engine_name={"same": t.engine_name, "other": "nobody"}.get(engine, engine),
            side_channel_address=t.side_channel_address if address == "same" else address,
            block_ids=ids, num_tokens=len(req.prompt_token_ids) + tokens_delta,
            block_size=block_size, lease_seconds_left=lease, backend=t.backend,
            kv_layout=t.kv_layout, compat_hash=t.compat_hash, kv_checksum=checksum,
            model_id=t.model_id,
        )  # fmt: skip

    fake.craft = craft
    n_tokens = 16 * len(ids) - 3  # consistent with the ids when tokens_delta == 0
    prompt = [1 + i % 500 for i in range(max(n_tokens, 1))]
    with decode.channel() as ch:
        stub = pb_grpc.KVBridgeServiceStub(ch)
        try:
            g = gen(stub, prompt, 2, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in ALLOWED, (exc.code(), exc.details())
            assert exc.details()
            if exc.code() == grpc.StatusCode.INTERNAL:
                assert re.search(r"prefill .* returned", exc.details()), exc.details()
        else:  # only a consistent handle with a matching checksum could pass
            pytest.fail(f"a crafted handle was accepted: {g.transfer}")
        wait_for(lambda: (s := stats(stub, False)).blocks_in_use == 0 and not s.requests,
                 20, "decode blocks freed")  # fmt: skip
        assert stats(stub).guard_band_bytes_changed == 0
    with real.channel() as ch:
        s = stats(pb_grpc.KVBridgeServiceStub(ch), False)
        assert s.guard_band_bytes_changed == 0 and s.blocks_in_use == 0
    assert healthy(decode) and healthy(real)

"""Authentication end to end: gRPC over mutual TLS with a bearer token, a signed side
channel, refusals counted and logged, and the client CLI with the auth flags.

Certificates come from a CA made at test time (``certs.py``); the daemons run
exactly the flags the Helm chart passes (``--tls-cert --tls-key --tls-ca
--auth-token-file --side-secret-file``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from certs import TestCA, secret_file
from faultkit import gen, local_daemon, prompt_ids, reference_tokens, stats, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kvbridge.connector.serving.daemon.security import ClientAuth
from kvbridge.connector.transfer import metadata as md
from kvbridge.connector.transfer.errors import HandshakeError
from kvbridge.connector.transfer.side_channel import request
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

pytestmark = pytest.mark.faults


class Pki:
    def __init__(self, tmp) -> None:
        self.ca = TestCA(tmp)
        self.leaf = self.ca.leaf("daemon")
        self.rogue_ca = TestCA(tmp, "rogue-ca")
        self.rogue = self.rogue_ca.leaf("rogue")
        self.token = secret_file(tmp / "token")
        self.side = secret_file(tmp / "side-secret", 48)
        self.other_token = secret_file(tmp / "other-token")
        self.other_side = secret_file(tmp / "other-side", 48)

    def flags(self, token=None, side=None) -> list[str]:
        return ["--tls-cert", str(self.leaf.cert), "--tls-key", str(self.leaf.key),
                "--tls-ca", str(self.ca.path), "--auth-token-file", str(token or self.token),
                "--side-secret-file", str(side or self.side)]  # fmt: skip

    def client(self, **over) -> ClientAuth:
        kw = dict(tls_ca=str(self.ca.path), tls_cert=str(self.leaf.cert),
                  tls_key=str(self.leaf.key), auth_token_file=str(self.token))  # fmt: skip
        return ClientAuth.from_files(**{**kw, **over})


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    pytest.importorskip("nixl_cu12")
    tmp = tmp_path_factory.mktemp("auth")
    pki = Pki(tmp)
    prefill = local_daemon("prefill", "nixl", tmp, "sec-p", *pki.flags(), "--lease-seconds", "5",
                           client=pki.client(), insecure=False)  # fmt: skip
    decode = local_daemon("decode", "nixl", tmp, "sec-d", *pki.flags(), "--prefill",
                          prefill.target, client=pki.client(), insecure=False)  # fmt: skip
    try:
        yield pki, prefill, decode, tmp
    finally:
        codes = [p.terminate(20) for p in (decode, prefill)]
    assert codes == [0, 0]


def _stub(proc, client: ClientAuth):
    return pb_grpc.KVBridgeServiceStub(client.channel(proc.target))


def test_authenticated_generation_is_byte_exact(secure):
    pki, _, decode, _ = secure
    ids = prompt_ids(3, seed=41)
    g = gen(_stub(decode, pki.client()), ids, 4)
    assert g.token_ids == reference_tokens(ids, 4) and g.transfer.kv_checksum
    assert json.loads(decode.ready_file.read_text())["auth"] == "mtls"
    # health needs TLS (and a client certificate) but no token: Kubernetes probes
    with pki.client(auth_token_file=None).channel(decode.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _every_call(ch: grpc.Channel, md_: tuple) -> list:
    """One call of every RPC (and reflection) with metadata ``md_``; garbage bodies too."""
    s = pb_grpc.KVBridgeServiceStub(ch)
    gen_req = pb.GenerateRequest(prompt="hi", max_new_tokens=1)
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    listing = [reflection_pb2.ServerReflectionRequest(list_services="")]
    return [
        lambda: s.Stats(pb.StatsRequest(), timeout=10, metadata=md_),
        lambda: s.Release(pb.ReleaseRequest(request_id="x"), timeout=10, metadata=md_),
        lambda: list(s.Generate(gen_req, timeout=10, metadata=md_)),
        lambda: s.Prefill(pb.PrefillRequest(prompt_token_ids=[1]), timeout=10, metadata=md_),
        # undecodable bytes are never parsed for an unauthenticated caller
        lambda: ch.unary_unary("/kvbridge.v1.KVBridgeService/Stats")(
            b"\xff\xff", timeout=10, metadata=md_
        ),
        lambda: list(refl.ServerReflectionInfo(iter(listing), timeout=10, metadata=md_)),
    ]


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_missing_or_wrong_tokens_are_refused_counted_and_logged(secure):
    pki, _, decode, _ = secure
    good = _stub(decode, pki.client())
    before = stats(good).counters.auth_failures
    m_before = decode.metrics()["kvbridge_auth_failures_total"]
    tls_only = pki.client(auth_token_file=None)
    wrong = pki.client(auth_token_file=str(pki.other_token))
    refused = 0
    for client, extra in ((tls_only, ()), (wrong, ()),
                          (tls_only, (("authorization", "Basic abc"),)),
                          (tls_only, (("authorization", "Bearer " + pki.token.read_text()
                                       .strip() + "x"),))):  # fmt: skip
        with client.channel(decode.target) as ch:
            calls = _every_call(ch, extra)
            for call in calls:
                err = _refused(call)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
                assert "Bearer" in err.details()
                refused += 1
    # two authorization headers (a valid one among them) are refused too
    with tls_only.channel(decode.target) as ch:
        token = pki.token.read_text().strip()
        two = (("authorization", f"Bearer {token}"), ("authorization", "Bearer x"))
        err = _refused(lambda: pb_grpc.KVBridgeServiceStub(ch).Stats(
            pb.StatsRequest(), timeout=10, metadata=two))  # fmt: skip
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "more than one" in err.details()
        refused += 1
    assert stats(good).counters.auth_failures - before == refused
    assert decode.metrics()["kvbridge_auth_failures_total"] - m_before == refused
    assert "refused an unauthenticated call" in decode.log_path.read_text()


def test_tls_refuses_plaintext_unknown_cas_and_missing_client_certs(secure):
    pki, _, decode, _ = secure
    bad_clients = {
        "plaintext": ClientAuth(),
        "no client cert": pki.client(tls_cert=None, tls_key=None),
        "client cert of another CA": pki.client(tls_cert=str(pki.rogue.cert),
                                                tls_key=str(pki.rogue.key)),
        "server not trusted": pki.client(tls_ca=str(pki.rogue_ca.path)),
    }  # fmt: skip
    for what, client in bad_clients.items():
        with client.channel(decode.target) as ch:
            err = _refused(lambda c=ch: health_pb2_grpc.HealthStub(c).Check(
                health_pb2.HealthCheckRequest(), timeout=5))  # fmt: skip
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (what, err.details())
    good = _stub(decode, pki.client())
    assert stats(good).guard_band_bytes_changed == 0


def test_side_channel_is_signed(secure):
    pki, prefill, _, _ = secure
    p = _stub(prefill, pki.client())
    req = pb.PrefillRequest(request_id="side", prompt_token_ids=list(range(1, 30)),
                            requester="sec-d")  # fmt: skip
    side = p.Prefill(req, timeout=10).handle.side_channel_address
    secret = pki.side.read_bytes().strip()
    probe = md.TransferNotice(request_id="nothing", sender="sec-d", op="READ")
    with pytest.raises(HandshakeError, match="requires a shared secret"):
        request(side, probe, 5.0)
    with pytest.raises(HandshakeError, match="bad signature"):
        request(side, probe, 5.0, secret=pki.other_side.read_bytes().strip())
    assert isinstance(request(side, probe, 5.0, secret=secret), md.Ack)
    # even correctly signed, a completion notice from an engine that does not hold the
    # lease is ignored; the holder's own notice ends it
    forged = md.TransferNotice(request_id="side", sender="mallory", op="READ")
    assert isinstance(request(side, forged, 5.0, secret=secret), md.Ack)
    for words in ("refused a message", "ignored a completion notice"):  # logged, async
        wait_for(lambda w=words: w in prefill.log_path.read_text(), 10, f"log: {words}")
    assert p.Stats(pb.StatsRequest(), timeout=10).leased_blocks == 2
    assert p.Release(pb.ReleaseRequest(request_id="side"), timeout=10).released


def test_misconfigured_peers_fail_with_clear_errors(secure):
    pki, prefill, _, tmp = secure
    cases = {
        "other side secret": (pki.flags(side=pki.other_side), "signature"),
        "other token": (pki.flags(token=pki.other_token), "UNAUTHENTICATED"),
    }
    for what, (flags, words) in cases.items():
        token = pki.other_token if what == "other token" else pki.token
        d = local_daemon("decode", "nixl", tmp, f"mis-{words}", *flags, "--prefill",
                         prefill.target, client=pki.client(auth_token_file=str(token)),
                         insecure=False)  # fmt: skip
        try:
            err = _refused(lambda d=d, t=token: gen(
                _stub(d, pki.client(auth_token_file=str(t))), prompt_ids(1, 43), 2))  # fmt: skip
            # a prefill refusing the decode's token is the decode's misconfiguration, never
            # passed through as UNAUTHENTICATED to a client that authenticated correctly
            want = {"other token": grpc.StatusCode.FAILED_PRECONDITION,
                    "other side secret": grpc.StatusCode.UNAVAILABLE}[what]  # fmt: skip
            assert err.code() == want, (what, err.code(), err.details())
            assert words in err.details(), (what, err.details())
            s = stats(_stub(d, pki.client(auth_token_file=str(token))))
            assert s.blocks_in_use == 0 and s.quarantined_blocks == 0
        finally:
            assert d.terminate(20) == 0


def test_cli_with_auth_flags_and_config_errors(secure):
    pki, prefill, decode, _ = secure
    cli = [sys.executable, "-m", "kvbridge.connector.serving.cli"]
    auth = ["--tls-ca", str(pki.ca.path), "--tls-cert", str(pki.leaf.cert), "--tls-key",
            str(pki.leaf.key), "--auth-token-file", str(pki.token)]  # fmt: skip
    ids = prompt_ids(1, 44)
    args = ["generate", "--target", decode.target, "--prompt-tokens", ",".join(map(str, ids)),
            "--max-new-tokens", "3", "--json", "--verify-kv", *auth]  # fmt: skip
    res = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["token_ids"] == reference_tokens(ids, 3)
    res = subprocess.run([*cli, "stats", "--target", prefill.target, *auth],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and json.loads(res.stdout)["role"] == "ROLE_PREFILL", res.stderr
    no_token = auth[:-2]
    res = subprocess.run([*cli, "stats", "--target", prefill.target, *no_token],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1 and "UNAUTHENTICATED" in res.stderr
    # a daemon with half the auth flags refuses to start, naming what is missing
    half = ["prefill", "--tls-cert", str(pki.leaf.cert), "--tls-key", str(pki.leaf.key)]
    res = subprocess.run([*cli, *half], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "missing --auth-token-file, --side-secret-file" in res.stderr

"""TLS certificate rotation without a restart: new handshakes get the new certificate."""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kvbridge.connector.serving.daemon import cert_reload
from kvbridge.connector.serving.daemon.security import ServerAuth

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from certs import TestCA, secret_file


def _check(port: int, ca: Path) -> bool:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False
    return True


def _install(src_cert: Path, src_key: Path, cert: Path, key: Path) -> None:
    """Swap the files in (new inodes), as a Secret volume update does."""
    for src, dst in ((src_cert, cert), (src_key, key)):
        tmp = dst.with_suffix(".new")
        shutil.copy(src, tmp)
        os.replace(tmp, dst)


def test_rotated_certificate_is_served_without_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(cert_reload, "CHECK_SECONDS", 0.0)
    ca_a, ca_b = TestCA(tmp_path, "ca-a"), TestCA(tmp_path, "ca-b")
    leaf_a, leaf_b = ca_a.leaf("server-a"), ca_b.leaf("server-b")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(leaf_a.cert, leaf_a.key, cert, key)
    cfg = SimpleNamespace(
        insecure=False, tls_cert=str(cert), tls_key=str(key), tls_ca=None,
        auth_token_file=str(secret_file(tmp_path / "token")),
        side_secret_file=str(secret_file(tmp_path / "side")),
    )  # fmt: skip
    reloading = cert_reload.ReloadingCredentials(cfg, ServerAuth.from_config(cfg))
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", reloading.credentials)
    server.start()
    try:
        assert _check(port, ca_a.path) and not _check(port, ca_b.path)
        _install(leaf_b.cert, leaf_b.key, cert, key)
        assert _check(port, ca_b.path) and not _check(port, ca_a.path)
        assert reloading.reloads == 1
        generation, client = reloading.client_source()  # what the prefill pool dials with
        assert generation == 1 and client.cert == leaf_b.cert.read_bytes()
        # a half-written rotation (key of another certificate) is refused: B stays
        _install(leaf_b.cert, leaf_a.key, cert, key)
        assert _check(port, ca_b.path) and reloading.reloads == 1
    finally:
        server.stop(None)


def test_pool_dials_with_new_credentials_and_closes_old_channels_when_idle():
    from kvbridge.connector.serving.daemon.prefill_pool import PrefillPool
    from kvbridge.connector.serving.daemon.security import ClientAuth

    pool = PrefillPool(["127.0.0.1:1", "127.0.0.1:2"])
    try:
        with pool.use("127.0.0.1:1") as old_stub:
            old = dict(pool._peers)
            pool.set_client(ClientAuth(server_name="rotated"))
            assert pool._client.server_name == "rotated"
            with pool.use("127.0.0.1:1") as new_stub:
                assert new_stub is not old_stub
            assert pool._old == [old["127.0.0.1:1"]]  # in use: kept open
        with pool._lock:
            pool._close_idle_old()
        assert pool._old == [] and pool.targets == ["127.0.0.1:1", "127.0.0.1:2"]
    finally:
        pool.close()

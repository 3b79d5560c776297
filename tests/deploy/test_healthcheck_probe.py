"""The chart's exec probe, run as a process against a real gRPC server with mutual TLS, a bearer
token and the standard health service, using the certificate and token the chart generates."""

from __future__ import annotations

import base64
import datetime
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from deploy_chart import DEPLOY, container, fullname, render
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

HEALTHCHECK = DEPLOY / "healthcheck.py"
PROBE_TIMEOUT_S = 30


class _TokenAuth(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") == f"Bearer {self.token}":
            return continuation(handler_call_details)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(deny)


def _chart_credentials(tmp: Path) -> dict[str, Path]:
    """Write the chart's generated TLS secret and token where the probe's paths point."""
    r = render("default")
    files = {}
    for secret, keys in (
        (f"{fullname()}-tls", ("tls.crt", "tls.key", "ca.crt")),
        (f"{fullname()}-auth", ("token",)),
    ):
        data = r.get("Secret", secret)["data"]
        for key in keys:
            path = tmp / key
            path.write_bytes(base64.b64decode(data[key]))
            files[key] = path
    return files


def _probe_command(files: dict[str, Path], port: int) -> list[str]:
    """The decode daemon's rendered readiness probe, with pod paths mapped to ``files``."""
    cmd = container(render("default").get("StatefulSet", f"{fullname()}-decode"))["readinessProbe"][
        "exec"
    ]["command"]
    assert cmd[0] == "kvbridge-healthcheck"
    out = [sys.executable, str(HEALTHCHECK)]
    for arg in cmd[1:]:
        flag, _, value = arg.partition("=")
        if value.startswith("/etc/kvbridge/"):
            value = str(files[Path(value).name])
        elif flag == "--target":
            value = f"127.0.0.1:{port}"
        out.append(f"{flag}={value}")
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, Path], int, health.HealthServicer]]:
    tmp = tmp_path_factory.mktemp("probe")
    files = _chart_credentials(tmp)
    creds = grpc.ssl_server_credentials(
        [(files["tls.key"].read_bytes(), files["tls.crt"].read_bytes())],
        root_certificates=files["ca.crt"].read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(
        ThreadPoolExecutor(max_workers=4),
        interceptors=[_TokenAuth(files["token"].read_text().strip())],
    )
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield files, port, servicer
    finally:
        server.stop(grace=None).wait(5)


def test_probe_serving_over_mtls_with_token(tls_server) -> None:
    files, port, servicer = tls_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proc = _run(_probe_command(files, port))
    assert proc.returncode == 0, proc.stderr
    assert "SERVING" in proc.stdout


def test_probe_not_serving_fails(tls_server) -> None:
    files, port, servicer = tls_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        proc = _run(_probe_command(files, port))
    finally:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert proc.returncode == 1 and "NOT_SERVING" in proc.stderr


def test_probe_wrong_token_fails(tls_server, tmp_path: Path) -> None:
    files, port, _ = tls_server
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    proc = _run(_probe_command({**files, "token": wrong}, port))
    assert proc.returncode == 2 and "UNAUTHENTICATED" in proc.stderr


def _other_ca(tmp: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp / "other-ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_probe_untrusted_server_fails(tls_server, tmp_path: Path) -> None:
    files, port, _ = tls_server
    proc = _run(_probe_command({**files, "ca.crt": _other_ca(tmp_path)}, port))
    assert proc.returncode == 2 and "UNAVAILABLE" in proc.stderr


def test_probe_closed_port_fails_within_its_timeout(tls_server) -> None:
    files, _, _ = tls_server
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    t0 = time.monotonic()
    proc = _run(_probe_command(files, free))
    assert proc.returncode == 2
    assert time.monotonic() - t0 < 3 + 10  # --timeout=3 plus interpreter start


def test_probe_bad_arguments(tls_server, tmp_path: Path) -> None:
    files, port, _ = tls_server
    proc = _run(_probe_command({**files, "tls.key": tmp_path / "missing.key"}, port))
    assert proc.returncode == 64 and "missing.key" in proc.stderr
    proc = _run([sys.executable, str(HEALTHCHECK), "--target=127.0.0.1:1", "--timeout=0"])
    assert proc.returncode == 64 and "--timeout" in proc.stderr


def test_probe_plaintext() -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("kvbridge.v1.KVBridgeService", health_pb2.HealthCheckResponse.SERVING)
        cmd = [sys.executable, str(HEALTHCHECK), f"--target=127.0.0.1:{port}", "--timeout=3"]
        ok = _run([*cmd, "--service=kvbridge.v1.KVBridgeService"])
        assert ok.returncode == 0, ok.stderr
        unknown = _run([*cmd, "--service=no.such.Service"])
        assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr
    finally:
        server.stop(grace=None).wait(5)

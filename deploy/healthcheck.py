#!/usr/bin/env python3
"""gRPC health check of a kvbridge daemon, for Kubernetes exec probes over TLS.

Kubernetes' native ``grpc:`` probe cannot speak TLS, and the daemons serve gRPC with
TLS and a bearer token by default; the chart's exec probe runs this file (installed
in the image as ``kvbridge-healthcheck``). It calls ``grpc.health.v1.Health/Check``
and exits 0 when the answer is SERVING, 1 when it is anything else, 2 on a
connection, TLS, authentication or timeout error, 64 on bad arguments.

    kvbridge-healthcheck --target=127.0.0.1:50051 --tls-ca=ca.crt \
        --tls-cert=tls.crt --tls-key=tls.key --tls-server-name=localhost \
        --auth-token-file=token --timeout=3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_ERROR = 2
EXIT_USAGE = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvbridge-healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="HOST:PORT of the daemon's gRPC server")
    p.add_argument("--service", default="", help='health service name ("" = whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="deadline of the call (s)")
    p.add_argument("--tls-ca", type=Path, help="CA bundle to verify the server (enables TLS)")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")
    p.add_argument("--tls-server-name", default="", help="name expected in the server's cert")
    p.add_argument("--auth-token-file", type=Path, help="file holding the bearer token")
    return p


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from e


def check(args: argparse.Namespace) -> tuple[int, str]:
    """Run one health check; return (exit code, message)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        raise ValueError("--tls-cert needs --tls-ca")
    metadata: tuple[tuple[str, str], ...] = ()
    if args.auth_token_file is not None:
        token = _read(args.auth_token_file, "--auth-token-file").decode().strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file} is empty")
        metadata = (("authorization", f"Bearer {token}"),)
    if args.tls_ca is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(args.tls_ca, "--tls-ca"),
            private_key=_read(args.tls_key, "--tls-key") if args.tls_key else None,
            certificate_chain=_read(args.tls_cert, "--tls-cert") if args.tls_cert else None,
        )
        options = []
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        channel = grpc.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as e:
            return EXIT_ERROR, f"{args.target}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    code = (
        EXIT_SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING
    )
    return code, f"{args.target} service={args.service!r}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code, message = check(args)
    except ValueError as e:
        print(f"kvbridge-healthcheck: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(message, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Authentication of the daemons: gRPC over TLS (mutual with ``--tls-ca``), a bearer
token checked by a server interceptor, and the side-channel HMAC secret.

Rules (docs/architecture.md, "Authentication"):

* ``--insecure`` runs without any of it (trusted loopback, the demo); it cannot be
  combined with an auth flag.
* Otherwise ``--tls-cert``, ``--tls-key``, ``--auth-token-file`` and
  ``--side-secret-file`` are all required; ``--tls-ca`` makes the server demand a
  client certificate signed by that CA (mutual TLS) and is the root a decode daemon
  verifies its prefill daemons with (it dials them with its own certificate and token).
* Every RPC needs ``authorization: Bearer <token>`` (constant-time compare) except
  ``grpc.health.v1.Health``, which Kubernetes probes call; it still needs TLS (and a
  client certificate under mutual TLS) and reveals only SERVING / NOT_SERVING.
* Refused calls answer ``UNAUTHENTICATED`` and are counted and logged (at most one
  log line per second, so a flood cannot fill the disk).
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from kvbridge.connector.serving.daemon.config import ConfigError

MIN_SECRET_BYTES = 16
AUTH_FLAGS = ("tls_cert", "tls_key", "tls_ca", "auth_token_file", "side_secret_file")
REQUIRED_FLAGS = ("tls_cert", "tls_key", "auth_token_file", "side_secret_file")
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


class AuthConfigError(ConfigError):
    """An auth file is missing, unreadable, malformed or too weak (the message names it)."""


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def read_file(path: str | Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None


def read_secret(path: str | Path, flag: str, printable: bool = False) -> bytes:
    """A token or secret file's content without surrounding whitespace (>= 16 bytes);
    ``printable``: only visible ASCII (a bearer token travels in an HTTP/2 header)."""
    value = read_file(path, flag).strip()
    if len(value) < MIN_SECRET_BYTES:
        raise AuthConfigError(
            f"{flag} {path}: {len(value)} bytes; a secret needs at least {MIN_SECRET_BYTES}"
        )
    if printable and any(c < 0x21 or c > 0x7E for c in value):
        raise AuthConfigError(f"{flag} {path}: a bearer token must be printable ASCII")
    return value


def _check_pem(data: bytes, path: str, flag: str, marker: bytes) -> None:
    if marker not in data:
        raise AuthConfigError(f"{flag} {path}: no PEM block with {marker.decode()!r}")


def _check_pair(cert: bytes, key: bytes, cert_path: str, key_path: str) -> None:
    """The key belongs to the certificate (when ``cryptography`` is importable)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:  # optional: gRPC reports a bad pair at the first handshake
        return
    try:
        c = x509.load_pem_x509_certificate(cert)
    except ValueError as exc:
        raise AuthConfigError(f"--tls-cert {cert_path}: not a PEM certificate: {exc}") from None
    try:
        k = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise AuthConfigError(f"--tls-key {key_path}: not an unencrypted PEM key: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if c.public_key().public_bytes(enc, pub) != k.public_key().public_bytes(enc, pub):
        raise AuthConfigError(f"--tls-key {key_path} is not the key of --tls-cert {cert_path}")


@dataclass(frozen=True)
class ClientAuth:
    """How a client dials a daemon: TLS roots, optional client certificate, bearer token.

    No field set: a plaintext channel (``--insecure`` daemons). ``ca=None`` with TLS
    uses the system roots. ``server_name`` overrides the name checked in the
    server's certificate (e.g. dialing ``127.0.0.1`` with a cert for ``localhost``).
    """

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: bytes | None = None
    server_name: str = ""
    tls: bool = False

    @classmethod
    def from_files(
        cls,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        auth_token_file: str | None = None,
        server_name: str = "",
    ) -> ClientAuth:
        if bool(tls_cert) != bool(tls_key):
            raise AuthConfigError("--tls-cert and --tls-key must be given together")
        return cls(
            ca=read_file(tls_ca, "--tls-ca") if tls_ca else None,
            cert=read_file(tls_cert, "--tls-cert") if tls_cert else None,
            key=read_file(tls_key, "--tls-key") if tls_key else None,
            token=read_secret(auth_token_file, "--auth-token-file", printable=True)
            if auth_token_file
            else None,
            server_name=server_name,
            tls=bool(tls_ca or tls_cert or auth_token_file),
        )

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials (TLS plus the token as call credentials), None: plaintext."""
        if not self.tls:
            return None
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        if self.token:
            call = grpc.access_token_call_credentials(self.token.decode())
            creds = grpc.composite_channel_credentials(creds, call)
        return creds

    def channel(self, target: str, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
        opts = list(options or [])
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=opts)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(target, creds, options=opts)


@dataclass(frozen=True)
class ServerAuth:
    """A daemon's credentials, read and checked once at start (``from_config``)."""

    insecure: bool
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    token: bytes | None = None
    side_secret: bytes | None = None

    @classmethod
    def from_config(cls, cfg) -> ServerAuth:
        """Read the auth files of a ``DaemonConfig``; ``AuthConfigError`` names what is wrong."""
        given = [k for k in AUTH_FLAGS if getattr(cfg, k)]
        if cfg.insecure:
            if given:
                raise AuthConfigError(
                    f"--insecure contradicts {', '.join(_flag(k) for k in given)}: "
                    "drop --insecure to authenticate, or the auth flags to run without"
                )
            return cls(insecure=True)
        missing = [k for k in REQUIRED_FLAGS if not getattr(cfg, k)]
        if missing:
            raise AuthConfigError(
                f"authentication is on unless --insecure: missing "
                f"{', '.join(_flag(k) for k in missing)} (or pass --insecure on a trusted network)"
            )
        cert = read_file(cfg.tls_cert, "--tls-cert")
        key = read_file(cfg.tls_key, "--tls-key")
        _check_pem(cert, cfg.tls_cert, "--tls-cert", b"-----BEGIN CERTIFICATE-----")
        _check_pem(key, cfg.tls_key, "--tls-key", b"PRIVATE KEY-----")
        _check_pair(cert, key, cfg.tls_cert, cfg.tls_key)
        ca = None
        if cfg.tls_ca:
            ca = read_file(cfg.tls_ca, "--tls-ca")
            _check_pem(ca, cfg.tls_ca, "--tls-ca", b"-----BEGIN CERTIFICATE-----")
        return cls(
            insecure=False,
            cert=cert,
            key=key,
            ca=ca,
            token=read_secret(cfg.auth_token_file, "--auth-token-file", printable=True),
            side_secret=read_secret(cfg.side_secret_file, "--side-secret-file"),
        )

    @property
    def mutual_tls(self) -> bool:
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.insecure:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca,
            require_client_auth=self.mutual_tls,
        )

    def client(self) -> ClientAuth:
        """How this daemon dials its peers (decode -> prefill): same certificate and token."""
        if self.insecure:
            return ClientAuth()
        return ClientAuth(ca=self.ca, cert=self.cert, key=self.key, token=self.token, tls=True)


class _LogLimiter:
    """At most one log line per ``interval`` seconds; counts what it swallowed."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """The number of suppressed lines before this one, or None to stay quiet."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self.interval
            n, self._suppressed = self._suppressed, 0
            return n


def _refusing_handler(handler: grpc.RpcMethodHandler, refuse: Callable) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that never parses the request and calls ``refuse``."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(lambda it, ctx: refuse(ctx))
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(lambda it, ctx: refuse(ctx))
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(lambda req, ctx: refuse(ctx))
    return grpc.unary_unary_rpc_method_handler(lambda req, ctx: refuse(ctx))


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (``UNAUTHENTICATED``).

    The request of a refused call is never deserialized. ``on_refused(method, peer,
    reason)`` sees every refusal (counters); ``log`` gets a rate-limited warning.
    """

    def __init__(
        self,
        token: bytes,
        log,
        on_refused: Callable[[str, str, str], None] | None = None,
        exempt_prefixes: tuple[str, ...] = UNAUTHENTICATED_PREFIXES,
    ) -> None:
        if len(token) < MIN_SECRET_BYTES:
            raise AuthConfigError(f"bearer token shorter than {MIN_SECRET_BYTES} bytes")
        self._expected = b"Bearer " + token
        self._log = log
        self._on_refused = on_refused
        self._exempt = exempt_prefixes
        self._limiter = _LogLimiter()

    def _check(self, metadata) -> str:
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return "no bearer token"
        if len(values) > 1:
            return "more than one authorization header"
        value = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
        if not hmac.compare_digest(value, self._expected):
            return "wrong bearer token"
        return ""

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        reason = self._check(handler_call_details.invocation_metadata)
        if not reason:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED reveals nothing extra
            return None

        def refuse(context: grpc.ServicerContext):
            peer = context.peer()
            if self._on_refused is not None:
                self._on_refused(method, peer, reason)
            suppressed = self._limiter.take()
            if suppressed is not None:
                self._log.warning(
                    "refused an unauthenticated call",
                    extra={"method": method, "peer": peer, "reason": reason,
                           "suppressed_before": suppressed},
                )  # fmt: skip
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: this daemon requires "
                          "'authorization: Bearer <token>' (--auth-token-file)")  # fmt: skip

        return _refusing_handler(handler, refuse)

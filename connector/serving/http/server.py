"""The HTTP API's server: uvicorn in a thread of the decode daemon, on a socket bound
at start (with the gRPC and metrics servers), TLS with the daemon's certificate."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from kvbridge.connector.serving.daemon.security import _LogLimiter as LogLimiter
from kvbridge.connector.serving.http.app import HttpSettings, build_app
from kvbridge.connector.serving.http.chat import ChatTemplate
from kvbridge.connector.serving.http.upstream import Upstream, loopback_target

EMBEDDED_MODEL_NAME = "kvbridge-embedded"
START_TIMEOUT = 30.0  # seconds the server thread may take to accept connections
STOP_GRACE = 5.0  # seconds open connections get at shutdown


def served_model_name(cfg) -> str:
    """``--served-model-name``, else the basename of ``--model-path``, else the default."""
    if cfg.served_model_name:
        return cfg.served_model_name
    if cfg.model_path:
        return Path(cfg.model_path.rstrip("/")).name or EMBEDDED_MODEL_NAME
    return EMBEDDED_MODEL_NAME


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port`` 0: any free one); ``OSError`` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """uvicorn serving ``app`` on ``sock`` in a daemon thread; ``stop()`` ends it."""

    def __init__(self, app, sock: socket.socket, tls: tuple[str, str] | None = None) -> None:
        import uvicorn

        kw = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="on",
            timeout_graceful_shutdown=STOP_GRACE, **kw,
        )  # fmt: skip
        config.load()  # TLS files and the app, checked before the thread starts
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="kvbridge-http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the HTTP server on port {self.port} did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = STOP_GRACE + 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def start_http(
    cfg, auth, rt, grpc_port: int, sock: socket.socket | None = None
) -> HttpServer | None:
    """The decode daemon's HTTP API (None: prefill role or ``--http-port -1``), on
    ``sock`` (bound at start-up with the other ports) or a socket bound now.

    It dials the daemon's own gRPC port with the daemon's own client credentials;
    refused tokens count in the daemon's ``auth_failures``.
    """
    if cfg.role != "decode" or cfg.http_port < 0:
        return None
    template = ChatTemplate.from_checkpoint(cfg.model_path)
    limiter = LogLimiter()

    def refused(path: str, reason: str) -> None:
        rt.count_event("auth_failures")
        suppressed = limiter.take()
        if suppressed is not None:
            rt.log.warning("refused an unauthenticated HTTP request",
                           extra={"path": path, "reason": reason,
                                  "suppressed_before": suppressed})  # fmt: skip

    settings = HttpSettings(
        model_name=served_model_name(cfg),
        upstream=Upstream(loopback_target(cfg.host, grpc_port), auth.client()),
        template=template,
        token=None if auth.insecure else auth.token,
        draining=rt.draining.is_set,
        on_refused=refused,
        max_model_len=cfg.num_blocks * cfg.block_size,
        created=int(time.time()),
        registry=rt.metrics.registry,
    )
    sock = sock if sock is not None else bind(cfg.host, cfg.http_port)
    tls = None if auth.insecure else (cfg.tls_cert, cfg.tls_key)
    try:
        return HttpServer(build_app(settings), sock, tls)
    except BaseException:
        sock.close()
        raise

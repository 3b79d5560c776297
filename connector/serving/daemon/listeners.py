"""Bind every listening port of a daemon before anything expensive is built.

``bind_ports`` binds the ports of ``config.PORT_FLAGS`` in order (a binder per
flag in ``BINDERS``; a new port is one more flag and one more binder). A port
that cannot be bound raises ``PortError`` (a ``ConfigError``: one line, exit 2)
naming the flag, the address and the reason, after closing what was bound.

* gRPC: the server's port is added (bound) now; services are added and the
  server started once the daemon is built.
* side channel: a placeholder socket holds the port until the transfer engine's
  zmq socket takes it over (``take_side_port``, right before the agent starts).
* metrics: ``/metrics`` serves the daemon's registry at once (process metrics
  during start-up; the daemon's own metrics once built).
* HTTP (decode, unless ``--http-port -1``): a listening socket the HTTP API's
  server takes once the daemon is built.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from kvbridge.connector.serving.daemon.config import PORT_FLAGS, ConfigError, DaemonConfig


class PortError(ConfigError):
    """A listening port could not be bound (the message names the flag and the port)."""


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound, or None when a trial bind works (gRPC binds
    with ``SO_REUSEADDR`` too; its own failure is a log line on stderr, not a reason)."""
    try:
        info = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM)
        with socket.socket(info[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(info[0][4])
            s.listen(1)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@dataclass
class BindContext:
    """What the binders need: the config, the gRPC server and its credentials, the registry."""

    cfg: DaemonConfig
    grpc_server: grpc.Server
    grpc_credentials: grpc.ServerCredentials | None
    registry: Any  # prometheus_client CollectorRegistry


@dataclass
class Listeners:
    """The bound ports (``ports[flag]``) and what holds them."""

    ports: dict[str, int] = field(default_factory=dict)
    closers: dict[str, Callable[[], None]] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)

    def take_side_port(self) -> int:
        """Release the side-channel placeholder for the engine's socket; the port."""
        hold = self.handles.pop("side-port", None)
        if hold is not None:
            hold.close()
            self.closers.pop("side-port", None)
        return self.ports["side-port"]

    def close(self) -> None:
        for name in reversed(list(self.closers)):
            try:
                self.closers.pop(name)()
            except Exception:  # closing the rest matters more
                continue


def _bind_grpc(ctx: BindContext, lst: Listeners) -> None:
    cfg = ctx.cfg
    address = hostport(cfg.host, cfg.grpc_port)
    why = _why(cfg.host, cfg.grpc_port) if cfg.grpc_port else None
    port = 0
    if why is None:
        try:
            if ctx.grpc_credentials is None:
                port = ctx.grpc_server.add_insecure_port(address)
            else:
                port = ctx.grpc_server.add_secure_port(address, ctx.grpc_credentials)
        except RuntimeError:  # grpc raises RuntimeError("Failed to bind ...")
            port = 0
    if port == 0:
        why = why or _why(cfg.host, cfg.grpc_port) or "refused by gRPC"
        raise PortError(f"--grpc-port {cfg.grpc_port}: cannot bind {address}: {why}")
    lst.ports["grpc-port"] = port
    lst.closers["grpc-port"] = lambda: ctx.grpc_server.stop(None)


def _bind_side(ctx: BindContext, lst: Listeners) -> None:
    cfg = ctx.cfg
    host = "0.0.0.0" if cfg.host in ("", "*") else cfg.host  # as zmq binds "*"
    try:
        info = socket.getaddrinfo(host, cfg.side_port, type=socket.SOCK_STREAM)
        sock = socket.socket(info[0][0], socket.SOCK_STREAM)
        try:
            sock.bind(info[0][4])  # no SO_REUSEADDR: the engine's zmq bind must wait for us
            sock.listen(1)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise PortError(
            f"--side-port {cfg.side_port}: cannot bind {hostport(cfg.host, cfg.side_port)}: "
            f"{exc.strerror or exc}"
        ) from None
    lst.ports["side-port"] = sock.getsockname()[1]
    lst.handles["side-port"] = sock
    lst.closers["side-port"] = sock.close


def _bind_metrics(ctx: BindContext, lst: Listeners) -> None:
    from kvbridge.connector.serving.daemon.metrics import serve_metrics

    cfg = ctx.cfg
    try:
        server, port = serve_metrics(ctx.registry, cfg.host, cfg.metrics_port)
    except OSError as exc:
        reason = exc.strerror or os.strerror(exc.errno or errno.EADDRINUSE)
        raise PortError(
            f"--metrics-port {cfg.metrics_port}: cannot bind "
            f"{hostport(cfg.host, cfg.metrics_port)}: {reason}"
        ) from None

    def stop() -> None:
        server.shutdown()
        server.server_close()

    lst.ports["metrics-port"] = port
    lst.handles["metrics-port"] = server
    lst.closers["metrics-port"] = stop


def _bind_http(ctx: BindContext, lst: Listeners) -> None:
    cfg = ctx.cfg
    if cfg.role != "decode" or cfg.http_port < 0:
        return  # no HTTP API: its ASGI stack is not even imported
    from kvbridge.connector.serving.http.server import bind

    try:
        sock = bind(cfg.host, cfg.http_port)
    except OSError as exc:
        raise PortError(f"--http-port {cfg.http_port}: {exc}") from None
    lst.ports["http-port"] = sock.getsockname()[1]
    lst.handles["http-port"] = sock
    lst.closers["http-port"] = sock.close


#: one binder per flag of ``PORT_FLAGS`` (same order)
BINDERS: dict[str, Callable[[BindContext, Listeners], None]] = {
    "grpc-port": _bind_grpc,
    "side-port": _bind_side,
    "metrics-port": _bind_metrics,
    "http-port": _bind_http,
}


def bind_ports(ctx: BindContext, flags: tuple[str, ...] = PORT_FLAGS) -> Listeners:
    """Bind every port of ``flags``; on the first failure close the others and raise."""
    lst = Listeners()
    try:
        for name in flags:
            BINDERS[name](ctx, lst)
    except BaseException:
        lst.close()
        raise
    return lst

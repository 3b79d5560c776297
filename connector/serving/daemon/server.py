"""Run a daemon: gRPC (service + health + reflection), side channel, metrics, SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kvbridge.connector.serving.daemon.common import (
    SERVICE_NAME,
    DrainInterceptor,
    RequestDecodeInterceptor,
)
from kvbridge.connector.serving.daemon.config import DaemonConfig
from kvbridge.connector.serving.daemon.logs import setup_logging
from kvbridge.connector.serving.daemon.metrics import serve_metrics
from kvbridge.connector.serving.daemon.runtime import DaemonRuntime
from kvbridge.connector.serving.daemon.security import ServerAuth, TokenAuthInterceptor
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

GRPC_WORKERS = 32


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_ready(path: str, info: dict) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


class Daemon:
    """A started daemon; ``stop()`` drains and shuts it down (idempotent)."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.auth = auth = ServerAuth.from_config(cfg)  # before anything starts
        from kvbridge.connector.serving.daemon.transfer import TransferEndpoint

        self.cfg = cfg
        self.rt = rt = DaemonRuntime(cfg)
        self.endpoint = TransferEndpoint(rt, secret=auth.side_secret)
        rt.compat_hash = self.endpoint.compat_hash
        self.pool = None
        if cfg.role == "prefill":
            from kvbridge.connector.serving.daemon.prefill import PrefillServicer

            self.servicer = PrefillServicer(rt, self.endpoint.side_address)
            self.servicer.endpoint = self.endpoint
            self.endpoint.on_peer_done(self.servicer.on_peer_notification)
            self.servicer.leases.start_reaper()
        else:
            from kvbridge.connector.serving.daemon.decode import DecodeServicer
            from kvbridge.connector.serving.daemon.prefill_pool import PrefillPool

            self.pool = PrefillPool(cfg.prefill, cfg.prefill_policy, client=auth.client())
            self.servicer = DecodeServicer(rt, self.endpoint, self.pool)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="kvbridge-grpc"),
            interceptors=self._interceptors(),
            options=[("grpc.so_reuseport", 0)],  # a second daemon on the port must fail
        )
        pb_grpc.add_KVBridgeServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = _hostport(cfg.host, cfg.grpc_port)
        creds = auth.server_credentials()
        try:
            if creds is None:
                self.grpc_port = self.server.add_insecure_port(address)
            else:
                self.grpc_port = self.server.add_secure_port(address, creds)
        except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind ...")
            self.endpoint.close()
            raise OSError(f"cannot bind the gRPC port {address}: {exc}") from None
        if self.grpc_port == 0:
            self.endpoint.close()
            raise OSError(f"cannot bind the gRPC port {address}")
        self.server.start()
        self.metrics_server, self.metrics_port = serve_metrics(
            rt.metrics, cfg.host, cfg.metrics_port
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._stopped = threading.Event()
        self.info = {
            "role": cfg.role,
            "engine_name": rt.name,
            "pid": os.getpid(),
            "grpc_port": self.grpc_port,
            "side_port": self.endpoint.side_port,
            "metrics_port": self.metrics_port,
            "backend": cfg.backend,
            "kv_layout": cfg.kv_layout,
            "auth": "insecure" if auth.insecure else ("mtls" if auth.mutual_tls else "tls"),
        }
        if cfg.ready_file:
            _write_ready(cfg.ready_file, self.info)
        rt.log.info("serving", extra=self.info)

    def _interceptors(self) -> list[grpc.ServerInterceptor]:
        """Token check first (refused calls are never parsed), then drain, then decoding."""
        rt, out = self.rt, []
        if not self.auth.insecure:

            def refused(method: str, peer: str, reason: str) -> None:
                rt.count_event("auth_failures")

            out.append(TokenAuthInterceptor(self.auth.token, rt.log, refused))
        return [*out, DrainInterceptor(rt.draining.is_set), RequestDecodeInterceptor()]

    def _stop_metrics(self) -> None:
        self.metrics_server.shutdown()
        self.metrics_server.server_close()

    def stop(self, drain_timeout: float | None = None) -> bool:
        """Refuse new requests, wait for in-flight ones, shut down; True if drained in time."""
        if self._stopped.is_set():
            return True
        rt = self.rt
        timeout = self.cfg.drain_timeout if drain_timeout is None else drain_timeout
        rt.draining.set()
        self.health.enter_graceful_shutdown()
        rt.log.info("draining", extra={"in_flight": rt.registry.num_live, "timeout": timeout})
        t0 = time.monotonic()
        drained = self.servicer.drain(timeout)
        left = max(0.0, timeout - (time.monotonic() - t0))
        if not rt.quarantine.wait_empty(left):
            rt.log.warning(
                "quarantined blocks still held", extra={"blocks": rt.quarantine.num_blocks}
            )
        rt.quarantine.stop()
        if not drained:
            rt.log.warning("drain timed out", extra={"in_flight": rt.registry.num_live})
        steps = [("grpc server", lambda: self.server.stop(grace=2.0).wait(5.0))]
        if self.cfg.role == "prefill":
            steps.append(("lease reaper", self.servicer.leases.stop_reaper))
        steps.append(("metrics server", self._stop_metrics))
        if self.pool is not None:
            steps.append(("prefill channels", self.pool.close))
        steps.append(("transfer agent", self.endpoint.close))
        for what, step in steps:
            try:
                step()
            except Exception:  # keep shutting the rest down
                rt.log.exception("stopping the %s failed", what)
        self._stopped.set()
        rt.log.info(
            "stopped", extra={"drained": drained, "seconds": round(time.monotonic() - t0, 3)}
        )
        return drained


def run_daemon(cfg: DaemonConfig, stop_event: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop_event``), drain, and return the exit code (0)."""
    setup_logging(cfg.log_level, role=cfg.role, engine=cfg.name)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    daemon = Daemon(cfg)
    while not stop.wait(0.5):
        pass
    daemon.stop()
    return 0

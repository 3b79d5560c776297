"""Run a daemon: gRPC (service + health + reflection), side channel, metrics, SIGTERM drain."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kvbridge.connector.serving.daemon.admission import AdmissionInterceptor, worker_count
from kvbridge.connector.serving.daemon.cert_reload import ReloadingCredentials
from kvbridge.connector.serving.daemon.common import (
    SERVICE_NAME,
    DrainInterceptor,
    RequestDecodeInterceptor,
)
from kvbridge.connector.serving.daemon.config import DaemonConfig, check_startup
from kvbridge.connector.serving.daemon.health import HealthState
from kvbridge.connector.serving.daemon.listeners import BindContext, bind_ports
from kvbridge.connector.serving.daemon.logs import setup_engine_logging, setup_logging
from kvbridge.connector.serving.daemon.metrics import DaemonMetrics
from kvbridge.connector.serving.daemon.runtime import DaemonRuntime
from kvbridge.connector.serving.daemon.security import ServerAuth, TokenAuthInterceptor
from kvbridge.connector.serving.engine.process import EngineProcess
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

SWITCH_INTERVAL_SECONDS = 0.0005


def _write_ready(path: str, info: dict) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


class Daemon:
    """A started daemon; ``stop()`` drains and shuts it down (idempotent).

    Start-up order: check the configuration and read the credentials, bind every port
    (listeners.py), then build the model, cache and engine, then serve. Anything wrong
    before the build is a ``ConfigError`` (one line, exit 2).
    """

    def __init__(self, cfg: DaemonConfig) -> None:
        check_startup(cfg)
        self.auth = auth = ServerAuth.from_config(cfg)  # reads and checks every auth file
        self.cfg = cfg
        self.rt: DaemonRuntime | None = None
        self.http = None  # the decode daemon's HTTP API, started once built
        metrics = DaemonMetrics.create(cfg.role)
        # at most --max-requests long calls; the workers beyond them serve health,
        # Stats and Release however many streams are open
        self.admission = AdmissionInterceptor(
            cfg.max_requests, logging.getLogger(f"kvbridge.{cfg.role}")
        )
        self.server = grpc.server(
            ThreadPoolExecutor(
                max_workers=worker_count(cfg.max_requests), thread_name_prefix="kvbridge-grpc"
            ),
            interceptors=self._interceptors(),
            options=[("grpc.so_reuseport", 0)],  # a second daemon on the port must fail
        )
        creds = None
        if not auth.insecure:  # the certificate files are re-read when they change
            self.tls = ReloadingCredentials(cfg, auth, logging.getLogger(f"kvbridge.{cfg.role}"))
            creds = self.tls.credentials
        self.listeners = bind_ports(BindContext(cfg, self.server, creds, metrics.registry))
        self.grpc_port = self.listeners.ports["grpc-port"]
        self.metrics_port = self.listeners.ports["metrics-port"]
        self.pool = None
        try:
            self._build(replace(cfg, side_port=self.listeners.ports["side-port"]), metrics)
        except BaseException:
            self.listeners.close()
            raise
        self._stopped = threading.Event()
        rt = self.rt
        self.info = {
            "role": cfg.role,
            "engine_name": rt.name,
            "pid": os.getpid(),
            "grpc_port": self.grpc_port,
            "side_port": self.endpoint.side_port,
            "metrics_port": self.metrics_port,
            "http_port": self.http.port if self.http is not None else None,
            "backend": cfg.backend,
            "kv_layout": cfg.kv_layout,
            "auth": "insecure" if auth.insecure else ("mtls" if auth.mutual_tls else "tls"),
        }
        if cfg.ready_file:
            _write_ready(cfg.ready_file, self.info)
        rt.log.info("serving", extra={**self.info, "ready": self.health_state.ready})

    def _build(self, cfg: DaemonConfig, metrics: DaemonMetrics) -> None:
        """Model, cache, engine and servicer; then start serving on the bound ports."""
        from kvbridge.connector.serving.daemon.transfer import TransferEndpoint

        auth = self.auth
        self.rt = rt = DaemonRuntime(cfg, metrics=metrics)
        self.listeners.take_side_port()  # the engine's side channel binds it now
        self.endpoint = TransferEndpoint(rt, secret=auth.side_secret)
        rt.compat_hash = self.endpoint.compat_hash
        if cfg.role == "prefill":
            from kvbridge.connector.serving.daemon.prefill import PrefillServicer

            self.servicer = PrefillServicer(
                rt, self.endpoint.side_address, self.endpoint.agent.instance_id
            )
            self.servicer.endpoint = self.endpoint  # pushes (push.py)
            self.endpoint.on_peer_done(self.servicer.on_peer_notification)
            self.servicer.leases.start_reaper()
        else:
            from kvbridge.connector.serving.daemon.decode import DecodeServicer
            from kvbridge.connector.serving.daemon.prefill_pool import PrefillPool

            tls = getattr(self, "tls", None)
            self.pool = PrefillPool(
                cfg.prefill,
                cfg.prefill_policy,
                client=auth.client(),
                on_ready=self._prefill_ready,
                client_source=tls.client_source if tls is not None else None,
            )
            metrics.prefill_peers_ready.set_function(self.pool.num_ready)
            self.servicer = DecodeServicer(rt, self.endpoint, self.pool)
        pb_grpc.add_KVBridgeServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        self.health_state = HealthState(self.health)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        engine = getattr(self.servicer, "engine", None)
        if isinstance(engine, EngineProcess):  # a dead engine process fails liveness
            engine.on_dead = self.health_state.fail
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.server.start()
        sock = self.listeners.handles.pop("http-port", None)  # bound with the others
        if sock is not None:  # a decode daemon without --http-port -1
            from kvbridge.connector.serving.http.server import start_http

            self.http = start_http(cfg, auth, rt, self.grpc_port, sock=sock)
        if self.pool is None:
            self.health_state.set_ready(True)
        else:  # ready once a prefill daemon answers SERVING (checked now, then every second)
            self.pool.start()

    def _prefill_ready(self, ready: bool) -> None:
        """The pool found some prefill daemon ready (or none): the decode daemon's readiness."""
        state = getattr(self, "health_state", None)
        if state is not None:
            state.set_ready(ready)
        if self.rt is not None:
            self.rt.log.log(
                logging.INFO if ready else logging.WARNING,
                "prefill daemons reachable" if ready else "no prefill daemon reachable",
                extra={"prefill": self.cfg.prefill},
            )

    def _interceptors(self) -> list[grpc.ServerInterceptor]:
        """Token check first (refused calls are never parsed), then drain, admission (the
        long calls' limit), then decoding."""
        out: list[grpc.ServerInterceptor] = []
        log = logging.getLogger(f"kvbridge.{self.cfg.role}")
        if not self.auth.insecure:

            def refused(method: str, peer: str, reason: str) -> None:
                self.rt.count_event("auth_failures")  # built before the server starts

            out.append(TokenAuthInterceptor(self.auth.token, log, refused))
        draining = DrainInterceptor(lambda: self.rt.draining.is_set())
        return [*out, draining, self.admission, RequestDecodeInterceptor()]

    def _stop_metrics(self) -> None:
        self.listeners.close()  # the gRPC server is stopped already; metrics is what is left

    def stop(self, drain_timeout: float | None = None) -> bool:
        """Refuse new requests, wait for in-flight ones, shut down; True if drained in time."""
        if self._stopped.is_set():
            return True
        rt = self.rt
        timeout = self.cfg.drain_timeout if drain_timeout is None else drain_timeout
        rt.draining.set()
        self.health_state.drain()  # readiness NOT_SERVING, liveness stays SERVING
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
        # what is left of the drain timeout: calls still running then are cancelled
        grace = max(0.0, timeout - (time.monotonic() - t0))
        steps = [] if self.http is None else [("http server", self.http.stop)]
        steps.append(("grpc server", lambda: self.server.stop(grace=grace).wait(grace + 1.0)))
        if self.cfg.role == "prefill":
            steps.append(("lease reaper", self.servicer.leases.stop_reaper))
        steps.append(("metrics server", self._stop_metrics))
        if self.pool is not None:
            steps.append(("background releases", self.servicer.calls.close))
            steps.append(("prefill channels", self.pool.close))
        if hasattr(self.servicer, "close"):
            steps.append(("engine", self.servicer.close))
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
    setup_engine_logging(cfg.engine_log_level)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    # the engine threads hold the GIL through whole model steps; servicer threads
    # (admission, RPCs, pulls, streaming) must get it within 0.5 ms, not 5 ms
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    daemon = Daemon(cfg)
    while not stop.wait(0.1):
        pass
    daemon.stop()
    return 0

"""The daemon's ``grpc.health.v1`` names: readiness, liveness, and who sets them.

* readiness: ``""`` and ``kvbridge.v1.KVBridgeService``. SERVING while the daemon
  takes work: not while draining, and on a decode daemon not while no prefill daemon
  answers its health check.
* liveness: ``kvbridge.liveness``. SERVING as long as the gRPC server runs, also while
  draining, so a liveness probe never kills a drain; NOT_SERVING once the decode
  engine process died (``fail``).
"""

from __future__ import annotations

import threading

from grpc_health.v1 import health, health_pb2
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVBridgeService"].full_name
LIVENESS_SERVICE = "kvbridge.liveness"
READINESS_SERVICES = ("", SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthState:
    """Sets the health servicer's statuses from ``ready`` and ``draining``."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self.servicer = servicer
        self._lock = threading.Lock()
        self._ready = False
        self._draining = False
        servicer.set(LIVENESS_SERVICE, _SERVING)
        self._apply()

    def _apply(self) -> None:
        status = _SERVING if self._ready and not self._draining else _NOT_SERVING
        for name in READINESS_SERVICES:
            self.servicer.set(name, status)

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._ready = ready
            self._apply()

    def drain(self) -> None:
        """Readiness NOT_SERVING for good; liveness stays SERVING."""
        with self._lock:
            self._draining = True
            self._apply()

    def fail(self, reason: str = "") -> None:
        """A part the daemon cannot serve without died (the engine process): readiness
        and liveness NOT_SERVING, so the orchestrator restarts the daemon."""
        with self._lock:
            self._draining = True
            self._apply()
            self.servicer.set(LIVENESS_SERVICE, _NOT_SERVING)

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready and not self._draining

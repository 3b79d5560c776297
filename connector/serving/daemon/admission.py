"""Admission: a bound on long calls so they never starve the control plane.

The gRPC server runs ``max_requests + CONTROL_WORKERS`` worker threads. A
``Generate`` stream (decode) or a ``Prefill`` call (prefill) holds a worker for its
whole life; ``AdmissionInterceptor`` lets at most ``max_requests`` of them run at
once and answers ``RESOURCE_EXHAUSTED`` past that, so at least ``CONTROL_WORKERS``
threads are always left for health checks, ``Stats`` and ``Release`` (the Helm
chart's exec probe gives up after 3 s, and a peer's ``Release`` frees leased blocks).

Also here: ``RateLimitedLog`` (warnings of one kind at most every few seconds).
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
from kvbridge.connector.serving.daemon.common import SERVICE_NAME

CONTROL_WORKERS = 16  # workers long calls can never take
LIMITED_METHODS = frozenset({f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/Prefill"})


def worker_count(max_requests: int) -> int:
    """gRPC worker threads for a daemon admitting ``max_requests`` long calls."""
    return max_requests + CONTROL_WORKERS


class AdmissionInterceptor(grpc.ServerInterceptor):
    """At most ``limit`` Generate/Prefill calls at once; ``RESOURCE_EXHAUSTED`` beyond."""

    def __init__(self, limit: int, log: logging.Logger | None = None) -> None:
        self.limit = limit
        self.log = RateLimitedLog(log or logging.getLogger(__name__))
        self._lock = threading.Lock()
        self.active = 0
        self.refused = 0

    def _enter(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                self.refused += 1
                return False
            self.active += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def _refuse(self, context: grpc.ServicerContext, method: str) -> None:
        self.log.warning(
            "admission", "call refused: too many in flight",
            extra={"method": method, "limit": self.limit},
        )  # fmt: skip
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{method.rsplit('/', 1)[-1]}: {self.limit} calls in flight (--max-requests); "
            "retry later",
        )

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in LIMITED_METHODS or handler.request_streaming:
            return handler
        if handler.response_streaming:
            stream = handler.unary_stream

            def streaming(request, context):
                if not self._enter():
                    self._refuse(context, method)
                try:
                    yield from stream(request, context)
                finally:
                    self._leave()

            return grpc.unary_stream_rpc_method_handler(
                streaming,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        unary = handler.unary_unary

        def call(request, context):
            if not self._enter():
                self._refuse(context, method)
            try:
                return unary(request, context)
            finally:
                self._leave()

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class RateLimitedLog:
    """Logs a warning of one ``key`` at most once per ``every`` seconds; the next one
    says how many were suppressed in between."""

    def __init__(self, log: logging.Logger, every: float = 5.0) -> None:
        self.log, self.every = log, every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, extra: dict | None = None) -> bool:
        """Log ``msg`` unless ``key`` was logged less than ``every`` s ago; True if logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e9) < self.every:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        self.log.warning(msg, extra={**(extra or {}), "suppressed": suppressed})
        return True

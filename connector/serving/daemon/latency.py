"""Per-request latency histograms of the decode daemon (what a vLLM user looks for).

Observed for every ``Generate``, whichever front (gRPC or the HTTP API) sent it,
in the daemon's own registry, labelled by ``role``:

=====================================================  ===========================================
``kvbridge_time_to_first_token_seconds``                Generate arrival to its first token
``kvbridge_inter_token_latency_seconds``                between successive tokens of a stream
``kvbridge_e2e_request_latency_seconds``                Generate arrival to its end (any outcome)
``kvbridge_request_queue_time_seconds``                 arrival until its local blocks are allocated
``kvbridge_request_prefill_time_seconds``               the prefill daemon's compute (TransferInfo)
``kvbridge_request_kv_transfer_time_seconds``           the KV pull of the request (all attempts)
``kvbridge_request_handshake_time_seconds``             side-channel handshake (0: peer known)
``kvbridge_request_finished_total{finish_reason}``      ``stop``, ``length``, ``abort``, ``error``
=====================================================  ===========================================
"""

from __future__ import annotations

import time

import grpc
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from prometheus_client import CollectorRegistry, Counter, Histogram

# 1 ms .. 60 s: token gaps of a loaded CPU model up to long prompts' first tokens
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class LatencyMetrics:
    """The histograms, registered once into a daemon's ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        def hist(name: str, doc: str) -> Histogram:
            h = Histogram(name, doc, ("role",), buckets=LATENCY_BUCKETS, registry=registry)
            return h.labels(role=role)

        self.ttft = hist("kvbridge_time_to_first_token_seconds", "time to first token")
        self.itl = hist("kvbridge_inter_token_latency_seconds", "time between output tokens")
        self.e2e = hist("kvbridge_e2e_request_latency_seconds", "end-to-end request latency")
        self.queue = hist(
            "kvbridge_request_queue_time_seconds", "arrival until the request's blocks are held"
        )
        self.prefill = hist(
            "kvbridge_request_prefill_time_seconds", "prefill compute on the prefill daemon"
        )
        self.prefill_call = hist(
            "kvbridge_request_prefill_call_seconds",
            "the Prefill call's wall time seen by the decode daemon (compute, queueing, RPC)",
        )
        self.transfer = hist(
            "kvbridge_request_kv_transfer_time_seconds", "KV pull of a request (all attempts)"
        )
        self.handshake = hist(
            "kvbridge_request_handshake_time_seconds", "side-channel handshake of a request"
        )
        finished = Counter(
            "kvbridge_request_finished",
            "finished Generate requests by finish reason",
            ("role", "finish_reason"),
            registry=registry,
        )
        self.finished = {r: finished.labels(role=role, finish_reason=r) for r in FINISH_REASONS}

    def start(self) -> RequestTimer:
        """A timer for one request, started now (its arrival)."""
        return RequestTimer(self)


class RequestTimer:
    """One request's clock: ``admitted``, ``observe`` each streamed message, ``finish``."""

    def __init__(self, metrics: LatencyMetrics) -> None:
        self.m = metrics
        self.t0 = self.last = time.monotonic()
        self.tokens = 0
        self.reason = ""  # finish reason seen on the stream, or set by ``fail``
        self._done = False

    def admitted(self) -> None:
        """The request holds its blocks: its queue time ends."""
        self.m.queue.observe(time.monotonic() - self.t0)

    def observe(self, msg) -> None:
        """A ``GenerateResponse`` about to be sent: first token, token gaps, finish reason."""
        now = time.monotonic()
        n = len(msg.token_ids)
        if msg.HasField("transfer"):
            t = msg.transfer
            self.m.prefill.observe(t.prefill_seconds)
            self.m.transfer.observe(t.transfer_seconds)
            self.m.handshake.observe(t.handshake_seconds)
        if n:
            if self.tokens == 0:
                self.m.ttft.observe(now - self.t0)
                n_gaps, gap = n - 1, 0.0
            else:
                n_gaps, gap = n, (now - self.last) / n
            for _ in range(n_gaps):
                self.m.itl.observe(gap)
            self.tokens += n
            self.last = now
        if msg.finish_reason:
            self.reason = _FINISH.get(int(msg.finish_reason), "stop")

    def fail(self, code: grpc.StatusCode | None = None) -> None:
        """The request failed (``CANCELLED``, or no code for a client gone: ``abort``)."""
        self.reason = "abort" if code in (None, grpc.StatusCode.CANCELLED) else "error"

    def finish(self) -> None:
        """The request ended (idempotent); no reason seen counts as ``error``."""
        if self._done:
            return
        self._done = True
        self.m.e2e.observe(time.monotonic() - self.t0)
        self.m.finished[self.reason or "error"].inc()


TIMELINE = ("admitted", "prefilled", "pulled", "verified")  # the marks, in order


def log_timeline(log, rec) -> None:
    """Log (info) where a request's time to first token went: seconds from its arrival
    to each of ``rec.marks`` in turn (queue, Prefill call, pull, checksum), then to now."""
    last, out = rec.created, {}
    for name in TIMELINE:
        t = rec.marks.get(name)
        if t is not None:
            out[f"to_{name}_s"] = round(t - last, 6)
            last = t
    out["to_first_token_s"] = round(time.monotonic() - last, 6)
    log.info("first token", extra={"request_id": rec.request_id, **out})

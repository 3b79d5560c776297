"""Prometheus metrics of the engine loop (registered in the daemon's registry)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5)


def step_recorder(registry: CollectorRegistry, role: str) -> Callable[[int, float], None]:
    """``on_step(batch, seconds)`` for ``DecodeEngine``: ``kvbridge_decode_step_seconds``
    (histogram) and ``kvbridge_decode_step_rows_total`` (sequences, summed over steps;
    divided by the histogram's count: the mean batch)."""
    seconds = Histogram(
        "kvbridge_decode_step_seconds", "seconds per batched decode step", ("role",),
        buckets=STEP_BUCKETS, registry=registry,
    ).labels(role=role)  # fmt: skip
    rows = Counter(
        "kvbridge_decode_step_rows", "sequences decoded, summed over steps", ("role",),
        registry=registry,
    ).labels(role=role)  # fmt: skip

    def on_step(n: int, s: float) -> None:
        seconds.observe(s)
        rows.inc(n)

    return on_step

"""The /metrics exposition: promtool's checks, per-role sets, zero series, units, and the
Stats counters read from the same metrics."""

from __future__ import annotations

import pytest
from kvbridge.connector.serving.daemon.metrics import DaemonMetrics
from metrics_lint import lint, openmetrics_units
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

ROLE_ONLY = {
    "prefill": {"kvbridge_lease_expiries", "kvbridge_leases_released", "kvbridge_blocks_leased"},
    "decode": {
        "kvbridge_transfer_bytes", "kvbridge_transfer_seconds", "kvbridge_transfer_descriptors",
        "kvbridge_transfer_failures", "kvbridge_transfer_retries", "kvbridge_corrupt_transfers",
        "kvbridge_tokens_generated", "kvbridge_prefill_peers_ready",
    },
}  # fmt: skip


def _families(m: DaemonMetrics) -> dict:
    text = generate_latest(m.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_exposition_is_clean_and_per_role(role):
    m = DaemonMetrics.create(role)
    text = generate_latest(m.registry).decode()
    assert lint(text) == []
    fams = _families(m)
    other = "decode" if role == "prefill" else "prefill"
    assert ROLE_ONLY[role] <= set(fams) and not ROLE_ONLY[other] & set(fams)
    # process and platform collectors
    assert {"process_resident_memory_bytes", "process_cpu_seconds", "python_info"} <= set(fams)
    assert fams["process_resident_memory_bytes"].samples[0].value > 0
    # requests_total{state} exists at zero before the first request
    states = {s.labels["state"]: s.value for s in fams["kvbridge_requests"].samples}
    assert states == {"done": 0.0, "failed": 0.0}
    assert "_created" not in text


def test_units_in_openmetrics_metadata():
    units = openmetrics_units(
        generate_openmetrics(DaemonMetrics.create("decode").registry).decode()
    )
    assert units["kvbridge_transfer_bytes"] == "bytes"
    assert units["kvbridge_transfer_seconds"] == "seconds"


def test_the_lint_finds_what_promtool_finds():
    bad = (
        "# HELP x_total a\n# TYPE x_total counter\nx_total 1\nx_created 2\n"
        "# TYPE y_milliseconds gauge\ny_milliseconds 3\n"
    )
    problems = " | ".join(lint(bad))
    assert "_created series" in problems and "no HELP" in problems and "base units" in problems


def test_stats_counters_are_the_prometheus_counters():
    m = DaemonMetrics.create("decode")
    m.count_transfer(4096, 3, 0.25)
    m.count_transfer(1024, 1, 0.5)
    m.transfer_retries.inc()
    m.finished("decode", "done")
    m.finished("decode", "failed")
    m.finished("decode", "done")
    c = m.stats_counters()
    assert (c["transfers"], c["bytes_transferred"], c["descriptors"]) == (2, 5120, 4)
    assert c["transfer_seconds"] == pytest.approx(0.75)
    assert (c["transfer_retries"], c["requests_done"], c["requests_failed"]) == (1, 2, 1)
    fams = _families(m)
    assert fams["kvbridge_transfer_bytes"].samples[0].value == c["bytes_transferred"]
    assert {s.name: s.value for s in fams["kvbridge_transfer_seconds"].samples}[
        "kvbridge_transfer_seconds_count"
    ] == c["transfers"]

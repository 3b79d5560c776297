"""The path probe at handshake: both directions measured and reported per peer, and a
degraded direction (test hook: reads failing or throttled) turns requests around."""

from __future__ import annotations

import pytest
from engines import BACKENDS
from xfer_harness import CacheCfg, link, prepare, push

PROBE = 1 << 20


def _report(a, b, a_cfg, b_cfg, a_opts=None):
    a_name, _ = prepare(a, "A", a_cfg, **(a_opts or {}))
    b_name, b_addr = prepare(b, "B", b_cfg)
    link(a, a_name, b_name, b_addr)
    return a_name, b_name, a.call("paths", a_name, b_name)


def test_probe_measures_both_directions(procs, backend):
    a, b = procs
    _, b_name, r = _report(a, b, CacheCfg("nhd", 1), CacheCfg("nhd", 2))
    assert r is not None and r["peer"] == b_name and r["engine"] == backend
    assert r["nbytes"] == PROBE and r["transport"]
    assert r["read_error"] == "" and r["write_error"] == ""
    assert r["read_bps"] > 0 and r["write_bps"] > 0
    assert r["direction"] in ("READ", "WRITE") and r["expected_bps"] >= r["read_bps"]


def test_failed_reads_turn_requests_into_pushes(procs, backend):
    """Reads fail to post on A: the probe says so, prefers WRITE, and pushes still work."""
    a, b = procs
    a_cfg, b_cfg = CacheCfg("packed", 3), CacheCfg("packed", 4, poison=5)
    opts = {"degrade": {"READ": 0}}
    _, _, r = _report(a, b, a_cfg, b_cfg, opts)
    assert "disabled by a test hook" in r["read_error"] and r["write_error"] == ""
    assert r["read_bps"] == 0 and r["write_bps"] > 0
    assert r["direction"] == "WRITE" and "READ" in r["degraded"]
    push(a, a_cfg, b, b_cfg, [1, 2, 5], [7, 3, 0], a_opts=opts)


@pytest.mark.parametrize("backend", BACKENDS[:1])  # the throttle is the transport base's
def test_throttled_reads_are_degraded(procs, backend):
    a, b = procs
    opts = {"degrade": {"READ": 10e6}, "path_warn_fraction": 0.5}
    _, _, r = _report(a, b, CacheCfg("nhd", 6), CacheCfg("nhd", 7), opts)
    assert r["read_error"] == "" and 0 < r["read_bps"] <= 10.5e6
    assert r["direction"] == "WRITE" and list(r["degraded"]) == ["READ"]

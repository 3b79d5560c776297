"""bench/topology.py still runs, and its loop baseline agrees with the fast path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "topology.py"


def test_bench_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_topology", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "t.json"
    args = ["--layers", "2", "--blocks", "300", "--plan-blocks", "50", "--repeat", "1"]
    assert mod.main([*args, "--layouts", "nhd,kv_outer", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 4 + 2 and all(r["count"] > 0 for r in rows)
    assert all("speedup" in r for r in rows[:-1])  # the baseline ran and matched (asserted)

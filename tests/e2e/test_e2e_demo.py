"""`make demo`'s command: two daemon processes, tokens equal to the monolithic run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

if importlib.util.find_spec("mooncake") is None:  # the engine runs in the daemons
    pytest.skip("mooncake is not installed", allow_module_level=True)


def test_demo_prints_matches_and_exits_zero(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "kvbridge.connector.serving.cli", "demo", "--backend", "mooncake",
         "--prefill-layout", "kv_outer", "--decode-layout", "packed", "--max-new-tokens", "6",
         "--prompt", "first prompt", "--prompt", "a second, longer prompt than the first one",
         "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0, res.stdout + res.stderr
    assert lines[-1] == "2/2 requests match monolithic"
    assert "kv_outer -> packed" in res.stdout and res.stdout.count("MATCH") == 2
    assert "/v1/completions" in res.stdout and "same text as Generate" in res.stdout
    assert "'demo-prefill': 0, 'demo-decode': 0" in res.stdout

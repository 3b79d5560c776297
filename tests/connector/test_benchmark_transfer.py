"""The transfer benchmarks' logic: baseline descriptors, JSON summary, a tiny real run,
and the GPU benchmark's CPU-only parts (sizes, device checks)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kvbridge.connector.transfer.transport import BACKENDS  # every registered transport
from kvbridge.topology import TransferTopology, layouts

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import transfer as bt  # noqa: E402  (bench/transfer.py)


def _byte_set(reg, off, nb) -> set[tuple[int, int]]:
    return {(int(r), int(o) + i) for r, o, n in zip(reg, off, nb, strict=True) for i in range(n)}


@pytest.mark.parametrize("layout", ["packed", "nhd", "interleaved"])
def test_per_block_descriptors_cover_exactly_the_blocks(layout):
    cache = layouts.allocate(layout, num_layers=3, num_blocks=9, block_size=2, num_kv_heads=2,
                             head_dim=4, device="meta")  # fmt: skip
    topo = TransferTopology.from_caches(cache.layers)
    ids = np.array([1, 2, 5, 8])
    reg, off, nb = bt.per_block_descriptors(topo, 2, ids)
    assert reg.size == 3 * 2 * ids.size  # one per (layer, K or V, block)
    assert len(set(nb.tolist())) == 1  # all the size of one K (or V) block
    ranges = topo.block_ranges(ids)
    assert _byte_set(reg, off, nb) == _byte_set(ranges.region, ranges.offset, ranges.nbytes)


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bt.add_arguments(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_tiny_run_prints_table_json_and_plot(capsys, tmp_path):
    png = tmp_path / "transfer.png"
    args = _args(layers=2, kv_heads=2, head_dim=16, block_size=4, tokens="64,128", repeats=3,
                 plot=png)  # fmt: skip
    args.json = True
    assert bt.run(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert set(summary) == {"memcpy_gbps", "memcpy_gbps_min", "memcpy_gbps_max", "backends"}
    assert 0 < summary["memcpy_gbps_min"] <= summary["memcpy_gbps"] <= summary["memcpy_gbps_max"]
    assert set(summary["backends"]) == set(BACKENDS)
    for v in summary["backends"].values():
        assert set(v) == {
            "gbps", "gbps_min", "gbps_max", "baseline_gbps", "baseline_gbps_min",
            "baseline_gbps_max", "descriptors", "baseline_descriptors",
        }  # fmt: skip
        assert 0 < v["gbps_min"] <= v["gbps"] <= v["gbps_max"]
        assert 0 < v["baseline_gbps_min"] <= v["baseline_gbps"] <= v["baseline_gbps_max"]
        assert v["baseline_descriptors"] == 2 * 2 * 32  # layers x (K, V) x blocks of 128 tokens
    assert any(line.startswith("nixl ") for line in out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_spread_and_interleaved_memcpy():
    m = bt.Measure("x", 64, nbytes=10**9, seconds=[1.0, 0.5, 2.0], memcpy_seconds=[0.25])
    assert m.spread() == (0.5, 1.0, 2.0) and m.gbps == 1.0 and m.memcpy_gbps == 4.0
    copy = bt.Memcpy(1 << 20)
    copy(m)
    assert len(m.memcpy_seconds) == 2 and bool((copy.dst == 7).all())  # it really copied
    assert bt.Measure("y", 1).spread("baseline_seconds") == (0.0, 0.0, 0.0)


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_transfer", ROOT / "bench/gpu_transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_cpu_parts(capsys):
    gb = _gpu_bench()
    p = argparse.ArgumentParser()
    gb.add_arguments(p)
    args = p.parse_args(["--tokens", "2048", "--dry-run"])
    plan = gb.dry_plan(args)
    assert (
        plan["bytes"] == 2048 * 32 * 2 * 8 * 128 * 2
    )  # tokens x layers x K,V x heads x dim x bf16
    assert plan["descriptors"] == 32 and plan["regions"] == 32
    assert gb.run(args) == 0 and json.loads(capsys.readouterr().out)["tokens"] == 2048
    if not torch.cuda.is_available():
        assert "CUDA" in gb.gpu_problem(("cuda:0", "cuda:1"))
        assert gb.run(p.parse_args(["--tokens", "64"])) == 2
    res = argparse.Namespace(descriptors=32, engine_descriptors=32)
    out = gb.summarize(2 << 30, [0.5, 0.25, 1.0], ([4.0, 2.0, 8.0], 4096), 16.0, res, args)
    assert out["nixl_gbps"] == pytest.approx(4.295, abs=1e-3) and out["ratio"] == pytest.approx(
        4.295 / 16, abs=1e-3
    )
    assert out["baseline_gbps"] == pytest.approx(0.537, abs=1e-3)
    assert out["baseline_ratio"] == pytest.approx(8.0, abs=1e-3)
    assert out["baseline_descriptors"] == 4096
    cache = layouts.allocate("packed", num_layers=2, num_blocks=6, block_size=2, num_kv_heads=1,
                             head_dim=4, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert gb.checksum(cache, np.array([1, 2])) != gb.checksum(cache, np.array([3, 4]))


def test_cli_runs_the_bench_script_with_its_own_flags():
    """``kvbridge bench transfer ...`` runs bench/transfer.py with its own flags (and --help)."""
    import subprocess

    cmd = [sys.executable, "-m", "kvbridge.connector.serving.cli", "bench", "transfer", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--backends" in out.stdout and "--quick" in out.stdout

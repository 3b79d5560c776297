"""The Triton kernel under TRITON_INTERPRET=1 on the CPU, against the float64 brute force.

Not collected by default (the name lacks ``test_``): test_decode_triton_interpreter.py
runs it in a separate pytest process with the variable set before triton is
imported, so the rest of the suite keeps the compiled-mode Triton. Small shapes:
the interpreter runs every program in numpy.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

import torch
from decode_truth import brute_force, check_case, make_case, rel_err
from kvbridge.kernels import paged_decode
from kvbridge.kernels.checks import check_inputs
from kvbridge.kernels.triton_config import TritonConfig
from kvbridge.kernels.triton_launch import is_interpreted, triton_paged_decode
from kvbridge.topology.layouts import GQA_LAYOUTS

F8 = torch.float8_e4m3fn
SEQS = [0, 1, 17, 40, 33]


def triton(case, config=None, validate=True, **kw):
    out = torch.full(
        (case.q.shape[0], case.q.shape[1], case.v.shape[3]), float("nan"), dtype=case.q.dtype
    )
    if config is None:
        return paged_decode(
            case.q, case.k, case.v, case.block_table, case.seq_lens, out=out,
            backend="triton", validate=validate, **case.kwargs(), **kw,
        )  # fmt: skip
    p = check_inputs(case.q, case.k, case.v, case.block_table, case.seq_lens, None,
                     case.k_scale, case.v_scale, out)  # fmt: skip
    return triton_paged_decode(case.q, case.k, case.v, case.block_table, case.seq_lens, p,
                               case.k_scale, case.v_scale, out, config)  # fmt: skip


def test_interpreter_is_on():
    assert is_interpreted()


@pytest.mark.parametrize("layout", GQA_LAYOUTS)
def test_every_layout_with_offset_and_padding(layout):
    case = make_case(layout, seq_lens=SEQS, num_q_heads=8, num_kv_heads=2, head_dim=32,
                     storage_offset=3, block_pad=5, num_layers=2, layer=1)  # fmt: skip
    check_case(case, triton(case))


@pytest.mark.parametrize("num_q_heads", [16, 128])
def test_mla_shared_latent(num_q_heads):
    case = make_case("mla", seq_lens=[0, 70, 5], num_q_heads=num_q_heads, block_size=64)
    check_case(case, triton(case))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dtypes(dtype):
    case = make_case("hnd", seq_lens=SEQS, dtype=dtype)
    check_case(case, triton(case))


@pytest.mark.parametrize("layout", ["nhd", "mla"])
def test_fp8_with_float_and_tensor_scales(layout):
    case = make_case(layout, seq_lens=SEQS, kv_dtype=F8, num_q_heads=16)
    check_case(case, triton(case))
    case.k_scale, case.v_scale = torch.tensor(0.03), torch.tensor(0.07)
    check_case(case, triton(case))


def test_mla_fp8_latent_split_and_fused():
    """fp8 latent, bf16 q, separate scales, several splits merged inside stage 1."""
    case = make_case("mla", seq_lens=[0, 70, 5, 128], num_q_heads=16, block_size=16,
                     kv_dtype=F8)  # fmt: skip
    case.k_scale, case.v_scale = torch.tensor(0.03), 0.07
    check_case(case, triton(case, TritonConfig(block_h=16, block_n=16, num_splits=3)))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 256])
def test_head_dims(head_dim):
    case = make_case("packed", seq_lens=[0, 9, 40], head_dim=head_dim)
    check_case(case, triton(case))


@pytest.mark.parametrize("hq,hkv", [(8, 1), (4, 4), (64, 2)])
def test_group_sizes(hq, hkv):
    case = make_case("interleaved", seq_lens=SEQS, num_q_heads=hq, num_kv_heads=hkv, head_dim=32)
    check_case(case, triton(case))


@pytest.mark.parametrize("block_size", [1, 48, 128])
def test_block_sizes(block_size):
    case = make_case("nhd", seq_lens=[0, 1, 130, 129], block_size=block_size, head_dim=32)
    check_case(case, triton(case))


@pytest.mark.parametrize(
    "config",
    [
        TritonConfig(num_splits=1),
        TritonConfig(block_n=16, num_splits=3),
        TritonConfig(block_n=64, num_splits=7),
        TritonConfig(block_h=32, dv_tiles=2, num_splits=2),
        TritonConfig(block_n=16, num_splits=3, fuse_reduce=False),  # stage 2 merges
    ],
    ids=str,
)
def test_split_k_and_tiles(config):
    case = make_case("hnd", seq_lens=[0, 100, 1, 64], num_q_heads=8, num_kv_heads=2)
    out = triton(case, config)
    check_case(case, out)
    assert not out.isnan().any()


def test_fused_reduce_counts_on_zeroed_counters_and_leaves_them_zero(monkeypatch):
    """One launch merges the splits (no stage 2), and the counters it used are back
    at zero, so the next launch on the same (persistent) counters is right too."""
    import kvbridge.kernels.triton_launch as tl_launch

    counters = torch.zeros(64, dtype=torch.int32)
    real = tl_launch._scratch

    def scratch(st, device):  # the kept (reused) counters of a CUDA stream
        po, lse, _ = real(st, device)
        return po, lse, counters

    monkeypatch.setattr(tl_launch, "_scratch", scratch)
    stage2 = []
    real2 = tl_launch.paged_decode_stage2
    monkeypatch.setattr(tl_launch, "paged_decode_stage2", type(
        "Spy", (), {"__getitem__": lambda self, g: stage2.append(g) or real2[g]})())  # fmt: skip
    for dv_tiles in (1, 2):
        case = make_case("nhd", seq_lens=[0, 100, 1, 64], num_q_heads=8, num_kv_heads=2)
        for _ in range(2):
            check_case(case, triton(case, TritonConfig(block_h=16, dv_tiles=dv_tiles,
                                                       num_splits=3)))  # fmt: skip
            assert not counters.any()
    assert stage2 == []


def test_all_sequences_empty_give_zeros():
    case = make_case("nhd", seq_lens=[0, 0])
    out = triton(case, TritonConfig(num_splits=4))
    assert (out == 0).all()


def test_entries_past_length_are_never_read():
    case = make_case("nhd", seq_lens=[5, 33], table_pad_pages=3)
    out = triton(case)
    check_case(case, out)
    case.block_table[case.block_table == -1] = 0  # real blocks instead of -1: no change
    assert torch.equal(triton(case), out)


def test_ids_outside_the_cache_are_dropped_without_validation():
    """With validate=False the kernel still never reads outside the cache."""
    case = make_case("nhd", seq_lens=[40], extra_blocks=0, table_pad_pages=0)
    bad = case.block_table.clone()
    bad[0, 1] = 10**6  # tokens 16..31 point far outside the cache
    case.block_table, good = bad, case.block_table
    out = triton(case, validate=False)
    keep = torch.cat([torch.arange(16), torch.arange(32, 40)])
    k, v = (x[good[0, keep // 16].long(), keep % 16].unsqueeze(1) for x in (case.k, case.v))
    ref = brute_force(case.q, k, v, torch.arange(24).view(1, 24), torch.tensor([24]))
    assert rel_err(out, ref) < 1e-2


def test_matches_the_torch_backend():
    case = make_case("head_groups", seq_lens=SEQS, num_q_heads=8, num_kv_heads=4)
    ref = paged_decode(case.q, case.k, case.v, case.block_table, case.seq_lens, backend="torch")
    assert rel_err(triton(case), ref.double()) < 1e-2


def test_empty_batch_and_empty_table():
    case = make_case("nhd", seq_lens=[0, 0], table_pad_pages=0)
    assert case.block_table.shape[1] == 0
    assert (triton(case) == 0).all()
    empty = make_case("nhd", seq_lens=[])
    assert triton(empty).shape == (0, 4, 64)

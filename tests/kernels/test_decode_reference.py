"""The torch backend of paged_decode against a float64 brute force, on the CPU.

Every registered layout (kvbridge.topology.layouts), dtypes, head dims,
GQA group sizes, block sizes, MLA, fp8 scales and the edge cases.
Fresh random data in every run (the seed is in the failure message).
"""

from __future__ import annotations

import pytest
import torch
from decode_truth import brute_force, check_case, make_case, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from kvbridge.kernels import paged_decode
from kvbridge.topology.layouts import GQA_LAYOUTS

F8 = torch.float8_e4m3fn
SEQS = [0, 1, 17, 40, 3]


def run(case, backend="torch", **kw):
    return paged_decode(
        case.q, case.k, case.v, case.block_table, case.seq_lens, backend=backend,
        **case.kwargs(), **kw,
    )  # fmt: skip


@pytest.mark.parametrize("layout", GQA_LAYOUTS)
@pytest.mark.parametrize("offset,pad", [(0, 0), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_layout(layout, offset, pad, dtype):
    case = make_case(
        layout, seq_lens=SEQS, num_q_heads=8, num_kv_heads=2, dtype=dtype,
        storage_offset=offset, block_pad=pad, num_layers=2, layer=1,
    )  # fmt: skip
    check_case(case, run(case))


@pytest.mark.parametrize("num_q_heads", [16, 128])
def test_mla_latent(num_q_heads):
    case = make_case("mla", seq_lens=[0, 70, 5], num_q_heads=num_q_heads, block_size=64)
    assert case.v.data_ptr() == case.k.data_ptr() and case.k.shape[-1] == 576
    check_case(case, run(case))


@pytest.mark.parametrize("tensor_scales", [False, True])
def test_mla_fp8_latent_with_scales(tensor_scales):
    """An fp8 (e4m3) latent with a bf16 q: K and V (its first 512 columns) are
    dequantised by k_scale and v_scale (floats or one-element tensors)."""
    case = make_case("mla", seq_lens=[0, 70, 5, 128], num_q_heads=16, block_size=64,
                     kv_dtype=F8)  # fmt: skip
    assert case.k.dtype == F8 and case.q.dtype == torch.bfloat16
    if tensor_scales:
        case.k_scale, case.v_scale = torch.tensor(0.03), torch.tensor(0.07)
    check_case(case, run(case))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    case = make_case("hnd", seq_lens=SEQS, head_dim=head_dim)
    check_case(case, run(case))


@pytest.mark.parametrize("hq,hkv", [(8, 1), (4, 4), (16, 2), (12, 3)])
def test_group_sizes(hq, hkv):
    case = make_case("nhd", seq_lens=SEQS, num_q_heads=hq, num_kv_heads=hkv)
    check_case(case, run(case))


@pytest.mark.parametrize("block_size", [1, 7, 16, 128])
def test_block_sizes(block_size):
    case = make_case("packed", seq_lens=[0, 1, 130, 129], block_size=block_size)
    check_case(case, run(case))


@pytest.mark.parametrize("tensor_scales", [False, True])
def test_fp8_separate_scales(tensor_scales):
    case = make_case("interleaved", seq_lens=SEQS, kv_dtype=F8)
    if tensor_scales:
        case.k_scale, case.v_scale = torch.tensor(0.03), torch.tensor(0.07)
    out = run(case)
    check_case(case, out)
    # the two scales are applied separately: swapping them changes the result
    case.k_scale, case.v_scale = case.v_scale, case.k_scale
    assert rel_err(out, brute_force(case.q, case.k, case.v, case.block_table, case.seq_lens,
                                    None, case.k_scale, case.v_scale)) > 0.1  # fmt: skip


def test_zero_lengths_give_zeros():
    case = make_case("nhd", seq_lens=[0, 0, 0])
    out = run(case)
    assert out.abs().sum() == 0 and not out.isnan().any()


def test_entries_past_length_are_never_read():
    case = make_case("nhd", seq_lens=[5, 33], table_pad_pages=3)
    assert (case.block_table[:, -1] == -1).all()
    out = run(case)
    check_case(case, out)
    # pointing the padding at real blocks changes nothing
    pad = case.block_table == -1
    case.block_table[pad] = 0
    assert torch.equal(run(case), out)


def test_out_and_strided_q():
    case = make_case("hnd", seq_lens=SEQS, strided_q=True)
    assert not case.q.is_contiguous()
    buf = torch.full((5, 4, 64 + 8), float("nan"), dtype=case.q.dtype)
    out = buf[..., :64]
    ret = run(case, out=out)
    assert ret.data_ptr() == out.data_ptr()
    check_case(case, out)
    assert buf[..., 64:].isnan().all()  # nothing written outside `out`


def test_custom_scale():
    case = make_case("nhd", seq_lens=SEQS)
    out = run(case, scale=0.3)
    ref = brute_force(case.q, case.k, case.v, case.block_table, case.seq_lens, 0.3)
    assert rel_err(out, ref) < 1e-2


def test_auto_backend_on_cpu_is_torch():
    case = make_case("nhd", seq_lens=SEQS)
    assert torch.equal(run(case, backend="auto"), run(case, backend="torch"))


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from([*GQA_LAYOUTS]),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3, 4]),
    block_size=st.sampled_from([1, 5, 16]),
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    pad=st.integers(0, 9),
)
def test_property_random_shapes(layout, hkv, group, block_size, lens, pad):
    case = make_case(
        layout, seq_lens=lens, num_q_heads=hkv * group, num_kv_heads=hkv, head_dim=16,
        block_size=block_size, block_pad=pad, storage_offset=pad, dtype=torch.float32,
    )  # fmt: skip
    check_case(case, run(case))

"""Multi-token decode and sliding windows in the Triton kernel under TRITON_INTERPRET=1.

Run by test_decode_triton_interpreter.py in its own process (see interpret_cases.py).
Small shapes against the float64 brute force: every layout, MLA, split-K, windows
mid-block and under one block, blocks outside the window never read.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

import torch
from decode_truth import check_case, make_case
from kvbridge.kernels import PagedDecodeError, paged_decode
from kvbridge.kernels.checks import check_inputs
from kvbridge.kernels.triton_config import TritonConfig
from kvbridge.kernels.triton_launch import triton_paged_decode
from kvbridge.topology.layouts import GQA_LAYOUTS
from test_decode_multi_token import _poison_outside_window

SEQS = [0, 5, 17, 40, 33]


def triton(case, config=None, validate=None):
    out = torch.full(case.out_shape(), float("nan"), dtype=case.q.dtype)
    if config is None:
        return paged_decode(case.q, case.k, case.v, case.block_table, case.seq_lens, out=out,
                            backend="triton", validate=validate, **case.kwargs())  # fmt: skip
    p = check_inputs(case.q, case.k, case.v, case.block_table, case.seq_lens, None,
                     case.k_scale, case.v_scale, out, case.window)  # fmt: skip
    return triton_paged_decode(case.q, case.k, case.v, case.block_table, case.seq_lens, p,
                               case.k_scale, case.v_scale, out, config)  # fmt: skip


@pytest.mark.parametrize("layout", GQA_LAYOUTS)
@pytest.mark.parametrize("tokens,window", [(3, None), (4, 6), (None, 7)])
def test_every_layout(layout, tokens, window):
    case = make_case(layout, seq_lens=SEQS, num_q_heads=8, num_kv_heads=2, head_dim=32,
                     storage_offset=3, block_pad=5, num_layers=2, layer=1, strided_q=True,
                     tokens=tokens, window=window)  # fmt: skip
    check_case(case, triton(case))


@pytest.mark.parametrize("tokens,window", [(2, None), (3, 20), (None, 10)])
def test_mla(tokens, window):
    case = make_case("mla", seq_lens=[0, 70, 5], num_q_heads=16, block_size=64,
                     tokens=tokens, window=window)  # fmt: skip
    check_case(case, triton(case))


@pytest.mark.parametrize("tokens", [16, 9])
def test_many_tokens_span_row_tiles(tokens):
    """T * group = 64 / 36 rows: several row tiles per KV head, each its own key range."""
    case = make_case("nhd", seq_lens=[16, 40], num_q_heads=8, num_kv_heads=2, head_dim=16,
                     tokens=tokens, window=5, dtype=torch.float32)  # fmt: skip
    check_case(case, triton(case))
    check_case(case, triton(case, TritonConfig(block_h=16, num_splits=3)))


@pytest.mark.parametrize("window", [1, 3, 16, 17])
@pytest.mark.parametrize(
    "config", [None, TritonConfig(block_n=16, num_splits=1), TritonConfig(block_n=16, num_splits=4)]
)
def test_windows_and_splits(window, config):
    case = make_case("hnd", seq_lens=[0, 3, 37, 64, 100], tokens=3, window=window,
                     block_size=16, head_dim=16, dtype=torch.float32)  # fmt: skip
    check_case(case, triton(case, config))


def test_block_size_one_window():
    case = make_case("packed", seq_lens=[1, 9, 30], block_size=1, window=4, head_dim=16)
    check_case(case, triton(case))


@pytest.mark.parametrize("tokens", [1, 3])
def test_blocks_outside_the_window_are_not_read(tokens):
    case = make_case("interleaved", seq_lens=[70, 100, 33], tokens=tokens if tokens > 1 else None,
                     window=20, block_size=8, head_dim=32)  # fmt: skip
    before = triton(case)
    _poison_outside_window(case, tokens)  # NaN blocks: a read would poison the output
    after = triton(case)
    assert torch.equal(before, after)
    check_case(case, after)


def test_t_greater_than_seq_len():
    case = make_case("nhd", seq_lens=[5, 2], tokens=3, head_dim=16)
    with pytest.raises(PagedDecodeError, match=r"seq_lens\[1\] = 2 is shorter than the 3 query"):
        triton(case)
    out = triton(case, validate=False)  # unchecked: rows before position 0 see nothing
    assert (out[1, 0] == 0).all() and not out.isnan().any()


def test_matches_torch_backend():
    case = make_case("head_groups", seq_lens=SEQS, num_q_heads=8, num_kv_heads=4, tokens=2,
                     window=9, head_dim=32)  # fmt: skip
    ref = paged_decode(case.q, case.k, case.v, case.block_table, case.seq_lens, backend="torch",
                       window=9)  # fmt: skip
    assert (triton(case).float() - ref.float()).norm() / ref.float().norm() < 1e-2

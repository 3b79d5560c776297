"""Multi-token decode (q: (B, T, Hq, D)) and sliding windows, torch backend, on the CPU.

Against the float64 brute force of decode_truth.py on every layout (offsets,
padded blocks, non-contiguous q), windows that start mid-block or cover less than
one block, T > seq_len refused, blocks outside the window never read, and the
fast path (cached checks) staying correct when the data changes.
"""

from __future__ import annotations

import pytest
import torch
from decode_truth import brute_force, check_case, make_case, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from kvbridge.kernels import PagedDecodeError, paged_decode
from kvbridge.topology.layouts import GQA_LAYOUTS

SEQS = [0, 16, 17, 40, 33]


def run(case, backend="torch", **kw):
    return paged_decode(case.q, case.k, case.v, case.block_table, case.seq_lens,
                        backend=backend, **case.kwargs(), **kw)  # fmt: skip


@pytest.mark.parametrize("layout", [*GQA_LAYOUTS, "mla"])
@pytest.mark.parametrize("tokens,window", [(1, 7), (4, None), (4, 5), (16, 3)])
def test_every_layout(layout, tokens, window):
    mla = layout == "mla"
    case = make_case(
        layout, seq_lens=SEQS, num_q_heads=16 if mla else 8, num_kv_heads=2, head_dim=32,
        storage_offset=3, block_pad=5, num_layers=2, layer=1, strided_q=True,
        tokens=None if tokens == 1 else tokens, window=window, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip
    assert not case.q.is_contiguous()
    out = run(case)
    assert out.shape == case.out_shape()
    check_case(case, out)


@pytest.mark.parametrize("window", [1, 3, 15, 16, 17, 1000])
@pytest.mark.parametrize("tokens", [None, 3])
def test_windows_mid_block_and_under_one_block(window, tokens):
    case = make_case("nhd", seq_lens=[0, 1, 5, 37, 64], block_size=16, tokens=tokens,
                     window=window, dtype=torch.float32)  # fmt: skip
    case.seq_lens[1] = 3 if tokens else 1  # T <= seq_len
    check_case(case, run(case))


def test_window_one_sees_only_itself():
    case = make_case("hnd", seq_lens=[9, 30], tokens=4, window=1, dtype=torch.float32)
    out = run(case)
    k, v = case.k, case.v
    for b, n in enumerate(case.seq_lens.tolist()):
        for i in range(4):
            j = n - 4 + i
            blk = int(case.block_table[b, j // 16])
            assert torch.allclose(out[b, i, :2], v[blk, j % 16, 0].expand(2, -1), atol=1e-6)
            assert torch.allclose(out[b, i, 2:], v[blk, j % 16, 1].expand(2, -1), atol=1e-6)
    assert k.shape[0] > 0


def test_t_greater_than_seq_len_is_refused():
    case = make_case("nhd", seq_lens=[5, 3], tokens=4)
    with pytest.raises(PagedDecodeError, match=r"seq_lens\[1\] = 3 is shorter than the 4 query"):
        run(case)


def test_padding_rows_give_zeros():
    case = make_case("nhd", seq_lens=[0, 8], tokens=4, window=2)
    out = run(case)
    assert (out[0] == 0).all()
    check_case(case, out)


def _poison_outside_window(case, tokens):
    """Point every table entry wholly before each sequence's window at a NaN block."""
    bs = case.k.shape[1]
    used = set(case.block_table.flatten().tolist())
    nan_blk = min(set(range(case.k.shape[0])) - used)  # a spare block (extra_blocks)
    case.k[nan_blk] = float("nan")
    case.v[nan_blk] = float("nan")
    for b, n in enumerate(case.seq_lens.tolist()):
        first = max(0, n - tokens - case.window + 1) // bs
        case.block_table[b, :first] = nan_blk
    return nan_blk


@pytest.mark.parametrize("tokens", [1, 3])
def test_blocks_outside_the_window_are_not_read(tokens):
    case = make_case("interleaved", seq_lens=[70, 100, 33], tokens=tokens if tokens > 1 else None,
                     window=20, block_size=8)  # fmt: skip
    before = run(case)
    _poison_outside_window(case, tokens)
    after = run(case)
    assert torch.equal(before, after)
    check_case(case, after)


def test_entries_before_the_window_may_be_minus_one():
    case = make_case("nhd", seq_lens=[70, 40], tokens=2, window=9, block_size=8)
    ref = run(case)
    for b, n in enumerate(case.seq_lens.tolist()):
        case.block_table[b, : max(0, n - 2 - 9 + 1) // 8] = -1
    assert torch.equal(run(case), ref)  # validation only needs the visible blocks


def test_out_argument_multi_token():
    case = make_case("packed", seq_lens=SEQS[1:], tokens=3)
    buf = torch.full((4, 3, 4, 64 + 8), float("nan"), dtype=case.q.dtype)
    ret = run(case, out=buf[..., :64])
    assert ret.data_ptr() == buf.data_ptr()
    check_case(case, buf[..., :64])
    assert buf[..., 64:].isnan().all()
    with pytest.raises(PagedDecodeError, match=r"out must be a torch.bfloat16 tensor of shape"):
        run(case, out=torch.empty(4, 4, 64, dtype=case.q.dtype))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_bad_window(bad):
    case = make_case("nhd", seq_lens=[5])
    with pytest.raises(PagedDecodeError, match=r"window must be None or an int >= 1"):
        paged_decode(case.q, case.k, case.v, case.block_table, case.seq_lens, window=bad)


def test_cached_checks_follow_the_data():
    """The second call with the same metadata skips check_inputs but not the data."""
    case = make_case("nhd", seq_lens=[20, 9], tokens=2, window=6)
    check_case(case, run(case))
    case.q.copy_(torch.randn_like(case.q, dtype=torch.float32))
    case.seq_lens[0] = 31
    check_case(case, run(case))
    case.seq_lens[1] = 1
    with pytest.raises(PagedDecodeError, match=r"shorter than the 2 query tokens"):
        run(case)
    case.seq_lens[1] = 9
    case.block_table[1, 0] = 10**6
    with pytest.raises(PagedDecodeError, match=r"block_table\[1, 0\] = 1000000"):
        run(case)
    case.block_table[1, 0] = 0
    check_case(case, run(case, validate=False))  # the opt-out keeps working


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from([*GQA_LAYOUTS]),
    group=st.sampled_from([1, 3, 4]),
    block_size=st.sampled_from([1, 5, 16]),
    tokens=st.integers(1, 6),
    window=st.one_of(st.none(), st.integers(1, 40)),
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=3),
)
def test_property_random(layout, group, block_size, tokens, window, lens):
    lens = [0 if n == 0 else max(n, tokens) for n in lens]
    case = make_case(layout, seq_lens=lens, num_q_heads=2 * group, num_kv_heads=2, head_dim=16,
                     block_size=block_size, tokens=tokens, window=window,
                     dtype=torch.float32)  # fmt: skip
    out = run(case)
    ref = brute_force(case.q, case.k, case.v, case.block_table, case.seq_lens, window=window)
    assert rel_err(out, ref) < 1e-4

"""Bad input to paged_decode raises PagedDecodeError naming what is wrong."""

from __future__ import annotations

import pytest
import torch
from decode_truth import make_case
from kvbridge.kernels import PagedDecodeError, paged_decode
from kvbridge.kernels.triton_launch import is_interpreted


@pytest.fixture
def case():
    return make_case("nhd", seq_lens=[5, 20], num_q_heads=4, num_kv_heads=2)


def call(c, **over):
    args = dict(q=c.q, k_cache=c.k, v_cache=c.v, block_table=c.block_table, seq_lens=c.seq_lens)
    args.update(over)
    return paged_decode(**args)


@pytest.mark.parametrize(
    "over,match",
    [
        (lambda c: dict(q=c.q[0]), r"q must be \(batch, q_heads, head_dim\)"),
        (lambda c: dict(k_cache=c.k[0]), r"k_cache must be \(num_blocks"),
        (lambda c: dict(q=c.q.float()), r"q dtype torch.float32 must equal the cache dtype"),
        (lambda c: dict(q=c.q.to(torch.int8)), r"q dtype torch.int8 unsupported; supported:"),
        (lambda c: dict(v_cache=c.v.half()), r"v_cache dtype .* differs from k_cache"),
        (
            lambda c: dict(k_cache=c.k.to(torch.int8), v_cache=c.v.to(torch.int8)),
            r"k_cache dtype torch.int8 unsupported; supported: bfloat16",
        ),
        (lambda c: dict(k_cache=c.k.transpose(2, 3)), r"k_cache must have stride 1 in its last"),
        (lambda c: dict(q=c.q[:, :3]), r"q heads \(3\) must be a positive multiple"),
        (lambda c: dict(v_cache=c.v[:, :8]), r"v_cache shape .* must match k_cache"),
        (lambda c: dict(q=c.q[..., :32]), r"q head_dim 32 differs from k_cache head_dim 64"),
        (lambda c: dict(block_table=c.block_table.float()), r"block_table must be a 2-D int32"),
        (lambda c: dict(block_table=c.block_table[:1]), r"with 2 rows"),
        (lambda c: dict(seq_lens=c.seq_lens[:1]), r"seq_lens must be a 1-D int32/int64"),
        (lambda c: dict(seq_lens=c.seq_lens * 100), r"seq_lens\[\d\] = \d+ is outside \[0, \d+\]"),
        (lambda c: dict(seq_lens=-c.seq_lens), r"seq_lens\[0\] = -5 is outside"),
        (
            lambda c: dict(backend="cuda"),
            r"unknown backend 'cuda'; supported: auto, gluon-mla, triton, torch",
        ),
        (lambda c: dict(k_scale=0.5), r"k_scale=0.5 given for a bfloat16 cache; scales apply"),
        (lambda c: dict(v_scale=torch.tensor(2.0)), r"v_scale given for a bfloat16 cache"),
        (lambda c: dict(scale=float("nan")), r"scale must be a finite float"),
        (lambda c: dict(out=torch.empty(2, 4, 32)), r"out must be a torch.bfloat16 tensor"),
        (
            lambda c: dict(seq_lens=torch.empty(2, dtype=torch.int32, device="meta")),
            r"block_table \(cpu\) and seq_lens \(meta\) must both be on q's device",
        ),
        (lambda c: dict(q=c.q[:, None, :, :][:, :0]), r"q has 0 tokens per sequence"),
    ],
)
def test_bad_input(case, over, match):
    with pytest.raises(PagedDecodeError, match=match):
        call(case, **over(case))


def test_needed_block_id_out_of_range(case):
    bt = case.block_table.clone()
    bt[1, 1] = case.k.shape[0]  # needed by seq 1 (20 tokens, 2 pages)
    with pytest.raises(PagedDecodeError, match=r"block_table\[1, 1\] = \d+ is not a cache block"):
        call(case, block_table=bt)
    bt[1, 1] = -1
    with pytest.raises(PagedDecodeError, match=r"block_table\[1, 1\] = -1 is not a cache block"):
        call(case, block_table=bt)


def test_fp8_scale_must_be_positive():
    c = make_case("nhd", seq_lens=[3], kv_dtype=torch.float8_e4m3fn)
    with pytest.raises(PagedDecodeError, match=r"k_scale=-1.0 must be > 0"):
        call(c, k_scale=-1.0)
    with pytest.raises(PagedDecodeError, match=r"v_scale must be a float or a one-element"):
        call(c, v_scale=torch.ones(2))


@pytest.mark.skipif(is_interpreted(), reason="the interpreter makes triton valid on the CPU")
def test_triton_without_gpu_or_interpreter(case):
    with pytest.raises(PagedDecodeError, match=r"backend='triton' needs CUDA tensors"):
        call(case, backend="triton")


def test_triton_unsupported_head_dims():
    c = make_case("nhd", seq_lens=[3])
    v = torch.empty(c.v.shape[0], c.v.shape[1], c.v.shape[2], 128, dtype=c.v.dtype)
    with pytest.raises(PagedDecodeError, match=r"the Triton backend supports head_dim_v"):
        call(c, v_cache=v, backend="triton")

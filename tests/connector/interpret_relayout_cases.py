"""The one-launch relayout kernel (relayout_kernel.py) under TRITON_INTERPRET=1 on the CPU.

Run by tests/kernels/test_decode_triton_interpreter.py in its own process. Two
agents in one process on the same-host transport read with staging forced on and
the kernel used in place of the torch copies (on a GPU it is the default); truth is
torch indexing on the logical views of both caches, on fresh random bytes.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

import torch
from kvbridge.connector.transfer import relayout_kernel, staging
from kvbridge.connector.transfer.agent import KVTransferAgent
from kvbridge.topology.layouts import allocate

DIMS = dict(num_layers=2, head_dim=12, dtype=torch.bfloat16, device="cpu")


@pytest.fixture()
def kernel_only(monkeypatch):
    calls = []
    real = relayout_kernel.launch
    monkeypatch.setattr(staging, "use_kernel", lambda device: True)
    # counted once it returned: a launch that raised would fall back to torch copies
    monkeypatch.setattr(relayout_kernel, "launch", lambda *a: (real(*a), calls.append(1)))
    return calls


def _pair(src_layout, dst_layout, src_bs, dst_bs, src_heads=4, dst_heads=4, mla=False):
    gen = torch.Generator().manual_seed(11)
    extra = dict(kv_lora_rank=16, rope_dim=8) if mla else dict(num_kv_heads=src_heads)
    src = allocate(src_layout, num_blocks=12, block_size=src_bs, generator=gen,
                   **{**DIMS, **extra})  # fmt: skip
    if not mla:
        extra = dict(num_kv_heads=dst_heads)
    dst = allocate(dst_layout, num_blocks=14, block_size=dst_bs, generator=gen,
                   **{**DIMS, **extra})  # fmt: skip
    return src, dst


def _read(src, dst, s_ids, d_ids, tp=(0, 1), **kw):
    a = KVTransferAgent("holder", src, backend="local", side_channel_port=0)
    b = KVTransferAgent("puller", dst, backend="local", side_channel_port=0, staging="always",
                        tp_rank=tp[0], tp_size=tp[1])  # fmt: skip
    try:
        peer = b.connect_to(a.side_channel_address)
        return b.read_blocks(peer, s_ids, d_ids, **kw)
    finally:
        b.close()
        a.close()


@pytest.mark.parametrize(
    "src_layout,dst_layout", [("packed", "nhd"), ("nhd", "hnd"), ("interleaved", "kv_outer")]
)
def test_whole_blocks_in_any_layout_pair(kernel_only, src_layout, dst_layout):
    src, dst = _pair(src_layout, dst_layout, 4, 4)
    before = {n: [v.clone() for v in vs] for n, vs in dst.layers.items()}
    s_ids, d_ids = [7, 2, 11], [0, 13, 5]
    r = _read(src, dst, s_ids, d_ids)
    assert r.staged and kernel_only
    for name, sviews in src.layers.items():
        for sv, dv, old in zip(sviews, dst.layers[name], before[name], strict=True):
            old[d_ids] = sv[s_ids]  # every other block keeps its bytes
            assert torch.equal(dv, old), name


def test_tokens_between_block_sizes_and_a_tp_rank_head_range(kernel_only):
    src, dst = _pair("packed", "nhd", 8, 4, src_heads=4, dst_heads=2)
    s_ids, d_ids, n = [3, 9], [1, 12, 6, 4], 13
    before = {name: [v.clone() for v in vs] for name, vs in dst.layers.items()}
    r = _read(src, dst, s_ids, d_ids, tp=(1, 2), num_tokens=n)  # rank 1 of 2: heads 2, 3
    assert r.staged and kernel_only
    t = torch.arange(n)
    s_blk, d_blk = torch.as_tensor(s_ids)[t // 8], torch.as_tensor(d_ids)[t // 4]
    for name, sviews in src.layers.items():
        for sv, dv, old in zip(sviews, dst.layers[name], before[name], strict=True):
            old[d_blk, t % 4] = sv[s_blk, t % 8, 2:4]
            assert torch.equal(dv, old), name


def test_mla_latent_views(kernel_only):
    src, dst = _pair("mla", "mla", 4, 4, mla=True)
    s_ids, d_ids = [4, 0], [9, 3]
    r = _read(src, dst, s_ids, d_ids)
    assert r.staged and kernel_only
    for name, sviews in src.layers.items():
        for sv, dv in zip(sviews, dst.layers[name], strict=True):
            assert torch.equal(dv[d_ids], sv[s_ids]), name

"""The batched step's pieces: gathered CPU attention vs paged_decode, the two forward paths."""

from __future__ import annotations

import pytest
import torch
from kvbridge.connector.serving.engine.step import (
    BatchState,
    DecodeStep,
    buckets,
    forward,
    gathered_attention,
)
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, allocate_cache
from kvbridge.kernels import paged_decode
from kvbridge.topology.layouts import allocate


@pytest.mark.parametrize("layout", ["nhd", "packed", "interleaved"])
@pytest.mark.parametrize("window", [None, 5])
def test_gathered_attention_equals_paged_decode(layout, window):
    g = torch.Generator().manual_seed(4)
    cache = allocate(layout, num_layers=1, num_blocks=40, block_size=4, num_kv_heads=2,
                     head_dim=16, dtype=torch.float32, device="cpu", generator=g)  # fmt: skip
    k, v = cache.kv("layer0")
    lens = torch.tensor([1, 7, 13, 4, 22], dtype=torch.int32)
    perm = torch.randperm(40, generator=g)
    table = perm[:30].reshape(5, 6).to(torch.int32)  # every entry a valid block id
    q = torch.randn(5, 8, 16, generator=g)
    extra = {} if window is None else {"window": window}
    want = paged_decode(q, k, v, table, lens, scale=0.3, backend="torch", **extra)
    got = gathered_attention(q, k, v, table, lens, 0.3, int(lens.max()), window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_both_forward_paths_agree_and_state_moves():
    model = LlamaModel.random(ModelConfig(num_layers=2, hidden_size=64, num_heads=4,
                                          num_kv_heads=2, head_dim=16, intermediate_size=96,
                                          vocab_size=300))  # fmt: skip
    cache = allocate_cache(model, "hnd", 32, 4, seed=1)
    state = BatchState(4, 32, model.device, pad_block=0)
    state.set_row(0, 5, 9, [3, 4, 5], (0.0, 1.0, 0, 0))
    state.set_row(1, 7, 2, [6], (0.0, 1.0, 0, 0))
    state.set_row(2, 9, 0, [7], (0.0, 1.0, 0, 0))
    args = (state.tokens[:3], state.positions[:3], state.tables[:3])
    a = forward(model, cache, *args)  # paged_decode
    b = forward(model, cache, *args, max_len=10)  # gathered
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    state.move_row(2, 0)  # row 2 fills row 0
    assert state.tokens[0] == 9 and state.positions[0] == 0 and state.tables[0, 0] == 7
    step = DecodeStep(model, cache, state, cuda_graphs=True)  # CPU: graphs stay off
    assert not step.cuda_graphs
    nxt = step(2, any_sampling=False, max_len=3)
    assert len(nxt) == 2 and state.positions[:2].tolist() == [1, 3]
    assert state.tokens[:2].tolist() == nxt
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64] and buckets(48) == [1, 2, 4, 8, 16, 32, 48]

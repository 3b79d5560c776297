"""The model's fused GPU path (fused.py) under TRITON_INTERPRET=1 on the CPU.

Run by tests/kernels/test_decode_triton_interpreter.py in its own process (the
variable must be set before triton is imported). Each kernel is compared with the
torch ops it replaces on fresh random data; the whole model, fused, with the
unfused one: prefill logits, the K/V it writes into every layout, engine decode
steps and greedy tokens.
"""

from __future__ import annotations

import os
import random

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

import torch
from kvbridge.connector.serving.engine.step import forward
from kvbridge.connector.serving.model import (
    LlamaModel,
    ModelConfig,
    allocate_cache,
    generate_monolithic,
    random_weights,
)
from kvbridge.connector.serving.model import fused as fz
from kvbridge.connector.serving.model.llama import layer_name, rms_norm
from kvbridge.connector.serving.model.rope import apply_rope, rope_tables
from kvbridge.topology.layouts import GQA_LAYOUTS

DTYPES = [torch.float32, torch.bfloat16]


def tol(dtype):
    return {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_torch(dtype, residual):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 48, generator=g).to(dtype)  # a width that is not a power of two
    r = torch.randn(7, 48, generator=g).to(dtype) if residual else None
    w = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    y, xo = fz.rms_norm(x, w, 1e-5, residual=r)
    want_x = x + r if residual else x
    # bf16 within one rounding: the interpreter's float32 -> bf16 cast truncates (the
    # GPU rounds to nearest even, as torch does)
    torch.testing.assert_close(xo, want_x, **tol(dtype))
    torch.testing.assert_close(y, rms_norm(want_x, w, 1e-5), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    gu = torch.randn(5, 2 * 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = fz.silu_mul(gu)
    want = torch.nn.functional.silu(gu[:, :40]) * gu[:, 40:]
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("layout", GQA_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_matches_torch_in_every_layout(layout, dtype):
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_heads=6, num_kv_heads=2, head_dim=12)
    model = LlamaModel(cfg, random_weights(cfg, dtype), fused=False)
    cache = allocate_cache(model, layout, num_blocks=9, block_size=4, seed=3)
    kc, vc = cache.kv(layer_name(0))
    before_k, before_v = kc.clone(), vc.clone()
    hq, hkv, d = 6, 2, 12
    g = torch.Generator().manual_seed(4)
    t = 10
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    positions = torch.tensor(random.Random(5).sample(range(300), t), dtype=torch.int64)
    where = torch.tensor([*random.Random(6).sample(range(35), t - 1), 35])  # distinct slots,
    blk, slot = where // 4, where % 4  # the last slot of the last block among them
    cos, sin = rope_tables(cfg, positions, dtype, model._rope)
    q, k = fz.rope_store(qkv, cos, sin, (hq, hkv, d), kc, vc, blk, slot, want_k=True)
    want_q = apply_rope(qkv[:, : hq * d].view(t, hq, d), cos, sin)
    want_k = apply_rope(qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d), cos, sin)
    want_v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    torch.testing.assert_close(q, want_q, **tol(dtype))
    torch.testing.assert_close(k, want_k, **tol(dtype))
    before_k[blk, slot] = k  # everything else in the cache stays as it was
    before_v[blk, slot] = want_v
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


CONFIGS = {
    "llama": ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=96, vocab_size=128),
    "qwen2-bias": ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                              head_dim=16, intermediate_size=96, vocab_size=128,
                              qkv_bias=True, family="qwen2"),
    "qwen3-qk-norm": ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                                 head_dim=16, intermediate_size=96, vocab_size=128,
                                 qk_norm=True, family="qwen3"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_model_equals_the_torch_model(name):
    cfg = CONFIGS[name]
    plain = LlamaModel(cfg, random_weights(cfg, torch.float32), fused=False)
    fast = LlamaModel(cfg, random_weights(cfg, torch.float32), fused=True)
    assert fast.fused and fast._fused_qkv == (not cfg.qk_norm)
    assert fast.identity == plain.identity  # same weights, same digest
    prompt = [random.Random(7).randrange(128) for _ in range(11)]
    caches = []
    for layout, m in zip(GQA_LAYOUTS[:2], (plain, fast), strict=True):
        c = allocate_cache(m, layout, num_blocks=8, block_size=4, seed=8)
        caches.append((c, m.prefill(prompt, c, [5, 2, 7])))
    torch.testing.assert_close(caches[1][1], caches[0][1], rtol=0, atol=1e-4)
    for i in range(cfg.num_layers):
        pair = (caches[0][0].kv(layer_name(i)), caches[1][0].kv(layer_name(i)))
        for a, b in zip(*pair, strict=True):
            got, want = (t[[5, 2, 7]].flatten(0, 1)[:11] for t in (b, a))  # the prompt's slots
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # a batched engine step: two rows at different positions
    table = torch.tensor([[5, 2, 7, 0], [5, 2, 7, 0]], dtype=torch.int32)
    tokens, positions = torch.tensor([3, 9]), torch.tensor([11, 6])
    steps = [forward(m, c, tokens, positions, table) for m, (c, _) in
             zip((plain, fast), caches, strict=True)]  # fmt: skip
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-4)
    want = generate_monolithic(plain, prompt, 6, block_size=4)
    assert generate_monolithic(fast, prompt, 6, block_size=4) == want

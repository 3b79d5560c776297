"""Packed, chunked prefill of concurrent prompts against the model's own one-prompt prefill."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from kvbridge.connector.serving.engine import prefill_batch as pbm
from kvbridge.connector.serving.engine.prefill_batch import PrefillBatcher, _causal_sdpa, _Job
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, allocate_cache, blocks_needed
from kvbridge.connector.serving.model.llama import layer_name

CFG = ModelConfig(
    num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=300, seed=5,
)  # fmt: skip
BS = 4


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel.random(CFG)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()


def _kv(cache, blocks: list[int], n: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = cache.kv(layer_name(i))
    ids = torch.tensor(blocks)
    return k[ids].flatten(0, 1)[:n], v[ids].flatten(0, 1)[:n]


def test_concurrent_chunked_prefills_equal_single_prefill(model):
    cache = allocate_cache(model, "packed", 64, BS, seed=1)
    ref_cache = allocate_cache(model, "nhd", 64, BS, seed=2)
    batcher = PrefillBatcher(model, cache, chunk_tokens=8, max_prompts=3)
    lengths = [1, 5, 23, 9, 40, 2]
    prompts = [_prompt(n, 10 + i) for i, n in enumerate(lengths)]
    blocks, start = [], 0
    for n in lengths:
        blocks.append(list(range(start, start + blocks_needed(n, BS))))
        start += blocks_needed(n, BS)
    got: dict[int, torch.Tensor] = {}
    firsts: dict[int, int] = {}

    def run(i: int) -> None:
        got[i], firsts[i] = batcher.prefill(prompts[i], blocks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert batcher.forwards < sum(-(-n // 8) for n in lengths)  # forwards were shared
    for i, p in enumerate(prompts):
        want = model.prefill(p, ref_cache, blocks[i])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
        assert int(got[i].argmax()) == int(want.argmax()) == firsts[i]
        for layer in range(CFG.num_layers):
            for a, b in zip(_kv(cache, blocks[i], len(p), layer),
                            _kv(ref_cache, blocks[i], len(p), layer), strict=True):  # fmt: skip
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_short_prompt_is_not_stalled_by_a_long_one(model):
    cache = allocate_cache(model, "nhd", 128, BS)
    batcher = PrefillBatcher(model, cache, chunk_tokens=16)
    order: list[str] = []
    long_started = threading.Event()

    def run(name: str, n: int, blocks: list[int]) -> None:
        if name == "long":
            long_started.set()
        batcher.prefill(_prompt(n, 3), blocks)
        order.append(name)

    t_long = threading.Thread(target=run, args=("long", 200, list(range(50))))
    t_long.start()
    long_started.wait(5)
    while batcher.forwards == 0:  # the long prompt's chunks are under way
        threading.Event().wait(0.001)
    t_short = threading.Thread(target=run, args=("short", 3, [100]))
    t_short.start()
    t_short.join(60)
    t_long.join(60)
    assert order == ["short", "long"]


def test_the_daemon_batcher_takes_its_chunk_from_the_config(model):
    """``--prefill-chunk-tokens`` sizes the daemon's forwards; 0 keeps the device default."""
    for given, want in ((6, 6), (0, pbm.CHUNK_TOKENS)):
        cfg = SimpleNamespace(prefill_chunk_tokens=given, max_batch=5)
        rt = SimpleNamespace(model=model, cache=allocate_cache(model, "nhd", 4, BS), cfg=cfg)
        batcher = pbm.prefill_batcher(rt)
        assert (batcher.chunk_tokens, batcher.max_prompts) == (want, 5)
        assert pbm.prefill_batcher(rt) is batcher  # one per runtime
    with pytest.raises(ValueError, match="chunk_tokens"):
        PrefillBatcher(model, rt.cache, chunk_tokens=0)


def test_bad_blocks_are_refused(model):
    batcher = PrefillBatcher(model, allocate_cache(model, "nhd", 4, BS))
    with pytest.raises(ValueError, match="need 2 blocks"):
        batcher.prefill([1] * 5, [0])
    with pytest.raises(ValueError, match="must lie in"):
        batcher.prefill([1], [9])
    with pytest.raises(ValueError, match="at least one"):
        batcher.prefill([], [0])


def test_a_caller_that_gives_up_leaves_the_batch_and_its_blocks_untouched(model):
    """A timed-out or gone caller gets None, and no later forward writes its blocks."""
    cache = allocate_cache(model, "packed", 64, BS, seed=3)
    batcher = PrefillBatcher(model, cache, chunk_tokens=4, max_prompts=2)
    long_blocks = list(range(0, blocks_needed(200, BS)))
    assert batcher.prefill(_prompt(200, 1), long_blocks, timeout=0.0) is None
    gone_blocks = [60, 61]
    before = [t.clone() for t in cache.kv(layer_name(0))]
    assert batcher.prefill(_prompt(6, 2), gone_blocks, alive=lambda: False) is None
    after = cache.kv(layer_name(0))
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b[gone_blocks], a[gone_blocks])  # never computed
    # the batcher keeps serving: a later prompt equals the model's own prefill
    ref_cache = allocate_cache(model, "nhd", 64, BS, seed=4)
    p = _prompt(9, 3)
    got = batcher.prefill(p, [62, 63, 50])[0]
    torch.testing.assert_close(got, model.prefill(p, ref_cache, [62, 63, 50]), rtol=1e-5, atol=1e-5)
    with batcher._cond:
        assert batcher._jobs == []


def test_causal_sdpa_of_a_whole_prompt_equals_the_explicit_attention():
    """The CUDA path's one SDPA call per prompt (here on the CPU, float64) against
    softmax(q k^T) v with the causal mask and the GQA head groups spelled out."""
    g = torch.Generator().manual_seed(9)
    t, hq, hkv, d = 11, 6, 2, 8
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    got = _causal_sdpa(q, k, v, 3, 7, 0.3)  # rows 3..9: one prompt packed among others
    qs, ks, vs = q[3:10], k[3:10].repeat_interleave(3, 1), v[3:10].repeat_interleave(3, 1)
    scores = torch.einsum("qhd,khd->hqk", qs, ks) * 0.3
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention needs CUDA")
@pytest.mark.skipif(pbm._VARLEN_CAUSAL is None, reason="this torch's varlen_attn does not fit")
def test_varlen_forward_equals_one_sdpa_call_per_prompt():
    """CUDA, bf16: the packed forward whose prompts attend in one varlen call per layer
    against the same forward with one SDPA call per prompt (logits and argmax)."""
    model = LlamaModel.random(CFG, device="cuda", dtype=torch.bfloat16)
    cache = allocate_cache(model, "packed", 64, BS, seed=1)
    batcher = PrefillBatcher.__new__(PrefillBatcher)  # the forward alone, no thread
    lengths, plan, start = [1, 5, 23, 9, 40, 2], [], 0
    for i, n in enumerate(lengths):
        job = _Job(_prompt(n, 10 + i), list(range(start, start + blocks_needed(n, BS))))
        plan.append((job, n))
        start += len(job.blocks)
    out = {}
    for varlen in (False, True):
        batcher.model, batcher.cache, batcher.varlen = model, cache, varlen
        out[varlen] = torch.stack(batcher._forward(plan)).float()
    assert batcher.varlen  # the varlen call ran (a failure would have turned it off)
    torch.testing.assert_close(out[True], out[False], rtol=2e-2, atol=2e-2)
    assert torch.equal(out[True].argmax(-1), out[False].argmax(-1))

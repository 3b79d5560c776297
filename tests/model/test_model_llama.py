"""The paged Llama model against an independent float64 dense forward."""

from __future__ import annotations

import json

import pytest
import torch
from kvbridge.connector.serving.model import (
    ByteTokenizer,
    LlamaModel,
    ModelConfig,
    allocate_cache,
    generate_monolithic,
    load_hf_checkpoint,
)
from kvbridge.topology.layouts import GQA_LAYOUTS
from llama_dense_reference import dense_greedy, dense_logits
from llama_weights import llama_tensors

CFG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=96,
    vocab_size=300,
    seed=7,
)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel.random(CFG)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()


@pytest.mark.parametrize("layout", GQA_LAYOUTS)
def test_prefill_writes_kv_in_place_and_matches_dense(model, layout):
    bs, prompt = 4, _prompt(11, 1)
    cache = allocate_cache(model, layout, num_blocks=8, block_size=bs, seed=3)
    before = [b.clone() for b in cache.backing]
    blocks = [6, 1, 4]  # scattered, out of order
    logits = model.prefill(prompt, cache, blocks)
    ref_logits, ref_kv = dense_logits(model.w, CFG, prompt)
    torch.testing.assert_close(logits.double(), ref_logits[-1], rtol=1e-4, atol=1e-4)
    for i, (rk, rv) in enumerate(ref_kv):
        k, v = cache.kv(f"layer{i}")
        for t in range(len(prompt)):
            torch.testing.assert_close(
                k[blocks[t // bs], t % bs].double(), rk[t], rtol=1e-4, atol=1e-4
            )
            torch.testing.assert_close(
                v[blocks[t // bs], t % bs].double(), rv[t], rtol=1e-4, atol=1e-4
            )
    # nothing outside the prompt's slots changed
    touched = {(blocks[t // bs], t % bs) for t in range(len(prompt))}
    changed = sum(int((a != b).sum()) for a, b in zip(cache.backing, before, strict=True))
    per_slot = CFG.num_kv_heads * CFG.head_dim * 2 * CFG.num_layers
    assert changed == len(touched) * per_slot


def test_greedy_equals_dense_and_is_layout_independent(model):
    prompt = _prompt(9, 2)
    want = dense_greedy(model.w, CFG, prompt, 6)
    for layout in GQA_LAYOUTS:
        got = generate_monolithic(model, prompt, 6, layout=layout, block_size=4)
        assert got == want, layout


def test_decode_step_batch_matches_dense(model):
    prompts = [_prompt(5, 3), _prompt(9, 4)]
    cache = allocate_cache(model, "packed", num_blocks=8, block_size=4, seed=5)
    tables = [[0, 2, 4], [1, 3, 5]]
    nxt = [int(model.prefill(p, cache, t).argmax()) for p, t in zip(prompts, tables, strict=True)]
    logits = model.decode_step(
        nxt, [len(p) for p in prompts], cache, torch.tensor(tables, dtype=torch.int32)
    )
    for b, p in enumerate(prompts):
        ref, _ = dense_logits(model.w, CFG, [*p, nxt[b]])
        torch.testing.assert_close(logits[b].double(), ref[-1], rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused(model):
    cache = allocate_cache(model, "nhd", num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="at least one"):
        model.prefill([], cache, [0])
    with pytest.raises(ValueError, match="token ids"):
        model.prefill([CFG.vocab_size], cache, [0])
    with pytest.raises(ValueError, match="blocks"):
        model.prefill(list(range(9)), cache, [0, 1])
    with pytest.raises(ValueError, match="block ids"):
        model.prefill([1, 2], cache, [4])
    one_layer = LlamaModel.random(ModelConfig(**{**CFG.to_dict(), "num_layers": 1}))
    with pytest.raises(ValueError, match=r"no layer 'layer1'"):
        model.check_cache(allocate_cache(one_layer, "nhd", 4, 4))
    more_heads = LlamaModel.random(ModelConfig(**{**CFG.to_dict(), "num_kv_heads": 4}))
    with pytest.raises(ValueError, match=r"expected \(blocks, tokens, 2, 16\)"):
        model.check_cache(allocate_cache(more_heads, "hnd", 4, 4))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=0)


def _write_checkpoint(path, cfg: ModelConfig, tie: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    h, q, kv, f = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    t = llama_tensors(r, vocab=cfg.vocab_size, hidden=h, q=q, kv=kv, inter=f, layers=cfg.num_layers)
    if not tie:
        t["lm_head.weight"] = r(cfg.vocab_size, h)
    half = len(t) // 2  # two shards
    names = sorted(t)
    save_file(
        {k: t[k].to(torch.bfloat16) for k in names[:half]},
        str(path / "model-00001-of-00002.safetensors"),
    )
    save_file(
        {k: t[k].to(torch.bfloat16) for k in names[half:]},
        str(path / "model-00002-of-00002.safetensors"),
    )
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": h,
                "intermediate_size": f,
                "num_attention_heads": cfg.num_heads,
                "num_key_value_heads": cfg.num_kv_heads,
                "num_hidden_layers": cfg.num_layers,
                "vocab_size": cfg.vocab_size,
                "rms_norm_eps": 1e-6,
                "rope_theta": 500000.0,
                "tie_word_embeddings": tie,
                "torch_dtype": "bfloat16",
            }
        )
    )
    return {k: v.to(torch.bfloat16).to(torch.float64) for k, v in t.items()}


@pytest.mark.parametrize("tie", [False, True])
def test_hf_checkpoint_loads_and_generates_like_dense(tmp_path, tie):
    want_cfg = ModelConfig(
        num_layers=2,
        hidden_size=48,
        num_heads=6,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=80,
        vocab_size=320,
    )
    tensors = _write_checkpoint(tmp_path, want_cfg, tie)
    cfg, w = load_hf_checkpoint(tmp_path)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (
        2,
        6,
        2,
        8,
        500000.0,
    )
    assert torch.equal(w.layers[1].wk.double(), tensors["model.layers.1.self_attn.k_proj.weight"])
    lm = tensors["model.embed_tokens.weight"] if tie else tensors["lm_head.weight"]
    assert torch.equal(w.lm_head.double(), lm)
    m = LlamaModel(cfg, w)
    prompt = ByteTokenizer(cfg.vocab_size).encode("hi there")
    assert generate_monolithic(m, prompt, 5, layout="hnd", block_size=4) == dense_greedy(
        w, cfg, prompt, 5
    )


def test_hf_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_checkpoint(tmp_path)
    cfg = ModelConfig(
        num_layers=1,
        hidden_size=16,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        intermediate_size=32,
        vocab_size=300,
    )
    _write_checkpoint(tmp_path, cfg, tie=False)
    spec = json.loads((tmp_path / "config.json").read_text())
    spec["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"model\.layers\.1\."):
        load_hf_checkpoint(tmp_path)
    spec["num_hidden_layers"], spec["intermediate_size"] = 1, 33
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="shape"):
        load_hf_checkpoint(tmp_path)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(300)
    ids = tok.encode("héllo ✓")
    assert ids[0] == tok.bos_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids[1:]) == "héllo ✓"
    assert tok.decode([104, 299, 105]) == "h<299>i"
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(256)


def test_detokenizer_never_splits_a_character():
    tok = ByteTokenizer(300)
    text = "a é ✓ 日本 🙂!"
    ids = list(text.encode("utf-8"))
    det = tok.stream()
    pieces = [det.push(i) for i in ids]
    assert "".join(pieces) + det.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[ids.index(0xF0)] == ""  # the emoji's first byte alone prints nothing
    cut = tok.stream()  # a stream ending mid-character flushes a replacement character
    assert [cut.push(i) for i in "✓".encode()[:2]] == ["", ""] and cut.flush() == "\ufffd"


def test_decode_refuses_a_peer_of_another_model_or_vocabulary():
    import grpc
    from kvbridge.connector.serving.daemon.decode_checks import RequestFailedError, check_peer_model
    from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb

    m = LlamaModel.random(CFG)
    check_peer_model(m, pb.KVHandle(model_id=m.identity, first_token_id=CFG.vocab_size - 1), "p")
    for handle, message in (
        (pb.KVHandle(model_id="other@00", first_token_id=1), "serves other@00"),
        (pb.KVHandle(first_token_id=1), "an unnamed model"),
        (pb.KVHandle(model_id=m.identity, first_token_id=CFG.vocab_size), "outside this model"),
    ):
        with pytest.raises(RequestFailedError, match=message) as err:
            check_peer_model(m, handle, "p")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION

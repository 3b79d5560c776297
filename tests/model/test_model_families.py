"""Every family and config form against transformers itself (in process, float32 and bf16)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, allocate_cache
from kvbridge.connector.serving.model.config import ModelConfigError
from kvbridge.connector.serving.model.identity import same_model
from kvbridge.connector.serving.model.llama import rms_norm
from kvbridge.connector.serving.model.weights import load_hf_checkpoint
from kvbridge.topology.layouts import GQA_LAYOUTS

pytest.importorskip("transformers")
from hf_checkpoints import BY_NAME, CASES, make_checkpoint


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n,), generator=g).tolist()


def _hf_steps(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy ``generate``: tokens and the logits of every step."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), [lg[0] for lg in out.logits]


def _ours(m: LlamaModel, prompt: list[int], n: int, layout: str, bs: int):
    nb = -(-(len(prompt) + n) // bs) + 1
    cache = allocate_cache(m, layout, nb, bs, seed=1)
    blocks = list(range(nb))[::-1]  # out of order
    table = torch.tensor([blocks], dtype=torch.int32)
    logits = [m.prefill(prompt, cache, blocks)]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < n:
        logits.append(m.decode_step([tokens[-1]], [len(prompt) + len(tokens) - 1], cache, table)[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_family_and_config_form_equal_transformers(tmp_path, case):
    i = CASES.index(case)
    ref = make_checkpoint(tmp_path, case, seed=100 + i)
    cfg, w = load_hf_checkpoint(tmp_path)
    assert cfg.family == case.family and cfg.rope_type == case.rope["rope_type"]
    assert cfg.rope_theta == case.rope["rope_theta"]
    window = getattr(ref.config, "sliding_window", None)
    types = getattr(ref.config, "layer_types", None)
    assert cfg.sliding_window == (None if types and "sliding_attention" not in types else window)
    m = LlamaModel(cfg, w)
    prompt = _prompt(14, i)  # past max_position_embeddings (dynamic), past the window
    want, want_logits = _hf_steps(ref, prompt, 10)
    got, got_logits = _ours(m, prompt, 10, GQA_LAYOUTS[i % len(GQA_LAYOUTS)], 4)
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sliding_window_changes_the_answer(tmp_path):
    """The window case is a real test: full attention gives other logits."""
    case = BY_NAME["mistral-window-v5"]
    make_checkpoint(tmp_path, case)
    cfg, w = load_hf_checkpoint(tmp_path)
    assert cfg.sliding_window == 5
    full = ModelConfig(**{**cfg.to_dict(), "sliding_window": None})
    prompt = _prompt(12, 9)
    a = _ours(LlamaModel(cfg, w), prompt, 3, "nhd", 4)[1]
    b = _ours(LlamaModel(full, w), prompt, 3, "nhd", 4)[1]
    assert (a[0] - b[0]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_bitwise_like_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 64, generator=g) * 30).to(dtype)
    ref = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        assert torch.equal(rms_norm(x, ref.weight, 1e-6), ref(x))


def test_bfloat16_model_matches_transformers(tmp_path):
    case = BY_NAME["qwen3-v5"]
    ref = make_checkpoint(tmp_path, case, seed=5).to(torch.bfloat16)
    cfg, w = load_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    prompt = _prompt(9, 4)
    want, want_logits = _hf_steps(ref, prompt, 6)
    got, got_logits = _ours(LlamaModel(cfg, w), prompt, 6, "hnd", 4)
    assert got_logits[0].dtype == torch.bfloat16
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(
            got_logits[step].float(), want_logits[step], rtol=0.03, atol=0.05
        )
        if a != b:  # only a bf16 near-tie may pick another token (then the paths part)
            top2 = want_logits[step].topk(2).values
            assert step > 0 and float(top2[0] - top2[1]) < 0.1, (step, got, want)
            break


def _edit(path, **changes):
    spec = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    (path / "config.json").write_text(json.dumps(spec))


REFUSALS = [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported"),
    ({"architectures": ["LlamaForSequenceClassification"]}, r"architectures .* not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     r"rope type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"missing factor"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8,
      "low_freq_factor": 1, "high_freq_factor": 4, "beta": 2}}, r"unknown beta"),
    ({"rope_parameters": None, "rope_scaling": {"type": "su", "factor": 2}},
     r"rope type 'su' is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "awq"}}, r"quantized"),
    ({"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 4,
      "layer_types": None}, r"mixes sliding-window and full-attention"),
]  # fmt: skip


@pytest.mark.parametrize("changes,message", REFUSALS)
def test_unsupported_configs_are_refused(tmp_path, changes, message):
    make_checkpoint(tmp_path, BY_NAME["qwen2-v5"] if "use_sliding_window" in changes
                    else BY_NAME["llama-default-v5"])  # fmt: skip
    _edit(tmp_path, **changes)
    with pytest.raises(ModelConfigError, match=message):
        load_hf_checkpoint(tmp_path)


def test_unconsumed_and_missing_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    make_checkpoint(tmp_path, BY_NAME["qwen3-v5"])
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    extra = dict(tensors) | {"model.layers.0.self_attn.sinks": torch.zeros(4)}
    save_file(extra, str(f))
    with pytest.raises(ModelConfigError, match=r"self_attn\.sinks is not used by the qwen3"):
        load_hf_checkpoint(tmp_path)
    # a Qwen3 checkpoint read as Qwen2: its q/k norms would be dropped, its biases missing
    save_file(tensors, str(f))
    _edit(tmp_path, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    with pytest.raises(
        ModelConfigError, match=r"lacks tensor model\.layers\.0\.self_attn\.q_proj\.bias"
    ):
        load_hf_checkpoint(tmp_path)
    _edit(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(
        ModelConfigError, match=r"k_norm\.weight \(and 3 more\) is not used by the llama"
    ):
        load_hf_checkpoint(tmp_path)


def test_model_identity(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_checkpoint(a, BY_NAME["llama-default-v5"], seed=1)
    make_checkpoint(b, BY_NAME["llama-default-v5"], seed=2)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    ids = [LlamaModel(*load_hf_checkpoint(p), name=p.name).identity for p in (a, copy, b)]
    assert ids[0].startswith("a@") and ids[1].startswith("copy@")
    assert same_model(ids[0], ids[1]) and not same_model(ids[0], ids[2])
    assert not same_model(ids[0], "") and not same_model("", "")
    base = ModelConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16)
    same = [LlamaModel.random(base).identity, LlamaModel.random(base).identity]
    seed = LlamaModel.random(ModelConfig(**{**base.to_dict(), "seed": 1})).identity
    hidden = LlamaModel.random(ModelConfig(**{**base.to_dict(), "hidden_size": 48})).identity
    assert same[0] == same[1] and len({same[0], seed, hidden}) == 3
    assert not same_model(same[0], seed) and not same_model(same[0], hidden)


def test_every_registered_family_and_rope_type_is_tested():
    from kvbridge.connector.serving.model import FAMILIES
    from kvbridge.connector.serving.model.rope import ROPE_TYPES

    assert {c.family for c in CASES} == set(FAMILIES)
    assert {c.rope["rope_type"] for c in CASES} == set(ROPE_TYPES)
    assert {c.form for c in CASES} == {"v4", "v5"}


def test_identity_samples_large_tensors_to_their_last_element():
    from kvbridge.connector.serving.model.identity import SAMPLES, _sample

    t = torch.zeros(2**25 + 7, dtype=torch.bfloat16)  # float positions would round past the end
    t[-1] = 5
    got = torch.frombuffer(bytearray(_sample(t)), dtype=torch.float32)
    assert got.numel() == SAMPLES and got[-1] == 5 and got[:-1].abs().sum() == 0

"""Tiny seeded Hugging Face checkpoints of every family and config form, made with transformers.

``make_checkpoint(path, case)`` builds the transformers model of ``case``, draws its
weights from a seeded generator (at scales that give well separated logits), saves
it with ``save_pretrained`` and, for the 4.x config form, rewrites ``config.json``
the way transformers 4.x checkpoints on the hub spell rope settings. It returns the
transformers model itself: the independent reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=300,
)


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # llama, mistral, qwen2, qwen3
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    form: str = "v5"  # v5: rope_parameters; v4: rope_theta + rope_scaling
    extra: dict = field(default_factory=dict)
    tie: bool = False


CASES = [
    Case("llama-default-v5", "llama", {"rope_type": "default", "rope_theta": 500000.0}),
    Case("llama-default-v4-tied", "llama", {"rope_type": "default", "rope_theta": 500000.0},
         "v4", tie=True),
    Case("llama-llama3-v5", "llama", {"rope_type": "llama3", "rope_theta": 500000.0,
         "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8}),
    Case("llama-llama3-v4", "llama", {"rope_type": "llama3", "rope_theta": 500000.0,
         "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8}, "v4"),
    Case("llama-linear-v4", "llama", {"rope_type": "linear", "rope_theta": 10000.0,
         "factor": 4.0}, "v4"),
    Case("llama-dynamic-v5", "llama", {"rope_type": "dynamic", "rope_theta": 10000.0,
         "factor": 2.0}, extra={"max_position_embeddings": 12}),
    Case("llama-dynamic-v4", "llama", {"rope_type": "dynamic", "rope_theta": 10000.0,
         "factor": 3.0}, "v4", extra={"max_position_embeddings": 10}),
    Case("llama-yarn-v5", "llama", {"rope_type": "yarn", "rope_theta": 10000.0,
         "factor": 4.0, "original_max_position_embeddings": 8},
         extra={"max_position_embeddings": 32}),
    Case("llama-bias-v5", "llama", extra={"attention_bias": True, "mlp_bias": True}),
    Case("mistral-window-v5", "mistral", extra={"sliding_window": 5}),
    Case("qwen2-v5", "qwen2", {"rope_type": "default", "rope_theta": 1000000.0}, tie=True),
    Case("qwen2-v4", "qwen2", {"rope_type": "default", "rope_theta": 1000000.0}, "v4"),
    Case("qwen2-window-v5", "qwen2", extra={"use_sliding_window": True, "sliding_window": 6,
         "max_window_layers": 0}),
    Case("qwen2-window-off-v5", "qwen2", extra={"use_sliding_window": True, "sliding_window": 6,
         "max_window_layers": 2}),
    Case("qwen3-v5", "qwen3"),
    Case("qwen3-yarn-v4", "qwen3", {"rope_type": "yarn", "rope_theta": 1000000.0,
         "factor": 4.0, "original_max_position_embeddings": 8}, "v4",
         extra={"max_position_embeddings": 32}),
]  # fmt: skip
BY_NAME = {c.name: c for c in CASES}


def _classes(family: str):
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[family]


def build_model(case: Case, seed: int = 0, eos: int | None = None):
    """The transformers model of ``case`` with seeded weights (float32, eval mode)."""
    config_cls, model_cls = _classes(case.family)
    kw = dict(SIZES) | {"max_position_embeddings": 64, "tie_word_embeddings": case.tie}
    kw |= case.extra | {"rope_parameters": dict(case.rope)}
    kw |= {"eos_token_id": eos, "bos_token_id": None, "pad_token_id": None}
    config = config_cls(**kw)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def to_v4_form(config_path: Path) -> None:
    """Rewrite a transformers >= 5 ``config.json`` in the 4.x form of rope settings."""
    spec = json.loads(config_path.read_text())
    rp = spec.pop("rope_parameters")
    spec["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") in ("linear", "dynamic"):  # Llama 2 era: key "type"
        rp["type"] = rp.pop("rope_type")
    if rp.get("rope_type", rp.get("type", "default")) != "default":
        spec["rope_scaling"] = rp
    config_path.write_text(json.dumps(spec, indent=2))


def make_checkpoint(path: Path, case: Case, seed: int = 0, eos: int | None = None):
    """Save ``case`` (seeded) to ``path``; returns the transformers model (the reference)."""
    model = build_model(case, seed, eos)
    model.save_pretrained(path)
    if case.form == "v4":
        to_v4_form(path / "config.json")
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` (stops at the model's EOS, if any)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt) :].tolist()


def save_tokenizer(path: Path, vocab_size: int = 290):
    """A byte-level BPE ``tokenizer.json`` (BOS ``<s>`` prepended) trained on a few lines;
    returns transformers' fast tokenizer over it (the reference for encode/decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog", "héllo wörld ✓ 日本語 the end"] * 20
    tok.train_from_iterator(text, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tok.save(str(path / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")

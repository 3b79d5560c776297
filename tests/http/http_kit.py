"""Helpers of the HTTP API tests: a tiny Llama checkpoint with a chat template, the
monolithic reference of the same weights, and the byte tokenizer's texts."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from kvbridge.connector.serving.model import (
    ByteTokenizer,
    LlamaModel,
    generate_monolithic,
    load_hf_checkpoint,
)
from llama_weights import llama_tensors

BLOCK_SIZE = 16
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
    "vocab_size": 320, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}  # fmt: skip
# A Llama-style template: special tokens, a loop, raise_exception, the generation prompt
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_checkpoint(root: Path, seed: int, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """config.json + model.safetensors (random float32 weights of ``seed``) +
    tokenizer_config.json (bos as an AddedToken dict, as Hugging Face writes it)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    c = HF_CONFIG
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    t = llama_tensors(r, vocab=v, hidden=h, q=q, kv=kv, inter=f,
                      layers=c["num_hidden_layers"])  # fmt: skip
    t["lm_head.weight"] = r(v, h)
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(c))
    tok_cfg = {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "__type": "AddedToken"},
        "eos_token": "</s>",
    }  # fmt: skip
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    (root / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return root


class Reference:
    """Greedy tokens of the checkpoint run in one process (the ground truth)."""

    def __init__(self, root: Path) -> None:
        cfg, weights = load_hf_checkpoint(root)
        self.model = LlamaModel(cfg, weights, attention_backend="torch")
        self.tok = ByteTokenizer(cfg.vocab_size)

    @functools.cache  # noqa: B019 (one per module fixture)
    def tokens(self, prompt: str, n: int) -> tuple[int, ...]:
        ids = self.tok.encode(prompt)
        return tuple(generate_monolithic(self.model, ids, n, block_size=BLOCK_SIZE))

    def texts(self, ids) -> list[str]:
        """Per-token texts, as the daemon streams them when ``ids`` end the generation:
        incremental detokenization (a character's bytes are held back until complete),
        what is still held added to the last."""
        d = self.tok.stream()
        out = [d.push(i) for i in ids]
        if out:
            out[-1] += d.flush()
        return out

    def text(self, prompt: str, n: int) -> str:
        return "".join(self.texts(self.tokens(prompt, n)))

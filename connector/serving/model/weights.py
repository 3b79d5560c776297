"""Model weights: seeded random ones, or a local Hugging Face Llama safetensors checkpoint.

Matrices are stored as ``(out_features, in_features)`` (the Hugging Face
convention), so a projection is ``x @ w.T``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from kvbridge.connector.serving.model.config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    wq: torch.Tensor  # (num_heads * head_dim, hidden)
    wk: torch.Tensor  # (num_kv_heads * head_dim, hidden)
    wv: torch.Tensor  # (num_kv_heads * head_dim, hidden)
    wo: torch.Tensor  # (hidden, num_heads * head_dim)
    post_norm: torch.Tensor  # (hidden,)
    w_gate: torch.Tensor  # (intermediate, hidden)
    w_up: torch.Tensor  # (intermediate, hidden)
    w_down: torch.Tensor  # (hidden, intermediate)


@dataclass
class ModelWeights:
    embed: torch.Tensor  # (vocab, hidden)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (hidden,)
    lm_head: torch.Tensor  # (vocab, hidden)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every per-layer field of ``LayerWeights``."""
    h, q, kv, f = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    return {
        "input_norm": (h,),
        "wq": (q, h),
        "wk": (kv, h),
        "wv": (kv, h),
        "wo": (h, q),
        "post_norm": (h,),
        "w_gate": (f, h),
        "w_up": (f, h),
        "w_down": (h, f),
    }


def random_weights(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ModelWeights:
    """Weights drawn from a generator seeded with ``cfg.seed`` (same seed, same weights)."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def mat(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    layers = []
    for _ in range(cfg.num_layers):
        shapes = expected_shapes(cfg)
        fields = {
            name: norm(shape[0]) if len(shape) == 1 else mat(*shape)
            for name, shape in shapes.items()
        }
        layers.append(LayerWeights(**fields))
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen)
    weights = ModelWeights(
        embed=embed,
        layers=layers,
        norm=norm(cfg.hidden_size),
        lm_head=mat(cfg.vocab_size, cfg.hidden_size),
    )
    return _to(weights, dtype, device)


_HF_LAYER_KEYS = {
    "input_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def config_from_hf(hf: dict, seed: int = 0) -> ModelConfig:
    """``ModelConfig`` from a Hugging Face Llama ``config.json`` dict."""
    missing = [
        k
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_hidden_layers",
            "vocab_size",
        )
        if k not in hf
    ]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    if hf.get("rope_scaling"):
        raise ValueError(f"config.json rope_scaling {hf['rope_scaling']!r} is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json attention_bias/mlp_bias are not supported")
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        intermediate_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        seed=seed,
    )


def load_hf_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[ModelConfig, ModelWeights]:
    """Load a local Hugging Face Llama checkpoint (``config.json`` + ``*.safetensors``)."""
    from safetensors.torch import load_file  # optional dependency (kvbridge[model])

    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model path {root} has no config.json")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model path {root} has no *.safetensors files")
    hf = json.loads(cfg_path.read_text())
    cfg = config_from_hf(hf)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in tensors:
            raise ValueError(f"checkpoint {root} lacks tensor {key}")
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"checkpoint tensor {key} has shape {tuple(t.shape)}, expected {shape}"
            )
        return t

    shapes = expected_shapes(cfg)
    layers = [
        LayerWeights(
            **{
                name: take(f"model.layers.{i}.{key}", shapes[name])
                for name, key in _HF_LAYER_KEYS.items()
            }
        )
        for i in range(cfg.num_layers)
    ]
    embed = take("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    if "lm_head.weight" in tensors:
        lm_head = take("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    elif hf.get("tie_word_embeddings", False):
        lm_head = embed
    else:
        raise ValueError(f"checkpoint {root} lacks lm_head.weight and does not tie embeddings")
    weights = ModelWeights(
        embed=embed,
        layers=layers,
        norm=take("model.norm.weight", (cfg.hidden_size,)),
        lm_head=lm_head,
    )
    return cfg, _to(weights, dtype, device)


def _to(w: ModelWeights, dtype: torch.dtype, device: str | torch.device) -> ModelWeights:
    def cv(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return ModelWeights(
        embed=cv(w.embed),
        layers=[LayerWeights(**{k: cv(getattr(lw, k)) for k in _HF_LAYER_KEYS}) for lw in w.layers],
        norm=cv(w.norm),
        lm_head=cv(w.lm_head),
    )

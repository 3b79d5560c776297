"""Model weights: seeded random ones, or a local Hugging Face safetensors checkpoint.

Matrices are stored as ``(out_features, in_features)`` (the Hugging Face
convention), so a projection is ``x @ w.T``. Optional fields (biases, q/k norms)
are ``None`` unless the config's family switches turn them on. The loader consumes
every checkpoint tensor or refuses the checkpoint (no silent drops).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from kvbridge.connector.serving.model.config import ModelConfig, ModelConfigError
from kvbridge.connector.serving.model.families import config_from_hf


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
    bq: torch.Tensor | None = None  # qkv_bias
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None  # o_bias
    b_gate: torch.Tensor | None = None  # mlp_bias
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # qk_norm: (head_dim,)
    k_norm: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor  # (vocab, hidden)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (hidden,)
    lm_head: torch.Tensor  # (vocab, hidden)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every per-layer field of ``LayerWeights`` that ``cfg`` uses."""
    h, q, kv, f, d = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
        cfg.head_dim,
    )
    shapes = {
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
    if cfg.qkv_bias:
        shapes |= {"bq": (q,), "bk": (kv,), "bv": (kv,)}
    if cfg.o_bias:
        shapes["bo"] = (h,)
    if cfg.mlp_bias:
        shapes |= {"b_gate": (f,), "b_up": (f,), "b_down": (h,)}
    if cfg.qk_norm:
        shapes |= {"q_norm": (d,), "k_norm": (d,)}
    return shapes


_NORMS = {"input_norm", "post_norm", "q_norm", "k_norm"}


def random_weights(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ModelWeights:
    """Weights drawn from a generator seeded with ``cfg.seed`` (same seed, same weights)."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def mat(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)

    def vec(name: str, n: int) -> torch.Tensor:
        return (1.0 if name in _NORMS else 0.0) + 0.1 * torch.randn(n, generator=gen)

    layers = []
    for _ in range(cfg.num_layers):
        shapes = expected_shapes(cfg)
        layers.append(
            LayerWeights(**{n: vec(n, s[0]) if len(s) == 1 else mat(*s) for n, s in shapes.items()})
        )
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen)
    weights = ModelWeights(
        embed=embed,
        layers=layers,
        norm=vec("input_norm", cfg.hidden_size),
        lm_head=mat(cfg.vocab_size, cfg.hidden_size),
    )
    return _to(weights, dtype, device)


HF_LAYER_KEYS = {
    "input_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "bo": "self_attn.o_proj.bias",
    "b_gate": "mlp.gate_proj.bias",
    "b_up": "mlp.up_proj.bias",
    "b_down": "mlp.down_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}
# derived buffers some older checkpoints carry: recomputed from the config, so skipped
_DERIVED = ("rotary_emb.inv_freq",)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} must hold a JSON object")
    return data


def read_hf_config(path: str | Path) -> tuple[dict, dict]:
    """``config.json`` and ``generation_config.json`` (empty if absent) of a checkpoint."""
    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model path {root} has no config.json")
    gen_path = root / "generation_config.json"
    return _read_json(cfg_path), _read_json(gen_path) if gen_path.is_file() else {}


def load_hf_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[ModelConfig, ModelWeights]:
    """Load a local Hugging Face checkpoint (``config.json`` + ``*.safetensors``).

    Raises ``ModelConfigError`` for anything the model would not reproduce exactly:
    an unknown family or rope type, a missing or misshaped tensor, a tensor left over.
    """
    from safetensors.torch import load_file  # optional dependency (kvbridge[model])

    root = Path(path)
    hf, generation = read_hf_config(root)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model path {root} has no *.safetensors files")
    cfg = config_from_hf(hf, generation)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    used: set[str] = {k for k in tensors if k.endswith(_DERIVED)}

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in tensors:
            raise ModelConfigError(f"checkpoint {root} lacks tensor {key}")
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ModelConfigError(
                f"checkpoint tensor {key} has shape {tuple(t.shape)}, expected {shape}"
            )
        used.add(key)
        return t

    shapes = expected_shapes(cfg)
    layers = [
        LayerWeights(
            **{
                name: take(f"model.layers.{i}.{HF_LAYER_KEYS[name]}", shape)
                for name, shape in shapes.items()
            }
        )
        for i in range(cfg.num_layers)
    ]
    embed = take("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    tie = bool(hf.get("tie_word_embeddings", False))
    if "lm_head.weight" in tensors:
        lm_head = take("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        if tie and not torch.equal(lm_head, embed):
            raise ModelConfigError(
                f"checkpoint {root} ties embeddings but lm_head.weight differs from them"
            )
    elif tie:
        lm_head = embed
    else:
        raise ModelConfigError(
            f"checkpoint {root} lacks lm_head.weight and does not tie embeddings"
        )
    norm = take("model.norm.weight", (cfg.hidden_size,))
    left = sorted(set(tensors) - used)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise ModelConfigError(
            f"checkpoint tensor {left[0]}{more} is not used by the {cfg.family} model "
            "(unsupported feature)"
        )
    return cfg, _to(ModelWeights(embed, layers, norm, lm_head), dtype, device)


def _to(w: ModelWeights, dtype: torch.dtype, device: str | torch.device) -> ModelWeights:
    def cv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype)

    names = [f.name for f in fields(LayerWeights)]
    embed = cv(w.embed)
    return ModelWeights(
        embed=embed,
        layers=[LayerWeights(**{k: cv(getattr(lw, k)) for k in names}) for lw in w.layers],
        norm=cv(w.norm),
        lm_head=embed if w.lm_head is w.embed else cv(w.lm_head),  # tied: one tensor
    )

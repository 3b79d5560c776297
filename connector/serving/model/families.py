"""Model families: what each Hugging Face ``model_type`` switches on in the one model.

A family is one ``Family`` entry in ``FAMILIES``: the ``model_type`` and
``architectures`` names it accepts and how its ``config.json`` sets the switches of
``ModelConfig`` (attention biases, q/k RMSNorm, sliding window). Everything else is
shared: ``config_from_hf`` reads the common fields in both transformers config forms
and refuses what it does not understand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvbridge.connector.serving.model.config import ModelConfig, ModelConfigError
from kvbridge.connector.serving.model.rope import rope_from_hf


def _flag(key: str) -> Callable[[dict], bool]:
    return lambda hf: bool(hf.get(key, False))


def _never(hf: dict) -> bool:
    return False


def _always(hf: dict) -> bool:
    return True


def _window_always(hf: dict) -> int | None:
    """Mistral: every layer attends over ``sliding_window`` keys (None: full)."""
    return hf.get("sliding_window")


def _window_qwen(hf: dict) -> int | None:
    """Qwen2/3: a window only with ``use_sliding_window``, on layers >= ``max_window_layers``."""
    if not hf.get("use_sliding_window"):
        return None
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", 0)) else "full_attention"
        for i in range(n)
    ]
    if "sliding_attention" not in types:
        return None
    if set(types) != {"sliding_attention"}:
        raise ModelConfigError(
            "config.json mixes sliding-window and full-attention layers; not supported"
        )
    return hf.get("sliding_window")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    qkv_bias: Callable[[dict], bool] = _never
    o_bias: Callable[[dict], bool] = _never
    mlp_bias: Callable[[dict], bool] = _never
    qk_norm: bool = False
    sliding_window: Callable[[dict], int | None] = lambda hf: None
    default_head_dim: int | None = None  # None: hidden_size // num_attention_heads


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama",
            ("llama",),
            ("LlamaForCausalLM",),
            qkv_bias=_flag("attention_bias"),
            o_bias=_flag("attention_bias"),
            mlp_bias=_flag("mlp_bias"),
        ),
        Family("mistral", ("mistral",), ("MistralForCausalLM",), sliding_window=_window_always),
        Family(
            "qwen2", ("qwen2",), ("Qwen2ForCausalLM",), qkv_bias=_always,
            sliding_window=_window_qwen,
        ),
        Family(
            "qwen3", ("qwen3",), ("Qwen3ForCausalLM",), qkv_bias=_flag("attention_bias"),
            o_bias=_flag("attention_bias"), qk_norm=True, sliding_window=_window_qwen,
            default_head_dim=128,
        ),
    )
}  # fmt: skip

_LAYER_TYPES = {"full_attention", "sliding_attention"}


def family_of(hf: dict) -> Family:
    """The family of a ``config.json`` dict; refuses unknown model types and architectures."""
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    if mt is None and isinstance(archs, list):  # model_type absent: the architectures decide
        mt = next((f.model_types[0] for f in FAMILIES.values() if archs and
                   set(archs) <= set(f.architectures)), None)  # fmt: skip
    fam = next((f for f in FAMILIES.values() if mt in f.model_types), None)
    if fam is None:
        known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
        raise ModelConfigError(f"config.json model_type {mt!r} is not supported (known: {known})")
    bad = [a for a in archs if a not in fam.architectures]
    if bad or not isinstance(archs, list):
        raise ModelConfigError(
            f"config.json architectures {archs!r} are not supported for model_type {mt!r} "
            f"(known: {', '.join(fam.architectures)})"
        )
    return fam


def eos_ids(*sources: dict) -> tuple[int, ...]:
    """EOS ids from the first source that names any (generation_config.json, config.json)."""
    for src in sources:
        eos = src.get("eos_token_id")
        if eos is None:
            continue
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ModelConfigError(f"eos_token_id {eos!r} is not a token id or a list of them")
        return tuple(ids)
    return ()


def config_from_hf(hf: dict, generation: dict | None = None) -> ModelConfig:
    """``ModelConfig`` from a Hugging Face ``config.json`` dict (4.x or >= 5 form)."""
    fam = family_of(hf)
    need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "vocab_size")  # fmt: skip
    missing = [k for k in need if k not in hf]
    if missing:
        raise ModelConfigError(f"config.json lacks {', '.join(missing)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"config.json hidden_act {act!r} is not supported (only silu)")
    if hf.get("quantization_config"):
        raise ModelConfigError("config.json quantization_config: quantized checkpoints are not "
                               "supported")  # fmt: skip
    types = hf.get("layer_types") or []
    if set(types) - _LAYER_TYPES:
        raise ModelConfigError(f"config.json layer_types {sorted(set(types))} are not supported")
    theta, rope_type, params = rope_from_hf(hf)
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or fam.default_head_dim or int(hf["hidden_size"]) // heads
    window = fam.sliding_window(hf)
    return ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        family=fam.name,
        rope_type=rope_type,
        rope_params=params,
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        sliding_window=None if window is None else int(window),
        qkv_bias=fam.qkv_bias(hf),
        o_bias=fam.o_bias(hf),
        mlp_bias=fam.mlp_bias(hf),
        qk_norm=fam.qk_norm,
        eos_token_ids=eos_ids(generation or {}, hf),
    )

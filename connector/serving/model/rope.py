"""Rotary position embeddings as transformers computes them, one entry per rope type.

``ROPE_TYPES`` maps a ``rope_type`` to the parameters it needs and a function
``inv_freq(cfg, seq_len) -> (inv_freq float32 (head_dim/2,), attention_scaling)``.
``seq_len`` matters only for ``dynamic`` (NTK scaling grows with the sequence:
transformers recomputes it from the largest position of each forward call).
``rope_from_hf`` reads both config forms: transformers >= 5 ``rope_parameters``
and the 4.x top-level ``rope_theta`` + ``rope_scaling``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def _base(cfg) -> torch.Tensor:
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def _default(cfg, seq_len: int) -> tuple[torch.Tensor, float]:
    return _base(cfg), 1.0


def _linear(cfg, seq_len: int) -> tuple[torch.Tensor, float]:
    return _base(cfg) / cfg.rope_params["factor"], 1.0


def _dynamic(cfg, seq_len: int) -> tuple[torch.Tensor, float]:
    d, p, mpe = cfg.head_dim, cfg.rope_params, cfg.max_position_embeddings
    seq_len = max(seq_len, mpe)
    factor = p["factor"]
    base = cfg.rope_theta * ((factor * seq_len / mpe) - (factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0


def _llama3(cfg, seq_len: int) -> tuple[torch.Tensor, float]:
    p = cfg.rope_params
    inv = _base(cfg)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
    low_wl, high_wl = old / low, old / high
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
    return torch.where(medium, smoothed, out), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg, seq_len: int) -> tuple[torch.Tensor, float]:
    p, d, base = cfg.rope_params, cfg.head_dim, cfg.rope_theta
    old = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
    factor = p.get("factor") or cfg.max_position_embeddings / old
    attn = p.get("attention_factor")
    if attn is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = (
            float(_yarn_mscale(factor, ms) / _yarn_mscale(factor, ms_all))
            if ms and ms_all
            else _yarn_mscale(factor)
        )
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr(rot: float) -> float:
        return (d * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr(fast), corr(slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos = base ** (torch.arange(0, d, 2).float() / d)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv, float(attn)


@dataclass(frozen=True)
class RopeType:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    inv_freq: Callable[..., tuple[torch.Tensor, float]]
    dynamic: bool = False


_ORIG = "original_max_position_embeddings"
ROPE_TYPES: dict[str, RopeType] = {
    "default": RopeType((), (), _default),
    "linear": RopeType(("factor",), (), _linear),
    "dynamic": RopeType(("factor",), (), _dynamic, dynamic=True),
    "llama3": RopeType(("factor", "low_freq_factor", "high_freq_factor"), (_ORIG,), _llama3),
    "yarn": RopeType(
        ("factor",),
        (
            _ORIG,
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ),
        _yarn,
    ),
}
_SHARED = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def check_rope(rope_type: str, params: dict) -> None:
    """Raise ``ModelConfigError`` for an unknown rope type or parameter."""
    from kvbridge.connector.serving.model.config import ModelConfigError

    spec = ROPE_TYPES.get(rope_type)
    if spec is None:
        raise ModelConfigError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    missing = [k for k in spec.required if params.get(k) is None]
    unknown = sorted(set(params) - set(spec.required) - set(spec.optional))
    if missing or unknown:
        what = ", ".join([f"missing {k}" for k in missing] + [f"unknown {k}" for k in unknown])
        raise ModelConfigError(f"rope type {rope_type!r}: {what}")


def rope_from_hf(hf: dict) -> tuple[float, str, dict]:
    """``(rope_theta, rope_type, params)`` from a ``config.json`` of either form."""
    from kvbridge.connector.serving.model.config import ModelConfigError

    rp = hf.get("rope_parameters")
    if rp is not None and not isinstance(rp, dict):
        raise ModelConfigError(f"config.json rope_parameters must be a mapping, got {rp!r}")
    scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ModelConfigError(f"config.json rope_scaling must be a mapping, got {scaling!r}")
    merged = dict(scaling or {}) | dict(rp or {})
    if any(isinstance(v, dict) for v in merged.values()):
        raise ModelConfigError("config.json per-layer-type rope_parameters are not supported")
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    prf = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ModelConfigError(f"config.json partial_rotary_factor {prf} is not supported")
    params = {k: v for k, v in merged.items() if k not in _SHARED}
    if rope_type in ("llama3", "yarn") and hf.get(_ORIG) is not None:
        params.setdefault(_ORIG, hf[_ORIG])
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        raise ModelConfigError(f"config.json rope_theta {theta!r} is not a number") from None
    return theta, str(rope_type), params


def rope_tables(
    cfg, positions: torch.Tensor, dtype: torch.dtype, cached: tuple[torch.Tensor, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(T, 1, head_dim)`` in ``dtype`` for ``positions`` (T,) int64.

    ``cached`` is ``inv_freq(cfg, 0)`` (computed once by the model); a dynamic rope
    type recomputes it from the largest position, as transformers does per forward.
    """
    spec = ROPE_TYPES[cfg.rope_type]
    inv_freq, scaling = cached
    if spec.dynamic and positions.numel():
        inv_freq, scaling = spec.inv_freq(cfg, int(positions.max()) + 1)
    inv = inv_freq.to(device=positions.device, dtype=torch.float32)
    freqs = positions.to(torch.float32)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    return cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half convention of Hugging Face Llama; ``x`` is ``(T, heads, head_dim)``."""
    d = x.shape[-1]
    rotated = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    return x * cos + rotated * sin

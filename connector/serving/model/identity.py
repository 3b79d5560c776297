"""Model identity: a digest of the config and a sampled checksum of every weight tensor.

Computed once at load (``SAMPLES`` evenly spaced elements per tensor, so a large
checkpoint costs milliseconds); daemons exchange it in ``Prefill`` and refuse a peer
serving another model. Two models with the same identity have the same config and,
with overwhelming likelihood, the same weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields

import torch
from kvbridge.connector.serving.model.config import ModelConfig
from kvbridge.connector.serving.model.weights import LayerWeights, ModelWeights

SAMPLES = 4096


def _sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > SAMPLES:
        # int64 arithmetic: float positions round past the end for large tensors
        idx = (
            torch.arange(SAMPLES, dtype=torch.int64, device=flat.device) * (n - 1) // (SAMPLES - 1)
        )
        flat = flat[idx]
    return flat.to("cpu", torch.float32).numpy().tobytes()


def model_digest(cfg: ModelConfig, w: ModelWeights) -> str:
    """BLAKE2b-128 hex of the config (seed excluded: the weights speak for it) and weights."""
    h = hashlib.blake2b(digest_size=16)
    spec = {k: v for k, v in cfg.to_dict().items() if k != "seed"}
    h.update(json.dumps(spec, sort_keys=True, default=list).encode())
    named = [("embed", w.embed), ("norm", w.norm), ("lm_head", w.lm_head)]
    for i, lw in enumerate(w.layers):
        named += [(f"{i}.{f.name}", getattr(lw, f.name)) for f in fields(LayerWeights)]
    for name, t in named:
        if t is None:
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_sample(t))
    return h.hexdigest()


def model_identity(name: str, cfg: ModelConfig, w: ModelWeights) -> str:
    """``NAME@DIGEST16``: readable in errors, exact in comparisons."""
    return f"{name}@{model_digest(cfg, w)[:16]}"


def same_model(a: str, b: str) -> bool:
    """Whether two identities name the same model: the digests decide, not the names
    (one checkpoint in two folders is one model)."""
    return bool(a) and bool(b) and a.rsplit("@", 1)[-1] == b.rsplit("@", 1)[-1]

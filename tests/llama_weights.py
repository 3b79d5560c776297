"""Random Llama weights under Hugging Face tensor names, for tiny test checkpoints."""

from __future__ import annotations

from collections.abc import Callable

import torch


def llama_tensors(
    r: Callable[..., torch.Tensor], *, vocab: int, hidden: int, q: int, kv: int, inter: int,
    layers: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Embeddings, final norm and every layer's tensors (no ``lm_head``), drawn with
    ``r(*shape)``; norms are ``1 + r(hidden)``. ``q``/``kv``: projection widths."""
    t = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": 1 + r(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": 1 + r(hidden),
            p + "post_attention_layernorm.weight": 1 + r(hidden),
            p + "self_attn.q_proj.weight": r(q, hidden),
            p + "self_attn.k_proj.weight": r(kv, hidden),
            p + "self_attn.v_proj.weight": r(kv, hidden),
            p + "self_attn.o_proj.weight": r(hidden, q),
            p + "mlp.gate_proj.weight": r(inter, hidden),
            p + "mlp.up_proj.weight": r(inter, hidden),
            p + "mlp.down_proj.weight": r(hidden, inter),
        }
    return t

"""Monolithic greedy generation: prefill and decode on one paged cache in one process.

This is the reference the disaggregated path must match token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from kvbridge.connector.serving.model.llama import LlamaModel
from kvbridge.topology.layouts import KVCache, allocate


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def allocate_cache(
    model: LlamaModel, layout: str, num_blocks: int, block_size: int, seed: int | None = None
) -> KVCache:
    """A paged cache for ``model`` in ``layout`` (filled with random data, as a reused cache is)."""
    cfg = model.cfg
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    return allocate(
        layout,
        num_layers=cfg.num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=model.dtype,
        device=model.device,
        generator=gen,
    )


def generate_monolithic(
    model: LlamaModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    layout: str = "nhd",
    block_size: int = 16,
    cache: KVCache | None = None,
    stop_ids: Sequence[int] = (),
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> list[int]:
    """Greedy tokens of ``prompt_ids`` (first from the prefill logits, then decode steps);
    ``on_logits`` gets the logits (V,) each token was picked from."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    total = len(prompt_ids) + max_new_tokens
    n = blocks_needed(total, block_size)
    if cache is None:
        cache = allocate_cache(model, layout, n, block_size)
    blocks = list(range(n))
    table = torch.tensor([blocks], dtype=torch.int32, device=model.device)
    hook = on_logits or (lambda logits: None)
    logits = model.prefill(prompt_ids, cache, blocks).reshape(-1)
    hook(logits)
    out = [int(logits.argmax())]
    pos = len(prompt_ids)
    while len(out) < max_new_tokens and out[-1] not in stop_ids:
        logits = model.decode_step([out[-1]], [pos], cache, table)[0]
        hook(logits)
        out.append(int(logits.argmax()))
        pos += 1
    return out

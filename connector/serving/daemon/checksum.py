"""Layout-independent checksum of a request's KV (verification runs, ``verify_kv``).

Both daemons hash the *logical* K/V of the same tokens, each through its own
cache's views, so a packed prefill cache and an NHD decode cache give the same
digest when (and only when) the transfer moved every byte of those tokens. The
gather copies the prompt's KV: this is a debugging aid, never on by default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from kvbridge.topology.layouts import KVCache


def kv_checksum(cache: KVCache, block_ids: Sequence[int], num_tokens: int) -> str:
    """BLAKE2b-128 (hex) of tokens ``[0, num_tokens)`` of every layer and view.

    Token ``t`` lives in slot ``t % block_size`` of block ``block_ids[t // block_size]``.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    h = hashlib.blake2b(digest_size=16)
    first = next(iter(cache.layers.values()))[0]
    bs = first.shape[1]
    if len(block_ids) * bs < num_tokens:
        raise ValueError(f"{len(block_ids)} blocks of {bs} tokens cannot hold {num_tokens} tokens")
    # token t at (block_ids[t // bs], t % bs): one gather per view, in logical order (each
    # torch call is a GIL round trip, slow in a busy daemon)
    t = torch.arange(num_tokens)
    blk = torch.as_tensor(list(block_ids), dtype=torch.long)[t // bs].to(first.device)
    slot = (t % bs).to(first.device)
    names = sorted(cache.layers)
    parts = [view[blk, slot].view(torch.uint8).reshape(-1)  # (tokens, ...) -> bytes
             for name in names for view in cache.layers[name]]  # fmt: skip
    # ONE copy to the host: on a GPU each copy waits for all queued work (decode steps)
    host = torch.cat(parts).cpu().numpy()
    at, views = 0, iter(parts)
    for name in names:
        h.update(name.encode())
        for _ in cache.layers[name]:
            n = next(views).numel()
            h.update(host[at : at + n])
            at += n
    return h.hexdigest()

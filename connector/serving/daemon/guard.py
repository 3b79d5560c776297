"""Debug guard bands: poison before and after every KV cache allocation.

``GuardBands.wrap(cache, nbytes)`` rebuilds a cache's views on fresh buffers that
carry ``nbytes`` of seeded random poison before and after each original
allocation. The views keep their shapes, strides and offsets relative to the data,
so the registered regions (the views' spans) stay strictly inside and any engine
or kernel access outside them changes a band. ``changed()`` counts band bytes that
no longer hold their poison (the daemon's ``--guard-bytes``; ``Stats`` reports it).
"""

from __future__ import annotations

import torch
from kvbridge.topology.layouts import KVCache


def _rebase(view: torch.Tensor, storage: torch.UntypedStorage, shift: int) -> torch.Tensor:
    """``view`` with the same geometry on ``storage``, ``shift`` elements further in."""
    out = torch.empty(0, dtype=view.dtype, device=view.device)
    return out.set_(storage, view.storage_offset() + shift, view.shape, view.stride())


class GuardBands:
    """Poison bands around every backing buffer of a cache, and their expected bytes."""

    def __init__(self, cache: KVCache, bands: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.cache = cache
        self._bands = bands  # (live band bytes as a uint8 view, expected bytes)

    @classmethod
    def wrap(cls, cache: KVCache, nbytes: int, seed: int = 0x5EED) -> GuardBands:
        """A copy of ``cache`` (same data) whose allocations sit between poison bands."""
        if nbytes <= 0:
            raise ValueError(f"guard bands need a positive size, got {nbytes}")
        gen = torch.Generator().manual_seed(seed)
        backing, bands, moved = [], [], {}
        for flat in cache.backing:
            if flat.storage_offset() != 0 or not flat.is_contiguous():
                raise ValueError("guard bands wrap fresh flat allocations only")
            esize = flat.element_size()
            g = -(-nbytes // esize)
            big = torch.empty(g + flat.numel() + g, dtype=flat.dtype, device=flat.device)
            big[g : g + flat.numel()].copy_(flat)
            raw = big.view(torch.uint8)
            for lo, hi in ((0, g * esize), ((g + flat.numel()) * esize, raw.numel())):
                poison = torch.randint(0, 256, (hi - lo,), dtype=torch.uint8, generator=gen)
                raw[lo:hi].copy_(poison)
                bands.append((raw[lo:hi], poison))
            backing.append(big)
            moved[flat.untyped_storage().data_ptr()] = (big.untyped_storage(), g, esize)
        layers = {}
        for name, views in cache.layers.items():
            new = []
            for v in views:
                storage, g, esize = moved[v.untyped_storage().data_ptr()]
                shift = g * esize // v.element_size()
                new.append(_rebase(v, storage, shift))
            layers[name] = tuple(new)
        wrapped = KVCache(
            layout=cache.layout, backing=backing, layers=layers, meta=dict(cache.meta)
        )
        return cls(wrapped, bands)

    @property
    def nbytes(self) -> int:
        return sum(int(b.numel()) for b, _ in self._bands)

    def changed(self) -> int:
        """Band bytes that differ from their poison (0: nothing touched outside the cache)."""
        total = 0
        for live, expected in self._bands:
            total += int((live.cpu() != expected).sum())
        return total

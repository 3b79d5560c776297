"""The layout registry: name -> :class:`Layout` object.

A layout knows how to allocate one cache (every layer's logical views) and how to
turn a layer's views into the decode kernel's ``(k, v)``. Everything that lists
layouts (CLI choices, config validation, test parametrisation) reads this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

#: ``new(shape, block_dim=0, **overrides) -> view``: a fresh random strided tensor
#: with the cache's dtype, device, storage offset and block padding applied.
NewTensor = Callable[..., torch.Tensor]


class Layout:
    """One named physical cache layout.

    ``family`` is ``"gqa"`` (K/V views ``(N, bs, H, D)``), ``"mla"`` (one latent
    ``(N, bs, rank + rope)``) or ``"state"`` (opaque ``(N, page_bytes)`` pages).
    Subclasses implement :meth:`layer_views` (one layer at a time) or override
    :meth:`all_views` when one allocation spans every layer.
    """

    name: ClassVar[str]
    family: ClassVar[str] = "gqa"
    doc: ClassVar[str] = ""

    def layer_views(self, new: NewTensor, dims: dict) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def all_views(
        self, new: NewTensor, dims: dict, names: Sequence[str]
    ) -> dict[str, tuple[torch.Tensor, ...]]:
        return {name: self.layer_views(new, dims) for name in names}

    def kv(self, views: tuple[torch.Tensor, ...], meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(k, v)`` views the decode kernel takes for one layer."""
        return views[0], views[1]


_REGISTRY: dict[str, Layout] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: add a layout to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"layout {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_layout(name: str) -> Layout:
    """The registered layout ``name``; a clear error listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown KV layout {name!r}; supported: {', '.join(_REGISTRY)}") from None


def layout_names(family: str | None = None) -> tuple[str, ...]:
    """Registered layout names, in registration order, optionally of one family."""
    return tuple(n for n, lay in _REGISTRY.items() if family is None or lay.family == family)

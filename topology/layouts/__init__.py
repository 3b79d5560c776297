"""The catalogue of named paged-KV layouts: a registry of layout objects.

Each layout allocates a cache and gives, per layer, the *logical views* an
attention backend uses. View conventions (the contract the topology, the kernels
and the transports share):

* GQA/MHA layouts: ``(k, v)``, each in logical order
  ``(num_blocks, block_size, num_kv_heads, head_dim)`` with whatever strides the
  physical layout gives (never copied, never made contiguous).
* ``mla``: ``(latent,)`` of shape ``(num_blocks, block_size, kv_lora_rank + rope_dim)``;
  ``mla_kv_views`` turns it into the kernel's ``k``/``v`` (V = first ``kv_lora_rank``
  columns of K).
* ``state``: ``(page,)`` of shape ``(num_blocks, page_bytes)`` int8 (Mamba-style
  state pages); ``state_views`` unpacks a page into typed state views.

``storage_offset`` (elements) and ``block_pad`` (elements of padding after each
block) give layout 9 on top of any other layout. A new layout is one
:class:`Layout` subclass decorated with :func:`register_layout`.
"""

from kvbridge.topology.layouts import catalogue as _catalogue  # noqa: F401  (registers the built-in layouts)
from kvbridge.topology.layouts.cache import KVCache, allocate, fill_random_
from kvbridge.topology.layouts.registry import Layout, get_layout, layout_names, register_layout
from kvbridge.topology.layouts.views import mla_kv_views, state_views

#: Every registered layout, and those with GQA ``(k, v)`` views.
LAYOUTS = layout_names()
GQA_LAYOUTS = layout_names("gqa")

__all__ = [
    "GQA_LAYOUTS",
    "LAYOUTS",
    "KVCache",
    "Layout",
    "allocate",
    "fill_random_",
    "get_layout",
    "layout_names",
    "mla_kv_views",
    "register_layout",
    "state_views",
]

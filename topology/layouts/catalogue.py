"""The built-in layouts, one class each (registered on import)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from kvbridge.topology.layouts.registry import Layout, NewTensor, register_layout
from kvbridge.topology.layouts.views import mla_kv_views


@register_layout
class NHD(Layout):
    name = "nhd"
    doc = "separate K and V tensors (N, bs, H, D)"

    def layer_views(self, new: NewTensor, d: dict) -> tuple[torch.Tensor, ...]:
        shape = (d["n"], d["bs"], d["h"], d["d"])
        return new(shape), new(shape)


@register_layout
class HND(Layout):
    name = "hnd"
    doc = "separate K and V tensors (N, H, bs, D), handed over as .transpose(1, 2)"

    def layer_views(self, new: NewTensor, d: dict) -> tuple[torch.Tensor, ...]:
        shape = (d["n"], d["h"], d["bs"], d["d"])
        return new(shape).transpose(1, 2), new(shape).transpose(1, 2)


@register_layout
class Packed(Layout):
    name = "packed"
    doc = "one (N, H, bs, 2D); K/V = kv.transpose(1, 2).split(D, -1)"

    def layer_views(self, new: NewTensor, d: dict) -> tuple[torch.Tensor, ...]:
        kv = new((d["n"], d["h"], d["bs"], 2 * d["d"]))
        return tuple(kv.transpose(1, 2).split(d["d"], -1))


@register_layout
class Interleaved(Layout):
    name = "interleaved"
    doc = "one (N, 2, bs, H, D) unbound on dim 1"

    def layer_views(self, new: NewTensor, d: dict) -> tuple[torch.Tensor, ...]:
        return tuple(new((d["n"], 2, d["bs"], d["h"], d["d"])).unbind(1))


@register_layout
class KVOuter(Layout):
    name = "kv_outer"
    doc = "one (2, N, bs, H, D) unbound on dim 0"

    def layer_views(self, new: NewTensor, d: dict) -> tuple[torch.Tensor, ...]:
        return tuple(new((2, d["n"], d["bs"], d["h"], d["d"]), block_dim=1).unbind(0))


@register_layout
class HeadGroups(Layout):
    name = "head_groups"
    doc = "one (N, 2H, bs, D): K heads, then V heads"

    def layer_views(self, new: NewTensor, d: dict) -> tuple[torch.Tensor, ...]:
        h = d["h"]
        x = new((d["n"], 2 * h, d["bs"], d["d"]))
        return x[:, :h].transpose(1, 2), x[:, h:].transpose(1, 2)


@register_layout
class CrossLayer(Layout):
    name = "cross_layer"
    doc = "one (N, L, 2, bs, H, D) for all layers"

    def all_views(
        self, new: NewTensor, d: dict, names: Sequence[str]
    ) -> dict[str, tuple[torch.Tensor, ...]]:
        x = new((d["n"], len(names), 2, d["bs"], d["h"], d["d"]))
        return {name: (x[:, i, 0], x[:, i, 1]) for i, name in enumerate(names)}


@register_layout
class MLA(Layout):
    name = "mla"
    family = "mla"
    doc = "one latent (N, bs, kv_lora_rank + rope_dim); V = its first kv_lora_rank columns"

    def layer_views(self, new: NewTensor, d: dict) -> tuple[torch.Tensor, ...]:
        return (new((d["n"], d["bs"], d["kv_lora_rank"] + d["rope_dim"])),)

    def kv(self, views: tuple[torch.Tensor, ...], meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_kv_views(views[0], meta["kv_lora_rank"])


@register_layout
class State(Layout):
    name = "state"
    family = "state"
    doc = "opaque (N, page_bytes) int8 state pages (Mamba-style)"

    def layer_views(self, new: NewTensor, d: dict) -> tuple[torch.Tensor, ...]:
        return (new((d["n"], d["page_bytes"]), dtype=torch.int8),)

    def kv(self, views: tuple[torch.Tensor, ...], meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("state pages have no K/V views")

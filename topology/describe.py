"""Read tensor metadata into plain view records. The only module that touches torch.

Reads ``data_ptr``-level metadata only (shape, strides, dtype, element size,
storage identity and offset); never reads or copies tensor data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from kvbridge.topology.errors import LayoutError

#: Meta-device tensors have no memory; they get disjoint virtual addresses from
#: here, so a topology can be planned at full scale without allocating it.
VIRTUAL_BASE = 1 << 44
_VIRTUAL_ALIGN = 1 << 21


@dataclass(frozen=True)
class ViewInfo:
    """One logical view: block dim first, strides in elements, addresses in bytes."""

    layer: str
    index: int
    storage: tuple  # (device, identity): views with equal keys share an allocation
    addr: int  # byte address of element [0, ...]
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    itemsize: int
    device: str

    @property
    def extent(self) -> int:
        """Bytes from ``addr`` to the end of the last element."""
        last = sum((n - 1) * s for n, s in zip(self.shape, self.strides, strict=True))
        return (last + 1) * self.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_caches(
    caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], block_dim: int = 0
) -> list[tuple[str, list[ViewInfo]]]:
    """Per layer (in mapping order), its views with the block dim moved to the front."""
    if not isinstance(caches, Mapping) or not caches:
        raise LayoutError("caches must be a non-empty mapping of layer name -> tensor(s)")
    virtual: dict[int | None, int] = {}  # storage identity -> virtual base; None -> next
    out = []
    for name, value in caches.items():
        if not isinstance(name, str):
            raise LayoutError(f"layer name {name!r} is not a string")
        views = (value,) if isinstance(value, torch.Tensor) else value
        if not isinstance(views, Sequence) or not views:
            raise LayoutError(
                f"layer {name!r}: expected a tensor or a non-empty sequence of tensors"
            )
        out.append((name, [_describe(name, i, t, block_dim, virtual) for i, t in enumerate(views)]))
    return out


def _describe(layer: str, index: int, t: object, block_dim: int, virtual: dict) -> ViewInfo:
    where = f"layer {layer!r} view {index}"
    if not isinstance(t, torch.Tensor):
        raise LayoutError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if not -t.dim() <= block_dim < t.dim():
        raise LayoutError(f"{where}: no block dimension {block_dim} in a {t.dim()}-D tensor")
    if t.dim() < 2:
        raise LayoutError(
            f"{where}: a {t.dim()}-D tensor has no block dimension plus per-block data "
            "(need at least 2 dims: blocks, elements)"
        )
    if t.is_sparse or t.layout != torch.strided:
        raise LayoutError(f"{where}: only strided (dense) tensors are supported")
    v = t.movedim(block_dim, 0) if block_dim % t.dim() else t
    itemsize = v.element_size()
    storage = v.untyped_storage()
    if v.device.type == "meta":
        ident = storage._cdata  # stable identity of the storage object
        if ident not in virtual:
            virtual[ident] = virtual.get(None, VIRTUAL_BASE)
            step = -(-storage.nbytes() // _VIRTUAL_ALIGN) * _VIRTUAL_ALIGN + _VIRTUAL_ALIGN
            virtual[None] = virtual[ident] + step
        base = virtual[ident]
        key = ("meta", ident)
    else:
        base = storage.data_ptr()
        key = (str(v.device), base)
    return ViewInfo(
        layer=layer,
        index=index,
        storage=key,
        addr=base + v.storage_offset() * itemsize,
        shape=tuple(v.shape),
        strides=tuple(v.stride()),
        dtype=dtype_name(v.dtype),
        itemsize=itemsize,
        device=str(v.device),
    )

"""``TransferTopology``: regions and block byte ranges of a paged KV cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from kvbridge.topology.analysis import footprint
from kvbridge.topology.block_ranges import BlockRanges
from kvbridge.topology.describe import describe_caches
from kvbridge.topology.expand import expand
from kvbridge.topology.ids import as_block_ids, sorted_unique
from kvbridge.topology.spec import Region, TopologySpec, build_spec


class TransferTopology:
    """Layout maths of one cache: registrable regions, block ranges, a spec for peers.

    Pure: tensors are read for metadata only. Build with :meth:`from_caches`
    (local tensors) or :meth:`from_spec` (a peer's, or a decoded, spec).
    """

    def __init__(self, spec: TopologySpec):
        self._spec = spec
        self._footprint = footprint(spec)  # validates geometry, rejects aliasing blocks

    @classmethod
    def from_caches(
        cls, caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], block_dim: int = 0
    ) -> TransferTopology:
        """From ``{layer: tensor or views}``; ``block_dim`` is each view's block dimension.

        Views are logically ``(blocks, tokens, heads, head_dim)`` (4-D),
        ``(blocks, tokens, dim)`` (3-D) or ``(blocks, elements)`` (2-D page);
        any strides, any number of views per layer, shared storage allowed.
        Meta-device tensors get virtual, disjoint addresses.
        """
        return cls(build_spec(describe_caches(caches, block_dim)))

    @classmethod
    def from_spec(cls, spec: TopologySpec | bytes) -> TransferTopology:
        if isinstance(spec, (bytes, bytearray, memoryview)):
            spec = TopologySpec.decode(bytes(spec))
        else:
            spec.validate()
        return cls(spec)

    @property
    def regions(self) -> tuple[Region, ...]:
        return self._spec.regions

    @property
    def num_blocks(self) -> int:
        return self._spec.num_blocks

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self._spec.layer_names

    def spec(self) -> TopologySpec:
        return self._spec

    def block_ranges(self, block_ids) -> BlockRanges:
        """The exact bytes of ``block_ids`` in every layer, coalesced per region.

        Consecutive blocks whose bytes touch merge into one range (also across
        layers sharing an allocation); padding between blocks is never included.
        Ranges are grouped by region, not necessarily sorted by offset.
        """
        ids = as_block_ids(block_ids, self.num_blocks, "block_ranges")
        ids, _ = sorted_unique(ids, "block_ranges")
        region, offset, nbytes = expand(self._footprint, ids, None)
        return BlockRanges(region, offset, nbytes)

    def __repr__(self) -> str:
        s = self._spec
        return (
            f"TransferTopology({len(s.layers)} layers, {s.num_blocks} blocks, "
            f"{len(s.regions)} regions, layout {s.layout_hash[:8]})"
        )

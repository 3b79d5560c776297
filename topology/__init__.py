"""kvbridge.topology: pure layout maths of paged KV caches.

Regions from real strides, coalesced block byte ranges, a wire spec for peers,
and transfer plans between two (possibly different) layouts. See README.md.
"""

from kvbridge.topology.block_ranges import BlockRanges
from kvbridge.topology.errors import LayoutError
from kvbridge.topology.pairing import HeadRange
from kvbridge.topology.plan import FRAGMENTATION_LIMIT, SMALL_DESCRIPTOR_BYTES, TransferPlan
from kvbridge.topology.spec import SPEC_VERSION, LayerSpec, Region, TopologySpec, ViewSpec
from kvbridge.topology.topology import TransferTopology

__all__ = [
    "FRAGMENTATION_LIMIT",
    "SMALL_DESCRIPTOR_BYTES",
    "SPEC_VERSION",
    "BlockRanges",
    "HeadRange",
    "LayerSpec",
    "LayoutError",
    "Region",
    "TopologySpec",
    "TransferPlan",
    "TransferTopology",
    "ViewSpec",
]

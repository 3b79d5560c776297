"""kvbridge.topology: pure layout maths of paged KV caches.

Regions from real strides, coalesced block byte ranges, a wire spec for peers,
and transfer plans between two (possibly different) layouts. See README.md.
"""

from .block_ranges import BlockRanges
from .errors import LayoutError
from .pairing import HeadRange
from .plan import FRAGMENTATION_LIMIT, SMALL_DESCRIPTOR_BYTES, TransferPlan
from .spec import SPEC_VERSION, LayerSpec, Region, TopologySpec, ViewSpec
from .topology import TransferTopology

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

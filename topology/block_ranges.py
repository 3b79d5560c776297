"""``BlockRanges``: the coalesced byte ranges of a block set, per region."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kvbridge.topology.spec import TopologySpec


@dataclass(frozen=True, eq=False)
class BlockRanges:
    """int64 arrays of equal length: ``region``, ``offset`` (from the region base), ``nbytes``."""

    region: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray

    def __len__(self) -> int:
        return int(self.offset.size)

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    def addr(self, spec: TopologySpec) -> np.ndarray:
        """Absolute addresses: ``region base + offset``."""
        return spec.region_addrs[self.region] + self.offset

    def __repr__(self) -> str:
        return f"BlockRanges({len(self)} ranges, {self.total_bytes} bytes)"

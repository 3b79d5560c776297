"""Validation of block id lists (any int sequence, numpy array or CPU tensor)."""

from __future__ import annotations

import numpy as np
from kvbridge.topology.errors import LayoutError
from kvbridge.topology.intervals import I64


def as_block_ids(ids: object, num_blocks: int, what: str) -> np.ndarray:
    """``ids`` as a 1-D int64 array of unique ids in ``[0, num_blocks)``; else ``LayoutError``."""
    if hasattr(ids, "detach") and hasattr(ids, "cpu"):  # torch tensor, without importing torch
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=I64)
    if arr.ndim != 1:
        raise LayoutError(f"{what}: block ids must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise LayoutError(f"{what}: block ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(I64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_blocks:
        bad = lo if lo < 0 else hi
        raise LayoutError(f"{what}: block id {bad} out of range [0, {num_blocks})")
    return arr


def sorted_unique(ids: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(sorted ids, order)``, order None when already sorted; duplicates: ``LayoutError``."""
    if ids.size < 2:
        return ids, None
    d = np.diff(ids)
    if (d > 0).all():
        return ids, None
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        raise LayoutError(f"{what}: block id {int(s[dup[0]])} appears more than once")
    return s, order


def count_runs(sorted_ids: np.ndarray) -> int:
    """Runs of consecutive ids in a sorted id array."""
    return 0 if sorted_ids.size == 0 else 1 + int(np.count_nonzero(np.diff(sorted_ids) != 1))

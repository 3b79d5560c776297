"""Block allocator of a daemon's paged KV cache."""

from __future__ import annotations

import threading
from collections import deque


class OutOfBlocksError(RuntimeError):
    """Not enough free blocks for a request."""


class BlockAllocator:
    """Thread-safe free list of block ids ``[0, num_blocks)``.

    Frees are checked: freeing a block that is not allocated (double free, or an
    id out of range) raises instead of corrupting the free list.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def num_used(self) -> int:
        with self._lock:
            return len(self._used)

    def allocate(self, n: int, timeout: float = 0.0) -> list[int]:
        """Take ``n`` blocks, waiting up to ``timeout`` seconds for frees; else raise."""
        if n <= 0:
            raise ValueError(f"block count must be positive, got {n}")
        if n > self.num_blocks:
            raise OutOfBlocksError(f"{n} blocks requested, the cache has {self.num_blocks}")
        with self._freed:
            if not self._freed.wait_for(lambda: len(self._free) >= n, timeout=timeout):
                raise OutOfBlocksError(
                    f"{n} blocks requested, {len(self._free)} of {self.num_blocks} free"
                )
            ids = [self._free.popleft() for _ in range(n)]
            self._used.update(ids)
            return ids

    def free(self, ids: list[int]) -> None:
        """Return blocks to the free list (all or none)."""
        with self._freed:
            bad = [i for i in ids if i not in self._used]
            if bad or len(set(ids)) != len(ids):
                raise ValueError(f"freeing blocks that are not allocated: {sorted(set(bad))[:8]}")
            self._used.difference_update(ids)
            self._free.extend(ids)
            self._freed.notify_all()

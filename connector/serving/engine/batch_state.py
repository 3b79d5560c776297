"""The decode batch's per-row inputs on the device, packed into ONE int64 tensor.

Each row of ``rows`` (capacity ``max_batch``) holds the token to feed, its position,
whether the row is active, the sampling parameters and the block table row:

    col 0 token   1 position   2 active (1/0)   3 top_k   4 seed (32 bits)
    col 5         temperature | top_p           (two float32 in one int64)
    col 6...      the block table               (two int32 per int64)

The named fields (``tokens``, ``positions``, ``tables``, ...) are strided views of it.
Packing is what keeps a join or a leave cheap for the engine thread: each torch call
gives up the GIL and, in a busy daemon (one gRPC thread per stream, pulls), may wait
a switch interval to get it back. A joining row is one host-to-device copy from
pinned memory (no sync), a leaver's row moved over it is one device copy, padding
again is one copy.
"""

from __future__ import annotations

import numpy as np
import torch

TOKEN, POSITION, ACTIVE, TOP_K, SEED, FLOATS, TABLE = range(7)


class BatchState:
    """Per-row decode inputs on the device, rows ``[0, n)`` active (``active`` 1)."""

    def __init__(self, max_batch: int, max_pages: int, device: torch.device, pad_block: int):
        self.device = torch.device(device)
        self.pad_block, self.max_pages = pad_block, max_pages
        width = TABLE + -(-max_pages // 2)
        self.rows = torch.empty((max_batch, width), dtype=torch.int64, device=self.device)
        cols = [self.rows[:, c] for c in range(FLOATS)]
        self.tokens, self.positions, self.active, self.top_k, self.seeds = cols
        floats = self.rows[:, FLOATS : FLOATS + 1].view(torch.float32)
        self.temperature, self.top_p = floats[:, 0], floats[:, 1]
        self.tables = self.rows[:, TABLE:].view(torch.int32)[:, :max_pages]
        # a padding row: scratch block, position 0, inactive, greedy
        pad = torch.zeros(width, dtype=torch.int64)
        self._fill(pad.numpy(), 0, 0, [], (0.0, 0.0, 0, 0), active=0)
        self._pad_row = pad.to(self.device)
        self.rows.copy_(self._pad_row.expand_as(self.rows))
        # CUDA: a joining row goes up from pinned host memory without a sync (a pageable
        # copy would wait for everything queued on the stream, other pulls' relayouts
        # included); each host row is rewritten only once the copy out of it completed
        cuda = self.device.type == "cuda"
        self._host = torch.zeros((max_batch, width), dtype=torch.int64, pin_memory=cuda)
        self._row_copied: list[torch.cuda.Event | None] = [None] * max_batch

    def _fill(
        self, row: np.ndarray, token: int, position: int, blocks: list[int], sampling: tuple,
        active: int = 1,
    ) -> None:  # fmt: skip
        temperature, top_p, top_k, seed = sampling
        row[TOKEN], row[POSITION], row[ACTIVE], row[TOP_K], row[SEED] = (
            token, position, active, top_k, seed,
        )  # fmt: skip
        row[FLOATS : FLOATS + 1].view(np.float32)[:] = (temperature, top_p)
        table = row[TABLE:].view(np.int32)[: self.max_pages]
        table.fill(self.pad_block)
        table[: len(blocks)] = blocks

    def set_row(
        self, row: int, token: int, position: int, blocks: list[int], sampling: tuple
    ) -> None:
        """Write a joining sequence's row (host data, one copy); ``sampling`` is
        ``(temperature, top_p, top_k, seed)``, the seed folded to 32 bits."""
        if len(blocks) > self.max_pages:
            raise ValueError(f"{len(blocks)} blocks do not fit a table row of {self.max_pages}")
        done = self._row_copied[row]
        if done is not None:
            done.synchronize()  # the previous copy out of this host row
        host = self._host[row]
        self._fill(host.numpy(), token, position, blocks, sampling)
        if self.device.type != "cuda":
            self.rows[row].copy_(host)
            return
        self.rows[row].copy_(host, non_blocking=True)
        done = self._row_copied[row] = done or torch.cuda.Event()
        done.record()

    def move_row(self, src: int, dst: int) -> None:
        """Row ``src`` takes row ``dst``'s place (one device copy, no sync)."""
        self.rows[dst].copy_(self.rows[src])

    def clear_row(self, row: int) -> None:
        """Make ``row`` padding: scratch block, position 0, inactive, greedy."""
        self.rows[row].copy_(self._pad_row)

    def advance(self, n: int, next_tokens: torch.Tensor) -> None:
        """Active rows of ``[0, n)`` take their next token and move one position on
        (padding rows of a CUDA-graph bucket stay as they are)."""
        active = self.active[:n]
        self.tokens[:n] = torch.where(active > 0, next_tokens[:n], self.tokens[:n])
        self.positions[:n] += active

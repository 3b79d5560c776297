"""A staged read's relayout as ONE Triton launch (CUDA), instead of torch ops per view.

The torch relayout (staging.py) issues a gather and an ``index_copy_`` (and the views
around them) for every layer and every K/V view: ~250 torch calls for a 16-layer
pull. Each call lets go of the GIL and takes it back; with 64 pulls, the engine loop
and the streams of a busy decode daemon all wanting it, a pull's relayout waited
~180 ms (p50) for its turns. Here the host computes, in numpy, the byte address of
every token row of every (layer, view) on both sides, uploads them in one pinned
copy and launches one kernel that copies the heads of each token: no per-layer
Python work on tensors, one GIL round trip.

Addresses are int64 bytes; the word size of the copy is the largest of 8/4/2/1 bytes
that divides every address, stride and row. Only rows of the registered staging
buffer and of the destination views are touched (the caller's checks stand).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

_WORDS = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}


@triton.jit
def _relayout_kernel(
    src_ptr, dst_ptr, meta_ptr, n_units,
    WORD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):  # fmt: skip
    """Program (unit, task): copy ``heads x row`` words from one token row to another."""
    u = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    i = task * n_units + u
    s = tl.load(src_ptr + i)
    d = tl.load(dst_ptr + i)
    heads = tl.load(meta_ptr + task * 4)
    s_head = tl.load(meta_ptr + task * 4 + 1)  # strides in words
    d_head = tl.load(meta_ptr + task * 4 + 2)
    row = tl.load(meta_ptr + task * 4 + 3)
    h = tl.arange(0, BH)[:, None].to(tl.int64)
    w = tl.arange(0, BW)[None, :].to(tl.int64)
    m = (h < heads) & (w < row) & (s >= 0)
    sp = s.to(tl.pointer_type(WORD))
    dp = d.to(tl.pointer_type(WORD))
    tl.store(dp + h * d_head + w, tl.load(sp + h * s_head + w, mask=m), mask=m)


@dataclass
class RowTask:
    """One (layer, view): where its tokens' rows start on both sides, and their shape."""

    src: np.ndarray  # int64 byte address of each unit's first source row (-1: skip)
    dst: np.ndarray  # int64 byte address of each unit's first destination row
    heads: int
    src_head: int  # bytes between heads
    dst_head: int
    row: int  # bytes of one head's row


def launch(tasks: list[RowTask], device: torch.device) -> None:
    """Copy every task's units in one kernel launch (queued on the current stream)."""
    if not tasks:
        return
    n_units = max(t.src.size for t in tasks)
    if n_units == 0:
        return
    vals = [8]
    for t in tasks:
        vals += [t.src_head, t.dst_head, t.row, np.gcd.reduce(t.dst)]
        vals.append(np.gcd.reduce(t.src[t.src >= 0]) if (t.src >= 0).any() else 0)
    word = math.gcd(*(int(v) for v in vals))  # zeros do not count
    src = np.full((len(tasks), n_units), -1, dtype=np.int64)
    dst = np.zeros((len(tasks), n_units), dtype=np.int64)
    meta = np.zeros((len(tasks), 4), dtype=np.int64)
    for k, t in enumerate(tasks):
        src[k, : t.src.size], dst[k, : t.dst.size] = t.src, t.dst
        meta[k] = (t.heads, t.src_head // word, t.dst_head // word, t.row // word)
    host = torch.from_numpy(np.concatenate((src.ravel(), dst.ravel(), meta.ravel())))
    cuda = device.type == "cuda"  # else the interpreter (tests)
    dev = host.pin_memory().to(device, non_blocking=True) if cuda else host
    n = src.size
    bh = triton.next_power_of_2(int(meta[:, 0].max()))
    bw = triton.next_power_of_2(int(meta[:, 3].max()))
    _relayout_kernel[(n_units, len(tasks))](
        dev[:n], dev[n : 2 * n], dev[2 * n :], n_units,
        WORD=_WORDS[word], BH=bh, BW=bw, num_warps=4 if bh * bw >= 512 else 2,
    )  # fmt: skip

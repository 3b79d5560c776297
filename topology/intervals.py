"""Interval primitives on int64 numpy arrays.

A *piece* is ``(src_rel, dst_rel, nbytes)``: ``nbytes`` contiguous bytes on both
sides. Everything here is vectorised; no per-element Python loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

I64 = np.int64
EMPTY = np.zeros(0, dtype=I64)
#: Most pieces one unit (block or token) of one view may shatter into.
MAX_PIECES_PER_UNIT = 1 << 20


class TooManyPieces(ValueError):
    """A unit shatters into more than ``MAX_PIECES_PER_UNIT`` pieces."""


def element_pieces(
    sizes: Sequence[int],
    src_strides: Sequence[int],
    dst_strides: Sequence[int],
    itemsize: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces covering every element of a strided index space, in bytes.

    Element ``i`` (a multi-index over ``sizes``) lives at ``sum(i * src_strides)``
    on the source and ``sum(i * dst_strides)`` on the destination (strides in
    elements). Innermost dims that are contiguous on *both* sides are coalesced
    into one piece; the remaining dims are enumerated. Pieces are not merged.
    """
    triples = zip(sizes, src_strides, dst_strides, strict=True)
    dims = [(int(n), int(s), int(d)) for n, s, d in triples if n != 1]
    if any(n == 0 for n, _, _ in dims):
        return EMPTY, EMPTY, EMPTY
    run = 1
    found = True
    while found:
        found = False
        for i, (n, s, d) in enumerate(dims):
            if s == run and d == run:
                run *= n
                del dims[i]
                found = True
                break
    count = int(np.prod([n for n, _, _ in dims], dtype=object))
    if count > MAX_PIECES_PER_UNIT:
        raise TooManyPieces(f"{count} pieces per unit (limit {MAX_PIECES_PER_UNIT})")
    src = np.zeros(1, dtype=I64)
    dst = np.zeros(1, dtype=I64)
    for n, s, d in sorted(dims, key=lambda x: -x[1]):  # outer first: output ~sorted by src
        idx = np.arange(n, dtype=I64)
        src = (src[:, None] + idx * s).ravel()
        dst = (dst[:, None] + idx * d).ravel()
    return src * itemsize, dst * itemsize, np.full(src.size, run * itemsize, dtype=I64)


def union_pieces(
    key: np.ndarray, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge pieces of equal ``key`` and equal ``dst - src`` that overlap or touch.

    Returns ``(key, src, dst, nbytes)`` sorted by ``(key, src)``. Pieces with the
    same key and shift describe the same byte mapping, so their union is exact.
    """
    if src.size == 0:
        return key, src, dst, nbytes
    delta = dst - src
    order = np.lexsort((src, delta, key))
    key, src, delta = key[order], src[order], delta[order]
    end = src + nbytes[order]
    while src.size > 1:
        join = (key[1:] == key[:-1]) & (delta[1:] == delta[:-1]) & (src[1:] <= end[:-1])
        if not join.any():
            break
        first = np.flatnonzero(np.concatenate(([True], ~join)))
        end = np.maximum.reduceat(end, first)
        key, src, delta = key[first], src[first], delta[first]
    order = np.lexsort((src, key))
    key, src, delta, end = key[order], src[order], delta[order], end[order]
    return key, src, src + delta, end - src


def merge_adjacent(
    sreg: np.ndarray,
    soff: np.ndarray,
    nbytes: np.ndarray,
    dreg: np.ndarray | None = None,
    doff: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Merge neighbours (in array order) contiguous on both sides in the same regions.

    Returns ``(sreg, soff, nbytes)`` or ``(sreg, soff, nbytes, dreg, doff)``.
    """
    n = soff.size
    if n < 2:
        return (sreg, soff, nbytes) if dreg is None else (sreg, soff, nbytes, dreg, doff)
    join = (sreg[1:] == sreg[:-1]) & (soff[:-1] + nbytes[:-1] == soff[1:])
    if dreg is not None:
        join &= (dreg[1:] == dreg[:-1]) & (doff[:-1] + nbytes[:-1] == doff[1:])
    if not join.any():
        return (sreg, soff, nbytes) if dreg is None else (sreg, soff, nbytes, dreg, doff)
    first = np.flatnonzero(np.concatenate(([True], ~join)))
    nbytes = np.add.reduceat(nbytes, first)
    if dreg is None:
        return sreg[first], soff[first], nbytes
    return sreg[first], soff[first], nbytes, dreg[first], doff[first]


def run_bounds(breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of runs over ``len(breaks) + 1`` units.

    ``breaks[i]`` is true when unit ``i + 1`` does not continue the run of unit ``i``.
    """
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    lengths = np.diff(np.append(starts, breaks.size + 1))
    return starts, lengths


def canonical(
    sreg: np.ndarray,
    soff: np.ndarray,
    nbytes: np.ndarray,
    dreg: np.ndarray | None = None,
    doff: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """The minimal descriptor set of a byte mapping, sorted by ``(sreg, soff)``.

    Sort-based and general (any order, overlaps allowed when they map the same
    bytes identically); used as the fallback and as the reference path.
    """
    if dreg is None:
        key, soff, _, nbytes = union_pieces(sreg, soff, soff, nbytes)
        return key, soff, nbytes
    width = int(dreg.max(initial=0)) + 1
    key = sreg * width + dreg
    key, soff, doff, nbytes = union_pieces(key, soff, doff, nbytes)
    sreg, dreg = key // width, key % width
    order = np.lexsort((soff, sreg))
    return sreg[order], soff[order], nbytes[order], dreg[order], doff[order]

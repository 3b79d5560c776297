"""Plan templates: the per-unit piece tables of a spec pair, built once and cached.

Pieces of all (layer, view) pairs are grouped into *classes* that share a source
region, a destination region and the unit geometry of both sides; within a class
the pieces of one unit are merged (so K and V rows of a packed block become one
piece). Per unit geometry ("key") the pieces split into

* tiling pieces: exactly one unit step long on both sides, so runs of
  consecutive units merge into one descriptor per piece and run;
* other pieces: one descriptor per unit, kept per class in a padded
  ``(classes, pieces)`` table so expansion is a single broadcast.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from kvbridge.topology.errors import LayoutError
from kvbridge.topology.intervals import I64, TooManyPieces, element_pieces, union_pieces
from kvbridge.topology.pairing import PairGeom, UnitGeom


@dataclass(frozen=True)
class KeyTable:
    """Pieces of one unit geometry (``src_unit``, ``dst_unit``), relative to region bases."""

    src_unit: UnitGeom
    dst_unit: UnitGeom
    t_sreg: np.ndarray  # tiling pieces, 1-D
    t_srel: np.ndarray
    t_dreg: np.ndarray
    t_drel: np.ndarray
    t_len: np.ndarray
    n_sreg: np.ndarray  # other pieces, (classes, pieces)
    n_srel: np.ndarray
    n_dreg: np.ndarray
    n_drel: np.ndarray
    n_len: np.ndarray
    n_mask: np.ndarray | None  # real entries of the padded table; None when all are
    chain: bool  # a tiling piece's last run may touch the next piece's first run
    touch: bool  # a unit's last other piece may touch the next unit's first


@dataclass(frozen=True)
class Merged:
    """All pieces after per-class merging, sorted by (class, src)."""

    cls: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    class_key: np.ndarray  # per class: index into ``units``
    class_sreg: np.ndarray
    class_dreg: np.ndarray
    units: list[tuple[UnitGeom, UnitGeom]]
    class_pairs: list[list[PairGeom]]  # per class, for error messages


@dataclass(frozen=True)
class Template:
    token_mode: bool
    keys: tuple[KeyTable, ...]
    canonical: bool  # several unit geometries share a region pair: finish with a sorted merge
    num_tiling: int  # pieces per unit run (for the fragmentation baseline)
    num_other: int  # pieces per unit
    merged: Merged


@lru_cache(maxsize=4096)
def _pieces(sizes, src_strides, dst_strides, itemsize):
    out = element_pieces(sizes, src_strides, dst_strides, itemsize)
    for a in out:
        a.flags.writeable = False
    return out


def merge_pairs(pairs: Sequence[PairGeom]) -> Merged:
    """Pieces of every pair, merged per class."""
    unit_index: dict[tuple, int] = {}
    class_index: dict[tuple, int] = {}
    class_pairs: list[list[PairGeom]] = []
    cls, src, dst, nb = [], [], [], []
    for p in pairs:
        k = unit_index.setdefault((p.src_unit, p.dst_unit), len(unit_index))
        ck = (k, p.src_region, p.dst_region)
        c = class_index.get(ck)
        if c is None:
            c = class_index[ck] = len(class_index)
            class_pairs.append([])
        class_pairs[c].append(p)
        try:
            s, d, n = _pieces(p.sizes, p.src_strides, p.dst_strides, p.itemsize)
        except TooManyPieces as exc:
            raise LayoutError(f"layer {p.layer!r} view {p.view}: too fragmented: {exc}") from None
        cls.append(np.full(s.size, c, dtype=I64))
        src.append(s + p.src_offset)
        dst.append(d + p.dst_offset)
        nb.append(n)
    c, s, d, n = union_pieces(*(np.concatenate(x) for x in (cls, src, dst, nb)))
    keys = np.array(list(class_index), dtype=I64).reshape(-1, 3)
    return Merged(c, s, d, n, keys[:, 0], keys[:, 1], keys[:, 2], list(unit_index), class_pairs)


def build_template(pairs: Sequence[PairGeom], token_mode: bool, check_dst: bool) -> Template:
    """The template of ``pairs``; ``check_dst`` rejects destination bytes written twice."""
    m = merge_pairs(pairs)
    if check_dst:
        _check_dst_conflicts(m, token_mode)
    s_step = np.array([su.step for su, _ in m.units], dtype=I64)[m.class_key]
    d_step = np.array([du.step for _, du in m.units], dtype=I64)[m.class_key]
    tiling = (m.nbytes == s_step[m.cls]) & (m.nbytes == d_step[m.cls])
    keys = []
    for k, (su, du) in enumerate(m.units):
        in_key = m.class_key[m.cls] == k
        t = in_key & tiling
        o = in_key & ~tiling
        n_tab, mask = _padded(m, o)
        keys.append(
            KeyTable(
                su, du,
                m.class_sreg[m.cls[t]], m.src[t], m.class_dreg[m.cls[t]], m.dst[t], m.nbytes[t],
                *n_tab, mask,
                chain=token_mode or _may_chain(m, t, su, du),
                touch=token_mode or _may_touch(m, o, su, du),
            )
        )  # fmt: skip
    pairs_of_regions = {}
    for k, sr, dr in zip(m.class_key, m.class_sreg, m.class_dreg, strict=True):
        pairs_of_regions.setdefault((int(sr), int(dr)), set()).add(int(k))
    canonical = any(len(v) > 1 for v in pairs_of_regions.values())
    return Template(
        token_mode=token_mode,
        keys=tuple(keys),
        canonical=canonical,
        num_tiling=int(tiling.sum()),
        num_other=int((~tiling).sum()),
        merged=m,
    )


def _padded(m: Merged, sel: np.ndarray):
    """Pieces ``sel`` as (classes, max pieces) tables in (class, src) order, plus a mask."""
    c = m.cls[sel]
    if c.size == 0:
        z = np.zeros((0, 0), dtype=I64)
        return (z, z, z, z, z), None
    classes, first, counts = np.unique(c, return_index=True, return_counts=True)
    rows = np.repeat(np.arange(classes.size), counts)
    cols = np.arange(c.size) - np.repeat(first, counts)
    width = int(counts.max())
    tabs = []
    for vals in (m.class_sreg[c], m.src[sel], m.class_dreg[c], m.dst[sel], m.nbytes[sel]):
        tab = np.zeros((classes.size, width), dtype=I64)
        tab[rows, cols] = vals
        tabs.append(tab)
    if (counts == width).all():
        return tuple(tabs), None
    mask = np.zeros((classes.size, width), dtype=bool)
    mask[rows, cols] = True
    return tuple(tabs), mask


def _may_chain(m: Merged, t: np.ndarray, su: UnitGeom, du: UnitGeom) -> bool:
    """Tiling pieces are emitted piece-major: piece p's last run may touch piece p+1's
    first run when their offsets differ by whole block strides on both sides
    (kv_outer's K and V planes when a run ends at the last block)."""
    if su.block_stride <= 0 or du.block_stride <= 0:
        return False
    tc, ts, td = m.cls[t], m.src[t], m.dst[t]
    return bool(
        ((tc[1:] == tc[:-1])
         & ((ts[1:] - ts[:-1]) % su.block_stride == 0)
         & ((td[1:] - td[:-1]) % du.block_stride == 0)).any()
    )  # fmt: skip


def _may_touch(m: Merged, o: np.ndarray, su: UnitGeom, du: UnitGeom) -> bool:
    """Other pieces are emitted unit-major: a unit's last piece may touch the next
    unit's first piece (when a block's bytes wrap around its stride)."""
    oc, os_, od, on = m.cls[o], m.src[o], m.dst[o], m.nbytes[o]
    if oc.size == 0:
        return False
    _, first = np.unique(oc, return_index=True)
    last = np.append(first[1:], oc.size) - 1
    return bool(
        ((os_[last] + on[last] - os_[first] == su.block_stride)
         & (od[last] + on[last] - od[first] == du.block_stride)).any()
    )  # fmt: skip


def _check_dst_conflicts(m: Merged, token_mode: bool) -> None:
    """Destination bytes of one unit (one block in token mode) must be written once."""
    gkey: dict[tuple, int] = {}
    groups = np.array(
        [
            gkey.setdefault((int(dr), m.units[k][1]), len(gkey))
            for k, dr in zip(m.class_key, m.class_dreg, strict=True)
        ],
        dtype=I64,
    )
    g, d, n = groups[m.cls], m.dst, m.nbytes
    if token_mode:  # a destination block holds block_size tokens
        reps = np.array([m.units[k][1].block_size for k in m.class_key], dtype=I64)[m.cls]
        tstep = np.array([m.units[k][1].token_stride for k in m.class_key], dtype=I64)[m.cls]
        idx = np.repeat(np.arange(d.size), reps)
        slot = np.arange(idx.size) - np.repeat(np.cumsum(reps) - reps, reps)
        g, d, n = g[idx], d[idx] + slot * tstep[idx], n[idx]
    order = np.lexsort((d, g))
    g, d, n = g[order], d[order], n[order]
    clash = np.flatnonzero((g[1:] == g[:-1]) & (d[1:] < d[:-1] + n[:-1]))
    if clash.size:
        gi = int(g[clash[0]])
        dreg = next(dr for (dr, _), v in gkey.items() if v == gi)
        at = int(d[clash[0] + 1])
        names = sorted(
            {
                f"{p.layer!r} view {p.view}"
                for ps in m.class_pairs
                for p in ps
                if p.dst_region == dreg
            }
        )
        raise LayoutError(
            f"destination views overlap: bytes at region {dreg} offset {at} would be written "
            f"from more than one source element (layers {', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''})"
        )


class TemplateCache:
    """A small LRU of templates keyed by layout hashes and plan parameters."""

    def __init__(self, size: int = 128):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, build):
        with self._lock:
            tpl = self._items.get(key)
            if tpl is not None:
                self._items.move_to_end(key)
                return tpl
        tpl = build()  # outside the lock: two threads may build the same template once each
        with self._lock:
            self._items[key] = tpl
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return tpl


TEMPLATES = TemplateCache()

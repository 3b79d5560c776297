"""Expand a template over concrete units: the vectorised hot path.

Block mode: unit ``i`` is the block pair ``(src_ids[i], dst_ids[i])``, sorted by
source id. Token mode: unit ``t`` is token ``t`` of a sequence laid out by two
block tables. Tiling pieces become one descriptor per run of units; other pieces
one per unit; a final neighbour merge runs only where the template says pieces
may still touch, and a sort-based merge only for templates flagged canonical.
"""

from __future__ import annotations

import numpy as np
from kvbridge.topology.errors import LayoutError
from kvbridge.topology.intervals import I64, canonical, merge_adjacent, run_bounds
from kvbridge.topology.pairing import UnitGeom
from kvbridge.topology.template import KeyTable, Template

#: Most descriptors one expansion may materialise (5 int64 arrays: ~1.3 GiB).
MAX_DESCRIPTORS = 1 << 25


def unit_offsets(ids: np.ndarray, unit: UnitGeom, num_tokens: int | None) -> np.ndarray:
    """Byte offset of each unit from the first element of unit 0's block 0."""
    if num_tokens is None:
        return ids * unit.block_stride
    t = np.arange(num_tokens, dtype=I64)
    blk, slot = np.divmod(t, unit.block_size)
    return ids[blk] * unit.block_stride + slot * unit.token_stride


def expand(
    tpl: Template,
    src_ids: np.ndarray,
    dst_ids: np.ndarray | None,
    num_tokens: int | None = None,
) -> tuple[np.ndarray, ...]:
    """Descriptors ``(sreg, soff, nbytes[, dreg, doff])``; ``dst_ids=None``: source side only.

    Block mode expects ``src_ids`` sorted ascending (``dst_ids`` paired with it).
    """
    single = dst_ids is None
    parts: list[tuple[np.ndarray, ...]] = []
    block_runs = None
    if num_tokens is None and src_ids.size:
        brk = np.diff(src_ids) != 1
        if not single:
            brk |= np.diff(dst_ids) != 1
        block_runs = run_bounds(brk)
    units = src_ids.size if num_tokens is None else num_tokens
    other = sum(k.n_len.size if k.n_mask is None else int(k.n_mask.sum()) for k in tpl.keys)
    if other * units > MAX_DESCRIPTORS:
        raise LayoutError(
            f"the plan needs over {other * units} descriptors (limit {MAX_DESCRIPTORS}): "
            "too fragmented; read whole source blocks and relayout locally instead"
        )
    if units:
        for key in tpl.keys:
            if num_tokens is None and not key.n_len.size:  # runs only: skip per-unit offsets
                starts, lengths = block_runs
                su = src_ids[starts] * key.src_unit.block_stride
                du = None if single else dst_ids[starts] * key.dst_unit.block_stride
                parts.append(_tiling(key, su, du, lengths))
                continue
            su = unit_offsets(src_ids, key.src_unit, num_tokens)
            du = None if single else unit_offsets(dst_ids, key.dst_unit, num_tokens)
            if key.t_len.size:
                if num_tokens is None:
                    starts, lengths = block_runs
                else:
                    brk = np.diff(su) != key.src_unit.token_stride
                    if not single:
                        brk |= np.diff(du) != key.dst_unit.token_stride
                    starts, lengths = run_bounds(brk)
                parts.append(_tiling(key, su[starts], None if single else du[starts], lengths))
            if key.n_len.size:
                part = _per_unit(key, su, du)
                parts.append(merge_adjacent(*part) if key.touch else part)
    if not parts:
        z = np.zeros(0, dtype=I64)
        return (z, z, z) if single else (z, z, z, z, z)
    out = (
        parts[0] if len(parts) == 1 else tuple(np.concatenate(a) for a in zip(*parts, strict=True))
    )
    return canonical(*out) if tpl.canonical else out


def _tiling(key: KeyTable, su: np.ndarray, du: np.ndarray | None, lengths: np.ndarray):
    """Piece-major: every tiling piece over every run (``su``/``du``: run starts)."""
    r = su.size
    joins = _joins(key, su, du, lengths) if key.chain else None
    if joins is not None and joins.any():
        return _tiling_joined(key, su, du, lengths, joins)
    sreg = _spread(key.t_sreg, r)
    soff = np.add.outer(key.t_srel, su).ravel()
    nbytes = np.multiply.outer(key.t_len, lengths).ravel()
    if du is None:
        return sreg, soff, nbytes
    return sreg, soff, nbytes, _spread(key.t_dreg, r), np.add.outer(key.t_drel, du).ravel()


def _joins(key: KeyTable, su, du, lengths) -> np.ndarray:
    """Per piece p: whether its last run touches piece p+1's first run on both sides.

    In piece-major order these are the only neighbours that can touch (kv_outer: a
    run ending at the last block of the K plane, one starting at block 0 of V).
    """
    ln = key.t_len
    join = (key.t_sreg[:-1] == key.t_sreg[1:]) & (
        key.t_srel[:-1] + su[-1] + ln[:-1] * lengths[-1] == key.t_srel[1:] + su[0]
    )
    if du is not None:
        join &= (key.t_dreg[:-1] == key.t_dreg[1:]) & (
            key.t_drel[:-1] + du[-1] + ln[:-1] * lengths[-1] == key.t_drel[1:] + du[0]
        )
    return join


def _tiling_joined(key: KeyTable, su, du, lengths, joins):
    """``_tiling`` where piece p+1's first run extends piece p's last run (``joins[p]``)."""
    r, npieces = su.size, key.t_len.size
    skip = np.concatenate(([False], joins))  # piece p drops its first run
    sizes = r - skip
    total = int(sizes.sum())
    cols = 3 if du is None else 5
    out = [np.empty(total, dtype=I64) for _ in range(cols)]
    pos = 0
    for p in range(npieces):
        a = int(skip[p])
        sl = slice(pos, pos + r - a)
        out[0][sl] = key.t_sreg[p]
        np.add(key.t_srel[p], su[a:], out=out[1][sl])
        np.multiply(key.t_len[p], lengths[a:], out=out[2][sl])
        if du is not None:
            out[3][sl] = key.t_dreg[p]
            np.add(key.t_drel[p], du[a:], out=out[4][sl])
        pos += r - a
    # the bytes each piece's last entry absorbs; with one run, a dropped entry passes
    # what it absorbed on to the piece before it
    ends = np.cumsum(sizes) - 1
    carry = 0
    for p in range(npieces - 2, -1, -1):
        if joins[p]:
            carry = int(key.t_len[p + 1] * lengths[0]) + (carry if r == 1 else 0)
            if sizes[p]:
                out[2][ends[p]] += carry
        else:
            carry = 0
    return tuple(out)


def _spread(values: np.ndarray, r: int) -> np.ndarray:
    """``np.repeat(values, r)``, faster for few values and long repeats."""
    return np.broadcast_to(values[:, None], (values.size, r)).ravel()


def _per_unit(key: KeyTable, su: np.ndarray, du: np.ndarray | None):
    """Class-major, then unit, then piece: every other piece of every unit."""
    c, p = key.n_len.shape
    u = su.size
    shape = (c, u, p)

    mask = None if key.n_mask is None else np.broadcast_to(key.n_mask[:, None, :], shape)

    def pick(full):  # (c, u, p) -> 1-D in output order, real entries only
        return full.ravel() if mask is None else full[mask]

    def spread(tab):
        return pick(np.broadcast_to(tab[:, None, :], shape))

    def offsets(tab, base):
        return pick(tab[:, None, :] + base[None, :, None])

    sreg, soff, nbytes = spread(key.n_sreg), offsets(key.n_srel, su), spread(key.n_len)
    if du is None:
        return sreg, soff, nbytes
    return sreg, soff, nbytes, spread(key.n_dreg), offsets(key.n_drel, du)

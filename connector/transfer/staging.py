"""Staged reads for fragmented plans: whole source blocks, then a local relayout.

When a plan's byte runs do not line up (a head slice of an NHD cache is one small
run per token), reading them directly costs one descriptor per run. Instead the
agent reads the selected source blocks whole (their coalesced ``block_ranges``,
a few large descriptors) into a registered staging buffer, where they keep the
source's geometry, and copies the wanted tokens and heads into the local cache
with torch strided copies (``index_copy_`` / indexed assignment on views of the
cache; the cache is never copied or made contiguous).

Everything here works on byte views (each view with a trailing ``itemsize`` dim),
so any dtype moves bit-exactly.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from kvbridge.connector.transfer import relayout_kernel as rk
from kvbridge.connector.transfer.tp_mapping import HeadMap
from kvbridge.connector.transfer.transport import MemRegion, Transport
from kvbridge.topology import TopologySpec, TransferTopology

ALIGN = 64
log = logging.getLogger(__name__)


class StagingUnsupported(Exception):
    """The source geometry cannot be staged (the agent then reads the plan directly)."""


@dataclass(frozen=True)
class StagePlan:
    """Remote ranges of the selected source blocks and where each lands in staging."""

    src_ids: np.ndarray  # sorted unique source block ids
    src_region: np.ndarray
    src_offset: np.ndarray
    nbytes: np.ndarray
    stage_offset: np.ndarray
    total_bytes: int  # staging bytes needed (with alignment gaps)

    @property
    def wire_bytes(self) -> int:
        return int(self.nbytes.sum())


def plan_stage(src: TransferTopology, src_ids: np.ndarray) -> StagePlan:
    """Coalesced ranges of ``src_ids`` (all layers), packed one after another."""
    ids = np.unique(np.asarray(src_ids, dtype=np.int64))
    ranges = src.block_ranges(ids)
    order = np.lexsort((ranges.offset, ranges.region))
    region, offset, nbytes = ranges.region[order], ranges.offset[order], ranges.nbytes[order]
    padded = -(-nbytes // ALIGN) * ALIGN
    stage = np.concatenate(([0], np.cumsum(padded)[:-1])).astype(np.int64)
    return StagePlan(ids, region, offset, nbytes, stage, int(padded.sum()))


def byte_view(v: torch.Tensor) -> torch.Tensor:
    """``v`` (any dtype, any strides) as uint8 with a trailing itemsize dim; no copy."""
    size = v.element_size()
    raw = torch.empty(0, dtype=torch.uint8, device=v.device).set_(v.untyped_storage())
    return raw.as_strided(
        (*v.shape, size), (*(s * size for s in v.stride()), 1), v.storage_offset() * size
    )


def _stage_positions(stage: StagePlan, view) -> np.ndarray:
    """Byte offset in staging of each staged source block (``stage.src_ids``) of ``view``."""
    bs = view.block_stride
    inner = sum((n - 1) * s for n, s in zip(view.shape[1:], view.strides[1:], strict=True))
    ext = (inner + 1) * view.itemsize
    sel = stage.src_region == view.region
    r_off, r_len, r_stage = stage.src_offset[sel], stage.nbytes[sel], stage.stage_offset[sel]
    start = view.offset + stage.src_ids * bs
    idx = np.searchsorted(r_off, start, side="right") - 1
    if (idx < 0).any() or (start + ext > r_off[idx] + r_len[idx]).any():
        raise StagingUnsupported("a block of a view spans several staged ranges")
    return r_stage[idx] + (start - r_off[idx])


def _staged_runs(stage: StagePlan, view, staging: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Per run of source blocks: ``(first index into stage.src_ids, byte view in staging)``."""
    bs = view.block_stride
    pos = _stage_positions(stage, view)
    breaks = np.flatnonzero(np.diff(pos) != bs) + 1
    bounds = [0, *breaks.tolist(), pos.size]
    shape_tail = (*view.shape[1:], view.itemsize)
    strides_tail = (*(s * view.itemsize for s in view.strides[1:]), 1)
    out = []
    for a, b in itertools.pairwise(bounds):
        t = staging.as_strided(
            (b - a, *shape_tail), (bs, *strides_tail), staging.storage_offset() + int(pos[a])
        )
        out.append((a, t))
    return out


def relayout(
    stage: StagePlan,
    staging: torch.Tensor,
    src: TopologySpec,
    dst_layers: Sequence[tuple[str, Sequence[torch.Tensor]]],
    src_ids: np.ndarray,
    dst_ids: np.ndarray,
    num_tokens: int | None,
    heads: HeadMap,
) -> torch.cuda.Event | None:
    """Copy the staged source blocks into the local views (block dim first).

    The copies are queued on the current stream without a host sync: on CUDA one
    kernel for all layers and views (``relayout_kernel.py``), elsewhere torch copies
    whose index arrays go to the device in one upload. On CUDA the returned event
    completes once the copies have read the staging buffer (it must not be reused
    before); ``None`` on the CPU.
    """
    src_ids = np.asarray(src_ids, dtype=np.int64)
    dst_ids = np.asarray(dst_ids, dtype=np.int64)
    where = np.searchsorted(stage.src_ids, src_ids)  # index of each source id in staging
    device = staging.device
    if use_kernel(device):
        tasks = _row_tasks(stage, staging, src, dst_layers, where, dst_ids, num_tokens, heads)
        try:
            rk.launch(tasks, device)
            return _done(device)
        except Exception:  # e.g. the kernel does not compile here: torch copies from now on
            _KERNEL_BROKEN.add(device.type)
            log.exception("relayout kernel failed; using torch copies from now on")
    tasks = []
    index: dict[tuple, list[tuple[np.ndarray, ...] | None]] = {}  # run starts -> per run
    for _, vspec, dv in _view_pairs(src, dst_layers):
        runs = _staged_runs(stage, vspec, staging)
        hs = hd = slice(None)
        if len(vspec.shape) == 4:
            hs, hd = _head_slices(heads, vspec, dv)
        key = (tuple(a for a, _ in runs), vspec.shape[1], dv.shape[1])
        if key not in index:
            index[key] = _run_indices(key[0], where, dst_ids, num_tokens, *key[1:])
        tasks.append((key, runs, byte_view(dv), hs, hd, len(vspec.shape) == 4))
    uploaded = _upload(index, device)
    for key, runs, dbv, hs, hd, has_heads in tasks:
        for (_, view), idx in zip(runs, uploaded[key], strict=True):
            if idx is None:
                continue
            if num_tokens is None:  # whole blocks: (src block, dst block) pairs
                src_v = view[idx[0]]
                if has_heads:
                    src_v = src_v[:, :, hs]
                target = dbv[:, :, hd] if has_heads else dbv
                target.index_copy_(0, idx[1], src_v)
            else:  # tokens: (src block, src slot, dst block, dst slot) per token
                src_v = view[idx[0], idx[1]]  # (tokens, [heads,] dim, itemsize)
                if src_v.dim() == 4:
                    dbv[idx[2], idx[3], hd] = src_v[:, hs]
                else:
                    dbv[idx[2], idx[3]] = src_v
    return _done(device)


_KERNEL_BROKEN: set[str] = set()  # device types whose launch failed once


def use_kernel(device: torch.device) -> bool:
    """Whether relayouts on ``device`` run as one Triton launch (CUDA)."""
    return device.type == "cuda" and device.type not in _KERNEL_BROKEN


def _done(device: torch.device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return done


def _head_slices(heads: HeadMap, vspec, dv: torch.Tensor) -> tuple[slice, slice]:
    """The source and destination heads a 4-D view pair moves."""
    n = heads.num or min(vspec.shape[2] - heads.src_start, dv.shape[2] - heads.dst_start)
    return (
        slice(heads.src_start, heads.src_start + n),
        slice(heads.dst_start, heads.dst_start + n),
    )


def _view_pairs(src: TopologySpec, dst_layers):
    """``(layer name, source view spec, destination view)`` of every layer and view."""
    for layer, (name, dviews) in zip(src.layers, dst_layers, strict=True):
        if layer.name != name:
            raise StagingUnsupported(f"layer order differs ({layer.name!r} vs {name!r})")
        for vspec, dv in zip(layer.views, dviews, strict=True):
            yield name, vspec, dv


def _token_units(where, dst_ids, num_tokens, sbs: int, dbs: int) -> tuple[np.ndarray, ...]:
    """Per token row the kernel copies: (index in staging, source slot, destination
    block, destination slot); whole blocks (one block size): every slot of each pair."""
    if num_tokens is None:
        slots = np.arange(sbs, dtype=np.int64)
        return (np.repeat(where, sbs), np.tile(slots, where.size),
                np.repeat(dst_ids, sbs), np.tile(slots, dst_ids.size))  # fmt: skip
    t = np.arange(num_tokens, dtype=np.int64)
    return where[t // sbs], t % sbs, dst_ids[t // dbs], t % dbs


def _row_tasks(stage, staging, src, dst_layers, where, dst_ids, num_tokens, heads):
    """The kernel's work: per (layer, view), the byte address of every token's first
    row in staging and in the destination view (tokens: whole blocks' slots, or the
    first ``num_tokens`` tokens of the two block sizes), heads and row bytes."""
    tasks = []
    units: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}  # per (src bs, dst bs)
    for name, vspec, dv in _view_pairs(src, dst_layers):
        sizes = (vspec.shape[1], dv.shape[1])
        if sizes not in units:  # the same for every layer: computed once
            units[sizes] = _token_units(where, dst_ids, num_tokens, *sizes)
        s_idx, s_slot, d_blk, d_slot = units[sizes]
        isz, dsz = vspec.itemsize, dv.element_size()
        if vspec.shape[-1] * isz != dv.shape[-1] * dsz:
            raise StagingUnsupported(f"rows of {name} differ in bytes")
        ds = [x * dsz for x in dv.stride()]
        hs = hd = slice(0, 1)
        s_head = d_head = 0
        if len(vspec.shape) == 4:
            hs, hd = _head_slices(heads, vspec, dv)
            s_head, d_head = vspec.strides[2] * isz, ds[2]
        pos = _stage_positions(stage, vspec)
        tasks.append(rk.RowTask(
            src=staging.data_ptr() + pos[s_idx] + s_slot * (vspec.strides[1] * isz)
            + hs.start * s_head,
            dst=dv.data_ptr() + d_blk * ds[0] + d_slot * ds[1] + hd.start * d_head,
            heads=hs.stop - hs.start, src_head=s_head, dst_head=d_head,
            row=vspec.shape[-1] * isz,
        ))  # fmt: skip
    return tasks


def _run_indices(
    starts: tuple[int, ...],
    where: np.ndarray,
    dst_ids: np.ndarray,
    num_tokens: int | None,
    src_bs: int,
    dst_bs: int,
) -> list[tuple[np.ndarray, ...] | None]:
    """Per staged run: the index arrays of its copies (``None``: nothing from it):
    (source block in the run, destination block) per block, or (source block in the
    run, source slot, destination block, destination slot) per token."""
    if num_tokens is None:
        pos, cols = where, (dst_ids,)
    else:
        t = np.arange(num_tokens, dtype=np.int64)
        pos, cols = where[t // src_bs], (t % src_bs, dst_ids[t // dst_bs], t % dst_bs)
    run = np.searchsorted(np.asarray(starts, dtype=np.int64), pos, side="right") - 1
    out: list[tuple[np.ndarray, ...] | None] = []
    for k, a in enumerate(starts):
        sel = np.flatnonzero(run == k)
        out.append((pos[sel] - a, *(c[sel] for c in cols)) if sel.size else None)
    return out


def _upload(index: dict, device: torch.device) -> dict:
    """Every index array on ``device`` with one copy (pinned and non-blocking on CUDA:
    a blocking upload would wait for all work queued on the stream, decode steps too)."""
    flat = [a for runs in index.values() for r in runs if r is not None for a in r]
    if not flat:
        return {key: [None] * len(runs) for key, runs in index.items()}
    host = torch.from_numpy(np.concatenate(flat))
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    out, pos = {}, 0
    for key, runs in index.items():
        got = []
        for r in runs:
            if r is None:
                got.append(None)
                continue
            parts = []
            for a in r:
                parts.append(dev[pos : pos + a.size])
                pos += a.size
            got.append(tuple(parts))
        out[key] = got
    return out


class StagingBuffer:
    """A registered staging buffer, grown on demand; one request uses it at a time."""

    def __init__(self, transport: Transport, device: str):
        self.transport = transport
        self.device = device
        self.tensor: torch.Tensor | None = None
        self.region: int | None = None
        self.ready: torch.cuda.Event | None = None  # set: a relayout may still read it

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel()

    def ensure(self, nbytes: int, limit: int) -> tuple[torch.Tensor, int]:
        """A registered buffer of at least ``nbytes`` (at most ``limit`` bytes)."""
        if self.tensor is None or self.tensor.numel() < nbytes:
            size = min(limit, max(nbytes, 1 << 20, 2 * self.nbytes))
            self.release()
            tensor = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.region = self.transport.register_region(
                MemRegion(tensor.data_ptr(), size, str(tensor.device))
            )
            self.tensor = tensor
        return self.tensor, self.region

    def wait_ready(self) -> None:
        """Block until the last relayout out of this buffer has read it (CUDA only)."""
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.synchronize()

    def release(self) -> None:
        self.wait_ready()
        if self.region is not None:
            self.transport.deregister_region(self.region)
        self.tensor, self.region = None, None


class StagingPool:
    """Staging buffers for concurrent staged reads, ``max_bytes`` in all.

    ``acquire`` waits (bounded) for a free buffer; a staged read holds its buffer
    from post to relayout. A buffer given back with the relayout's CUDA event is
    handed out again only once that event completed (the copies out of it are
    queued, not done, when the request finishes). ``max_buffers`` bounds the staged
    reads in flight: as many as a decode daemon pulls at once for a full batch (with
    4, 64 concurrent pulls of a relayout went through in waves of 4 and waited
    seconds for a buffer).
    """

    def __init__(self, transport: Transport, device: str, max_bytes: int, max_buffers: int = 64):
        self.transport, self.device = transport, device
        self.max_bytes, self.max_buffers = max_bytes, max_buffers
        self._cond = threading.Condition()
        self._free: list[StagingBuffer] = []
        self._busy: set[StagingBuffer] = set()

    def acquire(self, nbytes: int, timeout: float) -> tuple[StagingBuffer, torch.Tensor, int]:
        if nbytes > self.max_bytes:
            raise StagingUnsupported(f"needs {nbytes} staging bytes, limit {self.max_bytes}")
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._free or len(self._busy) < self.max_buffers, timeout
            ):
                raise TimeoutError(f"no staging buffer free within {timeout:.3g} s")
            fits = [b for b in self._free if b.nbytes >= nbytes]
            buf = (fits or self._free or [None])[0]
            if buf is None:
                buf = StagingBuffer(self.transport, self.device)
            else:
                self._free.remove(buf)
            self._busy.add(buf)
            # under the lock: other threads take and give back buffers meanwhile
            others = sum(b.nbytes for b in self._free) + sum(
                b.nbytes for b in self._busy if b is not buf
            )
        try:
            buf.wait_ready()  # the engine must not write it while a relayout reads it
            limit = self.max_bytes - others
            if nbytes > limit:
                raise StagingUnsupported(
                    f"needs {nbytes} staging bytes, {limit} left of {self.max_bytes}"
                )
            tensor, region = buf.ensure(nbytes, limit)
        except BaseException:
            self.give_back(buf)
            raise
        return buf, tensor, region

    def give_back(self, buf: StagingBuffer, ready: torch.cuda.Event | None = None) -> None:
        """Return ``buf``; ``ready``: the event after the last copies that read it."""
        with self._cond:
            buf.ready = ready
            self._busy.discard(buf)
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            for buf in [*self._free, *self._busy]:
                buf.release()
            self._free.clear()
            self._busy.clear()

"""Ground-truth harness for topology plans: raw byte copies and torch-indexing truth.

Reusable by transport tests: ``region_bytes`` gives uint8 views over a spec's
regions, ``apply_plan`` copies every descriptor's bytes, ``expected_copy`` does
the same transfer with torch indexing on the logical views (a byte-level view
per logical view, so any dtype works), and ``assert_same_storages`` compares
every byte of the destination's allocations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from kvbridge.topology import TopologySpec, TransferPlan

Layers = Mapping[str, Sequence[torch.Tensor]]


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole untyped storage of ``t``."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def distinct_storages(layers: Layers) -> list[torch.Tensor]:
    """uint8 views of each distinct storage behind ``layers`` (first-appearance order)."""
    seen, out = set(), []
    for views in layers.values():
        for v in views:
            ptr = v.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                out.append(storage_bytes(v))
    return out


def region_bytes(spec: TopologySpec, layers: Layers) -> list[torch.Tensor]:
    """For each region of ``spec``, a uint8 view of exactly its bytes."""
    stores = distinct_storages(layers)
    out = []
    for r in spec.regions:
        for s in stores:
            base = s.data_ptr()
            if base <= r.addr and r.addr + r.nbytes <= base + s.numel():
                out.append(s[r.addr - base : r.addr - base + r.nbytes])
                break
        else:
            raise AssertionError(f"region {r.index} lies in no storage of the given layers")
    return out


def apply_plan(plan: TransferPlan, src_regions, dst_regions) -> None:
    """Copy every descriptor's bytes, vectorised per (src region, dst region)."""
    sreg, dreg, soff, doff, nb = (
        plan.src_region, plan.dst_region, plan.src_offset, plan.dst_offset, plan.nbytes
    )  # fmt: skip
    assert (nb > 0).all(), "empty descriptor"
    for s, d in {(int(a), int(b)) for a, b in zip(sreg, dreg, strict=True)}:
        sel = (sreg == s) & (dreg == d)
        n = nb[sel]
        starts = np.repeat(np.cumsum(n) - n, n)
        within = np.arange(int(n.sum())) - starts
        src_idx = torch.from_numpy(np.repeat(soff[sel], n) + within)
        dst_idx = torch.from_numpy(np.repeat(doff[sel], n) + within)
        assert int(src_idx.max()) < src_regions[s].numel(), "read outside the source region"
        assert int(dst_idx.max()) < dst_regions[d].numel(), "write outside the destination region"
        dst_regions[d][dst_idx] = src_regions[s][src_idx]


def byte_view(v: torch.Tensor, storage: torch.Tensor | None = None) -> torch.Tensor:
    """``v`` as uint8 with a trailing itemsize dim, over ``storage`` (default: its own)."""
    storage = storage_bytes(v) if storage is None else storage
    size = v.element_size()
    return storage.as_strided(
        (*v.shape, size), (*(s * size for s in v.stride()), 1), v.storage_offset() * size
    )


def clone_storages(layers: Layers) -> dict[int, torch.Tensor]:
    """Copies of every distinct storage, keyed by the original's data_ptr."""
    return {s.data_ptr(): s.clone() for s in distinct_storages(layers)}


def expected_copy(
    src: Layers,
    dst: Layers,
    src_ids,
    dst_ids,
    num_tokens: int | None = None,
    src_head_start: int = 0,
    dst_head_start: int = 0,
    num_heads: int | None = None,
) -> dict[int, torch.Tensor]:
    """The destination's storages after the transfer, computed with torch indexing."""
    out = clone_storages(dst)
    s_ids = torch.as_tensor(np.asarray(src_ids), dtype=torch.long)
    d_ids = torch.as_tensor(np.asarray(dst_ids), dtype=torch.long)
    for name, dviews in dst.items():
        for sv, dv in zip(src[name], dviews, strict=True):
            sb = byte_view(sv)
            db = byte_view(dv, out[dv.untyped_storage().data_ptr()])
            hs = hd = slice(None)
            if sv.dim() == 4:
                nh = num_heads or min(sv.shape[2] - src_head_start, dv.shape[2] - dst_head_start)
                hs = slice(src_head_start, src_head_start + nh)
                hd = slice(dst_head_start, dst_head_start + nh)
            if num_tokens is None:
                if sv.dim() == 4:
                    db[d_ids, :, hd] = sb[s_ids, :, hs]
                else:
                    db[d_ids] = sb[s_ids]
                continue
            tok = sb[s_ids].flatten(0, 1)[:num_tokens]
            t = torch.arange(num_tokens)
            blk, slot = d_ids[t // dv.shape[1]], t % dv.shape[1]
            if sv.dim() == 4:
                db[blk, slot, hd] = tok[:, hs]
            else:
                db[blk, slot] = tok
    return out


def assert_same_storages(actual: Layers, expected: dict[int, torch.Tensor]) -> None:
    """Every byte of every destination storage equals the expected bytes."""
    for s in distinct_storages(actual):
        exp = expected[s.data_ptr()]
        if not torch.equal(s, exp):
            bad = torch.nonzero(s != exp).flatten()
            raise AssertionError(
                f"{bad.numel()} of {s.numel()} destination bytes differ, "
                f"first at byte {int(bad[0])}"
            )


def poison_(layers: Layers, seed: int) -> None:
    """Overwrite every destination storage with fresh random bytes."""
    g = torch.Generator().manual_seed(seed)
    for s in distinct_storages(layers):
        s.copy_(torch.randint(0, 256, s.shape, dtype=torch.uint8, generator=g))


def run_plan(
    src: Layers, dst: Layers, src_ids, dst_ids, *, planner=TransferPlan.between, **kw
) -> TransferPlan:
    """Plan ``src -> dst``, check it against torch-indexing truth, return the plan."""
    from kvbridge.topology import TransferTopology

    s_topo, d_topo = TransferTopology.from_caches(src), TransferTopology.from_caches(dst)
    plan = planner(s_topo.spec(), d_topo.spec(), src_ids, dst_ids, **kw)
    expected = expected_copy(src, dst, src_ids, dst_ids, **kw)
    apply_plan(plan, region_bytes(s_topo.spec(), src), region_bytes(d_topo.spec(), dst))
    assert_same_storages(dst, expected)
    # each descriptor lies within its regions and the plan moves no byte twice
    for reg, off, regions in (
        (plan.src_region, plan.src_offset, s_topo.regions),
        (plan.dst_region, plan.dst_offset, d_topo.regions),
    ):
        sizes = np.array([r.nbytes for r in regions])
        assert (off >= 0).all() and (off + plan.nbytes <= sizes[reg]).all()
    order = np.lexsort((plan.dst_offset, plan.dst_region))
    r, o, n = plan.dst_region[order], plan.dst_offset[order], plan.nbytes[order]
    assert not ((r[1:] == r[:-1]) & (o[1:] < o[:-1] + n[:-1])).any(), "overlapping writes"
    return plan


def truth_block_mask(layers: Layers, block_ids) -> dict[int, torch.Tensor]:
    """Per storage, a 0/1 byte mask of the selected blocks' bytes (torch indexing)."""
    masks = {s.data_ptr(): torch.zeros_like(s) for s in distinct_storages(layers)}
    ids = torch.as_tensor(np.asarray(block_ids), dtype=torch.long)
    for views in layers.values():
        for v in views:
            byte_view(v, masks[v.untyped_storage().data_ptr()])[ids] = 1
    return masks


def ranges_mask(spec: TopologySpec, layers: Layers, ranges) -> dict[int, torch.Tensor]:
    """Per storage, a 0/1 byte mask of ``ranges``; asserts no byte is covered twice."""
    masks = {s.data_ptr(): torch.zeros_like(s) for s in distinct_storages(layers)}
    regions = region_bytes(spec, layers)
    triples = zip(
        ranges.region.tolist(), ranges.offset.tolist(), ranges.nbytes.tolist(), strict=True
    )
    for r, o, n in triples:
        assert n > 0 and o >= 0 and o + n <= regions[r].numel(), "range outside its region"
        store = regions[r].untyped_storage().data_ptr()
        base = regions[r].data_ptr() - store + o
        piece = masks[store][base : base + n]
        assert int(piece.max()) == 0, "byte covered by two ranges"
        piece.fill_(1)
    return masks

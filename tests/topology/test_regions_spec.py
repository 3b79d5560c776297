"""Regions (one per backing allocation, overlaps merged) and the wire spec."""

from __future__ import annotations

import itertools

import msgspec
import pytest
import torch
from kvbridge.topology import LayoutError, TopologySpec, TransferPlan, TransferTopology, layouts

KW = dict(num_layers=3, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=8,
          kv_lora_rank=16, rope_dim=8, page_bytes=64)  # fmt: skip
REGIONS_PER_LAYER = {"nhd": 2, "hnd": 2, "packed": 1, "interleaved": 1, "kv_outer": 1,
                     "head_groups": 1, "mla": 1, "state": 1}  # fmt: skip


def _topo(layout, **kw):
    return TransferTopology.from_caches(layouts.allocate(layout, **{**KW, **kw}).layers)


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_one_region_per_allocation(layout):
    cache = layouts.allocate(layout, **KW, storage_offset=3, block_pad=2)
    topo = TransferTopology.from_caches(cache.layers)
    want = 1 if layout == "cross_layer" else KW["num_layers"] * REGIONS_PER_LAYER[layout]
    assert len(topo.regions) == want == len(cache.backing)
    for i, r in enumerate(topo.regions):
        assert r.index == i and r.nbytes > 0
        # the region is the span the views touch: starts at the first element
        # (storage offset excluded) and ends at the last byte of the last element
        flat = next(b for b in cache.backing if b.data_ptr() <= r.addr < b.data_ptr() + b.nbytes)
        assert r.addr == flat.data_ptr() + 3 * flat.element_size()
        assert r.addr + r.nbytes <= flat.data_ptr() + flat.nbytes
    assert topo.regions[0].layers[0] == "layer0"


def test_region_order_is_first_appearance():
    a = torch.empty(8, 4, 16)
    b = torch.empty(8, 4, 16)
    t1 = TransferTopology.from_caches({"x": (b, a), "y": (a,)})
    assert [r.addr for r in t1.regions] == [b.data_ptr(), a.data_ptr()]
    assert t1.regions[1].layers == ("x", "y")


def test_overlapping_allocations_merge_into_one_region():
    buf = torch.empty(1 << 12, dtype=torch.float16)
    # two storages over overlapping memory (as from_blob / numpy wrapping would give)
    # layer a: first half of each 256-element block; layer b: second half
    x = buf.as_strided((8, 16, 8), (256, 8, 1))
    y = torch.from_numpy(buf.numpy()[128:]).as_strided((8, 16, 8), (256, 8, 1))
    assert y.untyped_storage().data_ptr() == x.data_ptr() + 256
    topo = TransferTopology.from_caches({"a": x, "b": y})
    assert len(topo.regions) == 1 and topo.regions[0].layers == ("a", "b")
    assert topo.regions[0].addr == x.data_ptr() and topo.regions[0].nbytes == 2048 * 2
    assert len(topo.block_ranges(range(8))) == 1
    # b shifted by one block onto a's bytes: aliasing, refused
    z = torch.from_numpy(buf.numpy()[256:]).as_strided((7, 16, 8), (256, 8, 1))
    with pytest.raises(LayoutError, match="alias the same bytes for different blocks"):
        TransferTopology.from_caches({"a": x[:7], "b": z})


def test_layers_in_one_allocation_share_a_region_noncontiguous_views():
    kv = torch.empty(10, 2, 4, 16, 8)  # interleaved; the two layers are separate halves of dim 1
    topo = TransferTopology.from_caches({"a": kv[:, 0], "b": kv[:, 1]})
    assert len(topo.regions) == 1 and topo.regions[0].layers == ("a", "b")
    assert len(topo.block_ranges(range(10))) == 1


def test_spec_round_trip_and_hashes():
    cache = layouts.allocate("packed", **KW, storage_offset=5)  # kept alive: distinct addresses
    topo = TransferTopology.from_caches(cache.layers)
    spec = topo.spec()
    data = spec.encode()
    back = TopologySpec.decode(data)
    assert back == spec and back.layout_hash == spec.layout_hash
    assert TransferTopology.from_spec(data).regions == topo.regions
    # same layout elsewhere in memory: same hashes
    other = _topo("packed", storage_offset=5).spec()
    assert other.layout_hash == spec.layout_hash and other.compat_hash == spec.compat_hash
    assert other.regions[0].addr != spec.regions[0].addr
    # another physical layout of the same logical cache: compatible, not identical
    nhd = _topo("nhd").spec()
    assert nhd.compat_hash == spec.compat_hash and nhd.layout_hash != spec.layout_hash
    # TP and block size do not change compatibility; head_dim and dtype do
    assert _topo("nhd", num_kv_heads=4, block_size=8).spec().compat_hash == spec.compat_hash
    assert _topo("nhd", head_dim=16).spec().compat_hash != spec.compat_hash
    assert _topo("nhd", dtype=torch.bfloat16).spec().compat_hash != spec.compat_hash


def test_spec_carries_geometry():
    cache = layouts.allocate("packed", **KW, storage_offset=5)
    spec = TransferTopology.from_caches(cache.layers).spec()
    k, v = cache.layers["layer1"]
    vk, vv = spec.layers[1].views
    assert vk.shape == tuple(k.shape) and vk.strides == k.stride() and vk.dtype == "float16"
    assert vv.offset - vk.offset == (v.data_ptr() - k.data_ptr())
    assert spec.regions[vk.region].addr + vk.offset == k.data_ptr()
    assert spec.num_blocks == 10 and vk.itemsize == 2


def test_decode_rejects_bad_specs():
    spec = _topo("nhd").spec()
    with pytest.raises(LayoutError, match="malformed"):
        TopologySpec.decode(b"\x00garbage")
    with pytest.raises(LayoutError, match="version"):
        TopologySpec.decode(msgspec.structs.replace(spec, version=99).encode())
    with pytest.raises(LayoutError, match="layout_hash"):
        TopologySpec.decode(msgspec.structs.replace(spec, num_blocks=spec.num_blocks).encode()
                            .replace(spec.layout_hash.encode(), b"0" * 32))  # fmt: skip
    # a view reaching past its region: bytes outside registered memory
    big = msgspec.structs.replace(spec.layers[0].views[0], offset=spec.regions[0].nbytes)
    layers = (msgspec.structs.replace(spec.layers[0], views=(big, spec.layers[0].views[1])),
              *spec.layers[1:])  # fmt: skip
    bad = TopologySpec.build(spec.num_blocks, spec.regions, layers)
    with pytest.raises(LayoutError, match=r"layer 'layer0' view 0: bytes .* outside region"):
        TopologySpec.decode(bad.encode())


def test_meta_tensors_plan_at_full_scale_without_memory():
    cache = layouts.allocate("packed", num_layers=4, num_blocks=200_000, block_size=16,
                             num_kv_heads=8, head_dim=128, device="meta")  # fmt: skip
    topo = TransferTopology.from_caches(cache.layers)
    assert len(topo.regions) == 4 and topo.regions[0].nbytes == 200_000 * 16 * 8 * 256 * 2
    ends = sorted((r.addr, r.addr + r.nbytes) for r in topo.regions)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ends))  # disjoint virtual spans
    plan = TransferPlan.between(topo, topo, range(1000), range(5000, 6000))
    assert plan.num_descriptors == 4 and plan.total_bytes == 4 * 1000 * 16 * 8 * 256 * 2

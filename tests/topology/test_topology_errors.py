"""Bad input: a LayoutError that names the layer (or side) and the problem."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
from kvbridge.topology import LayoutError, TopologySpec, TransferPlan, TransferTopology, layouts

KW = dict(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)


def _spec(layout="nhd", **kw):
    return TransferTopology.from_caches(layouts.allocate(layout, **{**KW, **kw}).layers).spec()


def test_bad_caches():
    x = torch.empty(8, 4, 2, 8)
    with pytest.raises(LayoutError, match="non-empty mapping"):
        TransferTopology.from_caches({})
    with pytest.raises(LayoutError, match="layer 'a' view 0: a 1-D tensor has no block dimension"):
        TransferTopology.from_caches({"a": torch.empty(8)})
    with pytest.raises(LayoutError, match=r"layer 'a' view 1: expected a torch.Tensor"):
        TransferTopology.from_caches({"a": (x, np.zeros(3))})
    with pytest.raises(LayoutError, match="layer 'a': expected a tensor or a non-empty"):
        TransferTopology.from_caches({"a": ()})
    with pytest.raises(LayoutError, match="layer 'b' view 0: 4 blocks, but layer 'a'"):
        TransferTopology.from_caches({"a": x, "b": torch.empty(4, 4, 2, 8)})
    with pytest.raises(LayoutError, match="layer 'a' view 0: zero stride in the block dim"):
        TransferTopology.from_caches({"a": torch.empty(1, 4, 2, 8).expand(8, 4, 2, 8)})
    with pytest.raises(LayoutError, match="layer 'a' view 0: empty per-block shape"):
        TransferTopology.from_caches({"a": torch.empty(8, 0, 2)})


def test_aliasing_views():
    buf = torch.empty(9 * 64)
    k = buf[:512].view(8, 64)
    v = buf[64:].view(8, 64)  # v's block b is k's block b + 1
    with pytest.raises(LayoutError, match="layer 'a' view 0 and layer 'a' view 1 alias the same"):
        TransferTopology.from_caches({"a": (k, v)})
    # a block stride smaller than the block: blocks overlap each other
    over = buf.as_strided((8, 64), (32, 1))
    with pytest.raises(LayoutError, match="layer 'a' view 0: blocks overlap"):
        TransferTopology.from_caches({"a": over})
    # the same bytes for the same block (shared KV, or MLA's V inside K) is fine
    TransferTopology.from_caches({"a": (k, k[:, :32]), "b": (k,)})


def test_negative_strides_in_a_spec():
    spec = _spec()
    v = spec.layers[0].views[0]
    bad = msgspec.structs.replace(v, strides=(v.strides[0], -v.strides[1], *v.strides[2:]))
    layers = (msgspec.structs.replace(spec.layers[0], views=(bad, spec.layers[0].views[1])),
              *spec.layers[1:])  # fmt: skip
    with pytest.raises(
        LayoutError, match=r"layer 'layer0' view 0: negative stride \(-16\) in dim 1"
    ):
        TopologySpec.decode(TopologySpec.build(spec.num_blocks, spec.regions, layers).encode())


def test_peer_mismatches():
    src = _spec()
    with pytest.raises(
        LayoutError, match=r"layer 'layer0' view 0: dtype mismatch .*float16.*bfloat16"
    ):
        TransferPlan.between(src, _spec(dtype=torch.bfloat16), [0], [0])
    with pytest.raises(LayoutError, match=r"layer 'layer0' view 0: head_dim mismatch .*8.*16"):
        TransferPlan.between(src, _spec(head_dim=16), [0], [0])
    with pytest.raises(LayoutError, match="layer 'layer2' exists on the destination"):
        TransferPlan.between(src, _spec(num_layers=3), [0], [0])
    with pytest.raises(LayoutError, match="layer 'layer0': 2 views on the source, 1 on the"):
        TransferPlan.between(src, _spec("mla", kv_lora_rank=8, rope_dim=8), [0], [0])
    with pytest.raises(
        LayoutError, match=r"layer 'layer0' view 0: block sizes differ .*num_tokens"
    ):
        TransferPlan.between(src, _spec(block_size=8), [0], [0])
    with pytest.raises(LayoutError, match="layer 'layer0' view 0: head counts differ"):
        TransferPlan.between(src, _spec(num_kv_heads=4), [0], [0])
    with pytest.raises(
        LayoutError, match=r"layer 'layer0' view 0: head range out of bounds: source heads \[1, 3\)"
    ):
        TransferPlan.between(src, src, [0], [0], src_head_start=1, num_heads=2)
    with pytest.raises(LayoutError, match="negative head start"):
        TransferPlan.between(src, src, [0], [0], dst_head_start=-1)
    with pytest.raises(LayoutError, match="2-D view has no token dim"):
        s = _spec("state", page_bytes=64)
        TransferPlan.between(s, s, [0], [0], num_tokens=3)
    with pytest.raises(LayoutError, match="source: expected a TopologySpec"):
        TransferPlan.between(b"bytes", src, [0], [0])


def test_bad_block_ids():
    s = _spec()
    topo = TransferTopology.from_spec(s)
    with pytest.raises(LayoutError, match=r"source: block id 8 out of range \[0, 8\)"):
        TransferPlan.between(s, s, [1, 8], [2, 3])
    with pytest.raises(LayoutError, match="destination: block id -1 out of range"):
        TransferPlan.between(s, s, [1, 2], [-1, 3])
    with pytest.raises(LayoutError, match="source: block id 2 appears more than once"):
        TransferPlan.between(s, s, [2, 1, 2], [3, 4, 5])
    with pytest.raises(LayoutError, match="destination: block id 5 appears more than once"):
        TransferPlan.between(s, s, [2, 1, 3], [5, 4, 5])
    with pytest.raises(LayoutError, match="3 source block ids but 2 destination block ids"):
        TransferPlan.between(s, s, [1, 2, 3], [4, 5])
    with pytest.raises(LayoutError, match="block ids must be integers"):
        TransferPlan.between(s, s, [1.0], [2.0])
    with pytest.raises(LayoutError, match="block ids must be 1-D"):
        topo.block_ranges([[1, 2]])
    with pytest.raises(LayoutError, match="block_ranges: block id 3 appears more than once"):
        topo.block_ranges([3, 1, 3])
    with pytest.raises(
        LayoutError, match="source: 9 tokens in blocks of 4 need 3 block ids, got 2"
    ):
        TransferPlan.between(s, s, [1, 2], [3, 4, 5], num_tokens=9)
    with pytest.raises(LayoutError, match="num_tokens must be >= 0"):
        TransferPlan.between(s, s, [], [], num_tokens=-1)


def test_destination_views_that_overlap():
    """Two source views landing on the same destination bytes are refused."""
    src = _spec()
    buf = torch.empty(8 * 4 * 2 * 8, dtype=torch.float16).view(8, 4, 2, 8)
    dst = TransferTopology.from_caches({"layer0": (buf, buf), "layer1": (buf, buf)}).spec()
    with pytest.raises(LayoutError, match="destination views overlap"):
        TransferPlan.between(src, dst, [0], [0])

    # a zero stride inside a destination block: several source elements per byte
    def fresh(heads=2, bs=4):
        return torch.empty(8, bs, heads, 8, dtype=torch.float16)

    zero = fresh(1).expand(8, 4, 2, 8)
    dst = TransferTopology.from_caches({"layer0": (zero, fresh()), "layer1": (fresh(), fresh())})
    with pytest.raises(LayoutError, match=r"destination views overlap.*'layer0' view 0"):
        TransferPlan.between(src, dst, [0], [0])
    # as a source, the same layout is fine (reading a byte twice is harmless)
    TransferPlan.between(dst, src, [0], [0])
    # token space: destination tokens overlapping each other within a block
    tok = fresh(bs=8).as_strided((8, 8, 2, 8), (128, 8, 16, 1))
    other = {"layer1": (fresh(bs=8), fresh(bs=8))}
    dst = TransferTopology.from_caches({"layer0": (tok, fresh(bs=8)), **other})
    with pytest.raises(LayoutError, match="destination views overlap"):
        TransferPlan.between(src, dst, [0, 1], [0], num_tokens=8)


def test_size_guards(monkeypatch):
    """Pathological geometries fail with a clear error instead of exhausting memory."""
    from kvbridge.topology import expand, intervals

    monkeypatch.setattr(intervals, "MAX_PIECES_PER_UNIT", 4)
    odd = torch.empty(7, 5, 3, 4, dtype=torch.float16)[..., :2]  # 15 runs of 2 per block
    with pytest.raises(LayoutError, match="layer 'x' view 0: too fragmented: 15 pieces"):
        TransferTopology.from_caches({"x": odd})
    monkeypatch.undo()
    monkeypatch.setattr(expand, "MAX_DESCRIPTORS", 100)
    src = _spec("packed", num_blocks=40)
    dst = _spec("nhd", num_blocks=40)
    with pytest.raises(LayoutError, match="too fragmented; read whole source blocks"):
        TransferPlan.between(src, dst, range(40), range(40))


def test_alias_check_by_residues(monkeypatch):
    """The residue-class alias check (used for many intervals) agrees on both verdicts."""
    from kvbridge.topology import analysis

    monkeypatch.setattr(analysis, "_PAIRWISE_MAX", 0)
    buf = torch.empty(11 * 48)
    k, v = buf[: 10 * 48].view(10, 48), buf[48:].view(10, 48)
    with pytest.raises(LayoutError, match="alias the same bytes for different blocks"):
        TransferTopology.from_caches({"a": (k, v)})
    planes = buf[: 10 * 48].view(2, 10, 24)  # kv_outer-like: two planes, no aliasing
    topo = TransferTopology.from_caches({"a": (planes[0], planes[1])})
    assert len(topo.block_ranges(range(3, 6))) == 2

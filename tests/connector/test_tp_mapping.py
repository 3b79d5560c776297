"""Head mapping between TP ranks, sharded and replicated, done once per peer."""

from __future__ import annotations

import pytest
from kvbridge.connector.transfer.errors import IncompatiblePeerError
from kvbridge.connector.transfer.tp_mapping import HeadMap, RankHeads, head_map, map_peer
from kvbridge.topology import TransferTopology
from kvbridge.topology.layouts import allocate


def _spec(heads: int):
    cache = allocate("nhd", num_layers=2, num_blocks=4, block_size=2, num_kv_heads=heads,
                     head_dim=8, device="meta")  # fmt: skip
    return TransferTopology.from_caches(cache.layers).spec()


def _global_heads(rank_heads: RankHeads) -> set[int]:
    return set(range(rank_heads.start, rank_heads.start + rank_heads.count))


def test_replicated_ranks_hold_the_head_vllm_assigns():
    # TP 16 over 8 KV heads: ranks 2k and 2k+1 both hold head k
    held = [RankHeads.of(r, 16, 1, 8) for r in range(16)]
    assert [h.start for h in held] == [r // 2 for r in range(16)]
    assert all(h.count == 1 for h in held)


@pytest.mark.parametrize("dst_tp", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("src_tp", [1, 2, 8, 16])
def test_every_pairing_moves_exactly_the_shared_heads(src_tp, dst_tp):
    total = 8
    src_h, dst_h = max(1, total // src_tp), max(1, total // dst_tp)
    src_spec, dst_spec = _spec(src_h), _spec(dst_h)
    for s in range(src_tp):
        for d in range(dst_tp):
            heads = map_peer(dst_spec, d, dst_tp, total, src_spec, s, src_tp, total, "p")
            src = RankHeads.of(s, src_tp, src_h, total)
            dst = RankHeads.of(d, dst_tp, dst_h, total)
            shared = _global_heads(src) & _global_heads(dst)
            if not shared:
                with pytest.raises(IncompatiblePeerError, match="share no head"):
                    heads.for_op("READ")
                continue
            m = heads.for_op("READ")  # the peer (source) -> us (destination)
            n = m.num if m.num is not None else min(src_h - m.src_start, dst_h - m.dst_start)
            moved_src = {src.start + m.src_start + i for i in range(n)}
            moved_dst = {dst.start + m.dst_start + i for i in range(n)}
            assert moved_src == moved_dst == shared


def test_mismatched_models_are_refused_at_handshake():
    with pytest.raises(IncompatiblePeerError, match=r"8-head model.*16-head model|16-head"):
        map_peer(_spec(8), 0, 1, 0, _spec(8), 0, 2, 0, "p")  # 8x1 vs 8x2 heads
    with pytest.raises(IncompatiblePeerError, match="cannot hold a model of 8"):
        map_peer(_spec(2), 0, 16, 8, _spec(8), 0, 1, 8, "p")


def test_same_rank_same_heads_is_the_identity():
    assert head_map(RankHeads(0, 4), RankHeads(0, 4), "p") == HeadMap()

"""Heterogeneous peers across processes: TP head ranges, block sizes, layouts, staging.

Truth is torch indexing on regenerated logical views (head and token keywords of
``expected_copy``); every byte of the receiving cache is compared.
"""

from __future__ import annotations

import pytest
from xfer_harness import CacheCfg, link, prepare, pull, push

IDS_SRC, IDS_DST = [2, 3, 4, 11], [9, 10, 11, 0]


@pytest.mark.parametrize(("src_layout", "staged"), [("nhd", True), ("hnd", False)])
def test_decode_tp2_reads_head_ranges_from_prefill_tp1(procs, src_layout, staged):
    """Each decode rank (2 heads) pulls its half of a TP=1 prefill's 4 heads.

    NHD head slices are one small run per token: the plan is fragmented and the
    agent stages whole blocks; HND head slices are contiguous: read directly.
    """
    a, b = procs
    prefill = CacheCfg(src_layout, 301).with_(num_kv_heads=4)
    for rank in (0, 1):
        decode = CacheCfg(src_layout, 310 + rank, poison=320 + rank).with_(num_kv_heads=2)
        _, _, was_staged = pull(
            a, decode, b, prefill, IDS_SRC, IDS_DST,
            a_opts={"tp_rank": rank, "tp_size": 2}, b_opts={"tp_size": 1},
            truth={"src_head_start": 2 * rank, "dst_head_start": 0, "num_heads": 2},
        )  # fmt: skip
        assert was_staged is staged


def test_decode_tp4_replicated_heads_read_from_prefill_tp1(procs):
    """TP 4 over 2 KV heads: ranks 0, 1 hold head 0 and ranks 2, 3 head 1 (replicated);
    the handshake maps each rank onto its head of a TP=1 prefill's two."""
    a, b = procs
    prefill = CacheCfg("hnd", 351).with_(num_kv_heads=2)
    for rank in range(4):
        decode = CacheCfg("nhd", 360 + rank, poison=370 + rank).with_(num_kv_heads=1)
        pull(
            a, decode, b, prefill, IDS_SRC, IDS_DST,
            a_opts={"tp_rank": rank, "tp_size": 4, "total_kv_heads": 2},
            b_opts={"tp_size": 1, "total_kv_heads": 2},
            truth={"src_head_start": rank // 2, "dst_head_start": 0, "num_heads": 1},
        )  # fmt: skip


def test_decode_tp1_reads_two_prefill_ranks_concurrently(procs):
    """A TP=1 decode (4 heads) pulls heads [0, 2) and [2, 4) from two TP=2 prefill ranks."""
    a, b = procs
    decode = CacheCfg("packed", 401, poison=402).with_(num_kv_heads=4)
    ranks = [CacheCfg("nhd", 410 + r).with_(num_kv_heads=2) for r in (0, 1)]
    d_name, _ = prepare(a, "A", decode, tp_size=1)
    names = []
    for r, cfg in enumerate(ranks):
        name, address = prepare(b, "B", cfg, tp_rank=r, tp_size=2)
        link(a, d_name, name, address)
        names.append(name)
    reads = [(name, IDS_SRC, IDS_DST, {"request_id": f"tp-{name}"}) for name in names]
    results = a.call("read_many", d_name, reads)
    assert len(results) == 2
    steps = [
        (cfg, IDS_SRC, IDS_DST, {"src_head_start": 0, "dst_head_start": 2 * r, "num_heads": 2})
        for r, cfg in enumerate(ranks)
    ]
    problem = a.call("verify", d_name, decode, steps)
    assert problem == "", problem
    for name in names:
        assert b.call("notice", name, f"tp-{name}", 10.0)[1] == "done"


def test_prefill_tp2_ranks_push_into_decode_tp1(procs):
    """Two prefill ranks each push their heads into one decode cache (direct, fragmented)."""
    a, b = procs
    decode = CacheCfg("hnd", 501, poison=502).with_(num_kv_heads=4)
    d_name, d_addr = prepare(b, "B", decode, tp_size=1)
    steps = []
    for r in (0, 1):
        cfg = CacheCfg("nhd", 510 + r).with_(num_kv_heads=2)
        name, _ = prepare(a, "A", cfg, tp_rank=r, tp_size=2)
        link(a, name, d_name, d_addr)
        a.call("write", name, d_name, IDS_SRC, IDS_DST, {"request_id": f"push-tp-{r}"})
        steps.append((cfg, IDS_SRC, IDS_DST, {"dst_head_start": 2 * r, "num_heads": 2}))
    problem = b.call("verify", d_name, decode, steps)
    assert problem == "", problem


@pytest.mark.parametrize("direction", ["pull", "push"])
def test_different_block_sizes_token_space(procs, direction):
    """Prefill blocks of 8 tokens (NHD) onto decode blocks of 4 (packed), 13 tokens."""
    a, b = procs
    big = CacheCfg("nhd", 601).with_(block_size=8, num_blocks=8)
    small = CacheCfg("packed", 602, poison=603).with_(block_size=4, num_blocks=16)
    big_ids, small_ids = [5, 2], [7, 0, 12, 3]
    kw = {"num_tokens": 13}
    if direction == "pull":
        pull(a, small, b, big, big_ids, small_ids, kw=kw, truth=kw)
    else:
        push(a, big.seeded(604), b, small, big_ids, small_ids, kw=kw, truth=kw)


@pytest.mark.parametrize(
    ("src", "dst", "staging"),
    [
        ("hnd", "kv_outer", "never"),
        ("cross_layer", "nhd", "auto"),
        ("interleaved", "head_groups", "always"),
        ("kv_outer", "packed", "always"),
        ("mla", "mla", "always"),
        ("state", "state", "always"),
        ("cross_layer", "hnd", "always"),
    ],
)
def test_different_layouts(procs, src, dst, staging):
    a, b = procs
    _, _, staged = pull(
        a, CacheCfg(dst, 701, poison=702), b, CacheCfg(src, 703), IDS_SRC, IDS_DST,
        kw={"staging": staging},
    )  # fmt: skip
    if staging == "always":
        assert staged
    if staging == "never":
        assert not staged


def test_staged_token_mode_pull(procs):
    """Fragmented token-space pull (NHD bs 8 -> NHD bs 4 head slice) goes through staging."""
    a, b = procs
    src = CacheCfg("nhd", 801).with_(block_size=8, num_blocks=8, num_kv_heads=4)
    dst = CacheCfg("nhd", 802, poison=803).with_(block_size=4, num_blocks=16, num_kv_heads=2)
    kw = {"num_tokens": 11}
    truth = {**kw, "src_head_start": 2, "dst_head_start": 0, "num_heads": 2}
    _, _, staged = pull(
        a, dst, b, src, [6, 1], [4, 9, 2], a_opts={"tp_rank": 1, "tp_size": 2},
        kw={**kw, "staging": "always"}, truth=truth,
    )  # fmt: skip
    assert staged

"""Units under the fault tests: quarantine, guard bands, KV checksums, auth configuration.

The daemon-level tests exercise these with real engines; here each is pinned down
on its own (the quarantine with a stand-in "engine is done" predicate, the only
part that is not real).
"""

from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace

import pytest
import torch
from certs import TestCA, secret_file
from kvbridge.connector.serving.daemon.allocator import BlockAllocator
from kvbridge.connector.serving.daemon.checksum import kv_checksum
from kvbridge.connector.serving.daemon.guard import GuardBands
from kvbridge.connector.serving.daemon.quarantine import Quarantine
from kvbridge.connector.serving.daemon.security import AuthConfigError, ServerAuth
from kvbridge.topology import TransferTopology, layouts

pytestmark = pytest.mark.faults


def test_quarantined_blocks_are_never_allocated_until_the_engine_is_done():
    alloc = BlockAllocator(8)
    q = Quarantine(alloc)
    held = alloc.allocate(3)
    done = threading.Event()
    assert not q.release_or_hold(held, done.is_set, "test")
    assert q.num_blocks == 3 and alloc.num_free == 5
    got = alloc.allocate(5)  # everything else can be handed out...
    assert not set(got) & set(held)
    with pytest.raises(Exception, match="blocks requested"):
        alloc.allocate(1, timeout=0.2)  # ...but never a held block
    done.set()
    assert q.wait_empty(5.0) and q.num_blocks == 0
    assert sorted(alloc.allocate(3, timeout=1.0)) == sorted(held)
    # quiet at once: freed at once; a predicate that raises keeps the blocks
    assert alloc.num_free == 0
    alloc.free(got[:2])
    ids = alloc.allocate(2)
    assert q.release_or_hold(ids, lambda: True, "quiet") and alloc.num_free == 2

    def broken() -> bool:
        raise RuntimeError("engine gone")

    ids = alloc.allocate(2)
    assert not q.release_or_hold(ids, broken, "unknown") and q.num_blocks == 2
    assert not q.wait_empty(0.3)
    q.stop()


@pytest.mark.parametrize("layout", ["nhd", "hnd", "packed", "interleaved", "kv_outer",
                                    "head_groups", "cross_layer"])  # fmt: skip
def test_guard_bands_keep_views_and_catch_writes_outside(layout):
    gen = torch.Generator().manual_seed(3)
    cache = layouts.allocate(layout, num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2,
                             head_dim=8, dtype=torch.float32, generator=gen)  # fmt: skip
    g = GuardBands.wrap(cache, 100)
    for name, views in cache.layers.items():
        for old, new in zip(views, g.cache.layers[name], strict=True):
            assert new.shape == old.shape and new.stride() == old.stride()
            assert torch.equal(new, old)  # same data, new storage
            assert new.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()
    assert g.changed() == 0 and g.nbytes >= 2 * 100 * len(cache.backing)
    topo = TransferTopology.from_caches(g.cache.layers)
    for big in g.cache.backing:  # registered regions lie strictly inside each buffer
        lo, hi = big.data_ptr(), big.data_ptr() + big.numel() * big.element_size()
        inside = [r for r in topo.regions if lo <= r.addr < hi]
        assert inside and all(lo + 100 <= r.addr and r.addr + r.nbytes <= hi - 100
                              for r in inside)  # fmt: skip
    k = g.cache.kv("layer0")[0]
    k[-1, -1, -1, -1] = 12345.0  # the cache's last element: inside, bands untouched
    assert g.changed() == 0
    raw = g.cache.backing[-1].view(torch.uint8)
    raw[-1] ^= 0xFF  # one byte past the end of the data
    raw[3] ^= 0x0F
    assert g.changed() == 2


def test_kv_checksum_is_layout_independent_and_sensitive():
    kw = dict(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8,
              dtype=torch.float32)  # fmt: skip
    a = layouts.allocate("packed", generator=torch.Generator().manual_seed(1), **kw)
    b = layouts.allocate("nhd", generator=torch.Generator().manual_seed(2), **kw)
    src, dst, n = [5, 1, 6], [0, 7, 3], 10  # 10 tokens: the last block is partly used
    for name in a.layers:
        for va, vb in zip(a.layers[name], b.layers[name], strict=True):
            vb[dst] = va[src]
    assert kv_checksum(a, src, n) == kv_checksum(b, dst, n)
    b.layers["layer1"][1][dst[-1], 3] += 1.0  # slot 3 of the last block: token 11, unused
    assert kv_checksum(a, src, n) == kv_checksum(b, dst, n)
    b.layers["layer1"][1][dst[-1], 1, 1, 2] += 1e-3  # token 9: used
    assert kv_checksum(a, src, n) != kv_checksum(b, dst, n)
    with pytest.raises(ValueError, match="cannot hold"):
        kv_checksum(a, src, 13)


@pytest.mark.parametrize("layout", ["nhd", "hnd", "packed"])
def test_kv_checksum_equals_blake2b_of_each_layer_and_view_in_turn(layout):
    """The one-copy gather hashes exactly: layer name, then each view's tokens in order."""
    cache = layouts.allocate(layout, num_layers=3, num_blocks=9, block_size=4, num_kv_heads=2,
                             head_dim=8, dtype=torch.bfloat16,
                             generator=torch.Generator().manual_seed(7))  # fmt: skip
    blocks, n = [8, 2, 5], 11
    want = hashlib.blake2b(digest_size=16)
    for name in sorted(cache.layers):
        want.update(name.encode())
        for view in cache.layers[name]:
            tokens = torch.cat([view[b] for b in blocks])[:n]  # (tokens, ...) logical order
            want.update(tokens.contiguous().view(torch.uint8).numpy().tobytes())
    assert kv_checksum(cache, blocks, n) == want.hexdigest()


def _cfg(**kw) -> SimpleNamespace:
    base = dict(insecure=False, tls_cert=None, tls_key=None, tls_ca=None,
                auth_token_file=None, side_secret_file=None)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_auth_configuration_errors_name_the_flag(tmp_path):
    ca = TestCA(tmp_path)
    leaf, other = ca.leaf("d"), ca.leaf("e")
    tok, side = secret_file(tmp_path / "t"), secret_file(tmp_path / "s")
    good = dict(tls_cert=str(leaf.cert), tls_key=str(leaf.key), auth_token_file=str(tok),
                side_secret_file=str(side))  # fmt: skip
    auth = ServerAuth.from_config(_cfg(**good))
    assert not auth.insecure and not auth.mutual_tls and auth.token == tok.read_bytes().strip()
    assert ServerAuth.from_config(_cfg(**good, tls_ca=str(ca.path))).mutual_tls
    assert ServerAuth.from_config(_cfg(insecure=True)).server_credentials() is None
    short = tmp_path / "short"
    short.write_text("abc\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        (dict(insecure=True, auth_token_file=str(tok)), "--insecure contradicts --auth-token"),
        (dict(tls_cert=str(leaf.cert), tls_key=str(leaf.key)), "missing --auth-token-file"),
        ({**good, "auth_token_file": str(short)}, "--auth-token-file .*at least 16"),
        ({**good, "side_secret_file": str(tmp_path / "nope")}, "--side-secret-file .*cannot read"),
        ({**good, "tls_key": str(other.key)}, "--tls-key .* is not the key of --tls-cert"),
        ({**good, "tls_cert": str(tok)}, "--tls-cert .*no PEM block"),
        ({**good, "tls_cert": str(garbage)}, "--tls-cert .*not a PEM certificate"),
        ({**good, "tls_ca": str(side)}, "--tls-ca .*no PEM block"),
    ]
    for kw, match in cases:
        with pytest.raises(AuthConfigError, match=match):
            ServerAuth.from_config(_cfg(**kw))


def test_refused_side_channel_messages_are_rate_limited_in_the_log(caplog):
    from kvbridge.connector.transfer import metadata as md
    from kvbridge.connector.transfer.errors import HandshakeError
    from kvbridge.connector.transfer.side_channel import SideChannelServer, request

    server = SideChannelServer(lambda m: md.Ack(), secret=b"k" * 32)
    try:
        with caplog.at_level("WARNING", logger="kvbridge.connector.transfer.side_channel"):
            for _ in range(5):
                with pytest.raises(HandshakeError, match="bad signature"):
                    request(server.address, md.Ack(), 5.0, secret=b"x" * 32)
        assert server.refused == 5
        lines = [r for r in caplog.records if "refused a message" in r.getMessage()]
        assert 1 <= len(lines) < 5  # logged, but not once per message
    finally:
        server.close()

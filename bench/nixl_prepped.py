"""The per-block baseline's NIXL path: descriptor lists prepared once per peer.

This is the scheme of connectors that prepare one descriptor per block at
handshake time (vLLM's NIXL connector) and build each request from index arrays
(``make_prepped_xfer``). kvbridge itself never uses it (a prepared list indexes
whole descriptors, so coalesced ranges cannot be expressed); only the transfer
benchmark's baseline does, so it lives here and reaches into ``NixlTransport``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from kvbridge.connector.transfer.errors import DescriptorError, TransferFailedError
from kvbridge.connector.transfer.transport import PendingTransfer


@dataclass(eq=False)
class PreppedLists:
    """A prepared local and remote descriptor list of one peer (equal lengths)."""

    peer: str
    local: Any
    remote: Any
    nbytes: np.ndarray


def prepare_lists(
    transport, peer: str, local_region, local_offset, remote_region, remote_offset, nbytes
) -> PreppedLists:
    """Prepare a local and a remote descriptor list once; requests then index them."""
    remote = transport._peer_table(peer)
    local_table = transport._local_table
    lreg, loff, rreg, roff, nb = (
        np.asarray(a, dtype=np.int64).reshape(-1)
        for a in (local_region, local_offset, remote_region, remote_offset, nbytes)
    )
    laddr = local_table.resolve(lreg, loff, nb)
    raddr = remote.resolve(rreg, roff, nb)
    lcuda = bool(local_table.is_cuda[lreg].any())
    rcuda = bool(remote.is_cuda[rreg].any())
    agent = transport._agent
    local = agent.prep_xfer_dlist(
        "NIXL_INIT_AGENT",
        transport._descs(laddr, local_table.device_index[lreg], nb),
        transport._mem_type(lcuda),
    )
    remote_h = agent.prep_xfer_dlist(
        peer, transport._descs(raddr, remote.device_index[rreg], nb), transport._mem_type(rcuda)
    )
    return PreppedLists(peer, local, remote_h, nb)


def post_indexed(
    transport, op: str, lists: PreppedLists, local_idx, remote_idx, notify: bytes = b""
) -> PendingTransfer:
    """One transfer of the indexed descriptors of two prepared lists."""
    li = np.asarray(local_idx, dtype=np.int32).reshape(-1)
    ri = np.asarray(remote_idx, dtype=np.int32).reshape(-1)
    n = lists.nbytes.size
    if li.size != ri.size or li.size == 0:
        raise DescriptorError(f"index arrays of {li.size} and {ri.size} entries")
    if ((li < 0) | (li >= n) | (ri < 0) | (ri >= n)).any():
        raise DescriptorError(f"indices outside the prepared lists of {n} descriptors")
    if not np.array_equal(lists.nbytes[li], lists.nbytes[ri]):
        raise DescriptorError("indexed local and remote descriptors differ in length")
    agent = transport._agent
    handle = agent.make_prepped_xfer(op, lists.local, li, lists.remote, ri, bytes(notify))
    state = agent.transfer(handle, bytes(notify))
    if state == "ERR":
        transport._release(handle)
        raise TransferFailedError(f"NIXL {op} with peer {lists.peer!r} failed to post")
    return PendingTransfer(
        op, lists.peer, int(li.size), int(lists.nbytes[li].sum()), handle, int(li.size)
    )


def release_lists(lists: PreppedLists) -> None:
    for h in (lists.local, lists.remote):
        with contextlib.suppress(Exception):
            h.release()

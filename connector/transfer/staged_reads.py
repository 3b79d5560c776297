"""An agent's staged reads: when to stage, posting into a staging buffer, handing it back.

A read whose plan is fragmented (``TransferPlan.fragmented``) reads whole source
blocks into a staging buffer and relays them out locally (staging.py). Which layout
pairs are fragmented is learnt from the first plan of each pair: when a plan is
fragmented far past both limits (its pieces are per token or per head), every plan
of that pair, head range and mode is, whatever the block ids, so later reads of the
pair are checked (``TransferPlan.check``) and staged without building the plan (a
256-token packed -> nhd pull has 65k descriptors: milliseconds of host time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
from kvbridge.connector.transfer.errors import TransferTimeoutError
from kvbridge.connector.transfer.staging import StagingPool, StagingUnsupported, plan_stage
from kvbridge.connector.transfer.transfer_request import PendingRequest
from kvbridge.connector.transfer.transport import Transport
from kvbridge.topology import FRAGMENTATION_LIMIT, SMALL_DESCRIPTOR_BYTES, TransferPlan

log = logging.getLogger(__name__)


def clearly_fragmented(plan: TransferPlan) -> bool:
    """Fragmented far past both limits (4x each)."""
    return (
        plan.fragmentation > 4 * FRAGMENTATION_LIMIT
        and plan.mean_descriptor_bytes < SMALL_DESCRIPTOR_BYTES / 4
    )


class StagedReads:
    """The staging buffers of one agent and the layout pairs known to need them."""

    def __init__(
        self, transport: Transport, lock, device: str, max_bytes: int, timeout: float, name: str
    ) -> None:
        self.transport, self._lock, self.timeout, self.name = transport, lock, timeout, name
        self.pool = StagingPool(transport, device, max_bytes)
        self._per_token: dict[tuple, int] = {}  # pair key -> plan bytes per token

    def known(self, key: tuple) -> int | None:
        """Bytes per token of the pair's plans when they are known to be fragmented."""
        return self._per_token.get(key)

    def learn(self, key: tuple, plan: TransferPlan, tokens: Callable[[], int]) -> None:
        """Remember a pair whose ``plan`` is clearly fragmented (``tokens()``: the tokens
        it moves, asked only then)."""
        if not clearly_fragmented(plan):
            return
        n = tokens()
        if n and plan.total_bytes % n == 0:
            self._per_token[key] = plan.total_bytes // n

    def post(
        self, p, topology, layers, r_ids, l_ids, num_tokens, heads, request_id, note, started
    ) -> PendingRequest | None:
        """Post a read of whole source blocks into a staging buffer (``None``: not possible)."""
        stage = plan_stage(topology, r_ids)
        try:
            buf, tensor, region = self.pool.acquire(stage.total_bytes, self.timeout)
        except StagingUnsupported as exc:
            log.info("staging not possible (%s); reading the plan directly", exc)
            return None
        except TimeoutError as exc:
            raise TransferTimeoutError(f"agent {self.name!r}: {exc}") from None
        try:
            with self._lock:
                xfer = self.transport.post(
                    "READ", p.name, np.full(stage.nbytes.size, region, dtype=np.int64),
                    stage.stage_offset, stage.src_region, stage.src_offset, stage.nbytes, note,
                )  # fmt: skip
        except BaseException:
            self.pool.give_back(buf)
            raise
        args = (tensor, p.spec, layers, r_ids, l_ids, num_tokens, heads)
        return PendingRequest(
            "READ", p, request_id, xfer, started, int(stage.nbytes.size), stage.wire_bytes,
            staged=stage, relayout_args=args,
            _release=lambda ready=None: self.pool.give_back(buf, ready),
        )  # fmt: skip

    def give_back_when_quiet(self, pending: PendingRequest) -> None:
        """Return a staged read's buffer, but only once the engine can no longer write it
        (and, on CUDA, once its relayout has read it: the buffer keeps that event)."""
        release, pending._release = pending._release, None
        if release is None:
            return
        if self.transport.quiesced(pending.xfer):
            release(pending.relayout_done)
            return
        log.warning("agent %s: staging buffer of %s held until the engine lets go of it",
                    self.name, pending.request_id)  # fmt: skip

        def wait_then_release() -> None:
            while not self.transport.quiesced(pending.xfer):
                time.sleep(0.05)
            release()

        threading.Thread(target=wait_then_release, name=f"stage-hold-{self.name}",
                         daemon=True).start()  # fmt: skip

    def close(self) -> None:
        self.pool.close()

"""What both daemons own: model, paged KV cache, block allocator, requests, metrics."""

from __future__ import annotations

import logging
import threading

import torch
from kvbridge.connector.serving.daemon.allocator import BlockAllocator
from kvbridge.connector.serving.daemon.config import DaemonConfig
from kvbridge.connector.serving.daemon.guard import GuardBands
from kvbridge.connector.serving.daemon.metrics import DaemonMetrics
from kvbridge.connector.serving.daemon.quarantine import Quarantine
from kvbridge.connector.serving.daemon.states import RequestRecord, RequestRegistry, RequestState
from kvbridge.connector.serving.model import (
    ByteTokenizer,
    LlamaModel,
    allocate_cache,
    load_hf_checkpoint,
)
from kvbridge.connector.serving.model.weights import random_weights
from kvbridge.topology.layouts import KVCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(cfg: DaemonConfig) -> LlamaModel:
    """The model of ``cfg``: a local checkpoint when ``model_path`` is set, else seeded random."""
    dtype = DTYPES[cfg.dtype]
    if cfg.model_path:
        mcfg, weights = load_hf_checkpoint(cfg.model_path, dtype, cfg.device)
    else:
        mcfg = cfg.model_config()
        weights = random_weights(mcfg, dtype, cfg.device)
    return LlamaModel(mcfg, weights, attention_backend=cfg.attention_backend)


class DaemonRuntime:
    """State shared by the gRPC servicer, the transfer endpoint and the drain logic."""

    def __init__(self, cfg: DaemonConfig, model: LlamaModel | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.log = logging.getLogger(f"kvbridge.{cfg.role}")
        self.model = model or build_model(cfg)
        self.tokenizer = ByteTokenizer(max(self.model.cfg.vocab_size, 257))
        self.cache: KVCache = allocate_cache(
            self.model, cfg.kv_layout, cfg.num_blocks, cfg.block_size
        )
        self.guard: GuardBands | None = None
        if cfg.guard_bytes:
            self.guard = GuardBands.wrap(self.cache, cfg.guard_bytes)
            self.cache = self.guard.cache
        self.model.check_cache(self.cache)
        self.allocator = BlockAllocator(cfg.num_blocks)
        self.quarantine = Quarantine(self.allocator, self.log)
        self.registry = RequestRegistry()
        self.metrics = DaemonMetrics.create(cfg.role)
        self.metrics.blocks_in_use.set_function(lambda: self.allocator.num_used)
        self.metrics.requests_in_flight.set_function(lambda: self.registry.num_live)
        self.metrics.blocks_quarantined.set_function(lambda: self.quarantine.num_blocks)
        self.metrics.threads.set_function(threading.active_count)
        self.compute_lock = threading.Lock()  # one model computation at a time
        self.draining = threading.Event()
        self.compat_hash = ""  # set once the transfer agent knows the topology
        self.paths: dict = {}  # peer -> the transfer agent's PathReport (Stats)
        self.counters = {
            "transfers": 0,
            "bytes_transferred": 0,
            "descriptors": 0,
            "transfer_seconds": 0.0,
            "transfer_failures": 0,
            "lease_expiries": 0,
            "leases_released": 0,
            "tokens_generated": 0,
            "corrupt_transfers": 0,
            "transfer_retries": 0,
            "auth_failures": 0,
        }
        self._counter_lock = threading.Lock()

    def count(self, **deltas: float) -> None:
        """Add to the ``Stats`` counters."""
        with self._counter_lock:
            for key, delta in deltas.items():
                self.counters[key] += delta

    def count_event(self, name: str) -> None:
        """One more ``name``: its ``Stats`` counter and the Prometheus counter of that name."""
        self.count(**{name: 1})
        getattr(self.metrics, name).inc()

    def guard_band_bytes_changed(self) -> int:
        """Poison bytes changed around the cache (-1 without ``--guard-bytes``)."""
        return -1 if self.guard is None else self.guard.changed()

    def finish(self, rec: RequestRecord, state: RequestState, error: str = "") -> bool:
        """Move ``rec`` to a final state once; log and count it. False if already final."""
        if state is RequestState.FAILED:
            moved = self.registry.fail(rec.request_id, error)
        else:
            try:
                self.registry.transition(rec.request_id, state)
                moved = True
            except Exception:
                moved = False
        if moved:
            self.metrics.finished(self.cfg.role, state.name.lower())
            self.log.info(
                "request finished",
                extra={
                    "request_id": rec.request_id,
                    "state": state.name.lower(),
                    "error": rec.error,
                    "bytes": rec.bytes,
                    "descriptors": rec.descriptors,
                    "transfer_seconds": round(rec.transfer_seconds, 6),
                    "tokens": rec.num_generated_tokens,
                },
            )
        return moved

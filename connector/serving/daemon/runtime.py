"""What both daemons own: model, paged KV cache, block allocator, requests, metrics."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from kvbridge.connector.serving.daemon.allocator import BlockAllocator
from kvbridge.connector.serving.daemon.config import ConfigError, DaemonConfig
from kvbridge.connector.serving.daemon.guard import GuardBands
from kvbridge.connector.serving.daemon.metrics import DaemonMetrics
from kvbridge.connector.serving.daemon.quarantine import Quarantine
from kvbridge.connector.serving.daemon.states import RequestRecord, RequestRegistry, RequestState
from kvbridge.connector.serving.engine.loop import DecodeEngine
from kvbridge.connector.serving.engine.metrics import step_recorder
from kvbridge.connector.serving.engine.process import EngineProcess, share_cpu_memory
from kvbridge.connector.serving.model import (
    ByteTokenizer,
    LlamaModel,
    allocate_cache,
    load_hf_checkpoint,
)
from kvbridge.connector.serving.model.config import ModelConfigError
from kvbridge.connector.serving.model.tokenizer import HFTokenizer
from kvbridge.connector.serving.model.weights import random_weights
from kvbridge.topology.layouts import KVCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(cfg: DaemonConfig) -> LlamaModel:
    """The model of ``cfg``: a local checkpoint when ``model_path`` is set, else seeded random.

    A checkpoint the model cannot serve exactly is a ``ConfigError`` (one line, exit 2).
    """
    dtype = DTYPES[cfg.dtype]
    try:
        if cfg.model_path:
            mcfg, weights = load_hf_checkpoint(cfg.model_path, dtype, cfg.device)
            name = Path(cfg.model_path).resolve().name
        else:
            mcfg = cfg.model_config()
            weights = random_weights(mcfg, dtype, cfg.device)
            name = f"embedded-seed{mcfg.seed}"
    except ModelConfigError as exc:
        where = f"--model-path {cfg.model_path}: " if cfg.model_path else ""
        raise ConfigError(f"{where}{exc}") from None
    return LlamaModel(mcfg, weights, attention_backend=cfg.attention_backend, name=name)


def start_decode_engine(rt: DaemonRuntime, graphs: bool, pad: int) -> DecodeEngine | EngineProcess:
    """The decode daemon's running engine: in this process, or in its own with
    ``--engine-process`` (threads and logging as here)."""
    cfg = rt.cfg
    kw = dict(max_batch=cfg.max_batch, cuda_graphs=graphs, pad_block=pad,
              on_step=step_recorder(rt.metrics.registry, "decode"),
              stream_interval=cfg.stream_interval)  # fmt: skip
    if not cfg.use_engine_process:
        return DecodeEngine(rt.model, rt.cache, **kw).start()
    log_static = {"role": "decode-engine", "engine": cfg.name}
    return EngineProcess(rt.model, rt.cache, **kw, torch_threads=cfg.torch_threads,
                         log_level=cfg.log_level, log_static=log_static).start()  # fmt: skip


def build_tokenizer(cfg: DaemonConfig, model: LlamaModel):
    """The checkpoint's ``tokenizer.json`` with ``--model-path``; the byte tokenizer else."""
    if cfg.model_path and (Path(cfg.model_path) / "tokenizer.json").is_file():
        try:
            tok = HFTokenizer.from_file(Path(cfg.model_path) / "tokenizer.json")
        except ModelConfigError as exc:
            raise ConfigError(f"--model-path {cfg.model_path}: {exc}") from None
        if tok.vocab_size > model.cfg.vocab_size:
            raise ConfigError(
                f"--model-path {cfg.model_path}: tokenizer.json has {tok.vocab_size} tokens, "
                f"the model's vocabulary {model.cfg.vocab_size}"
            )
        return tok
    if cfg.model_path:
        logging.getLogger(f"kvbridge.{cfg.role}").warning(
            "no tokenizer.json in the checkpoint: text prompts and streamed text use the "
            "byte tokenizer (send prompt_token_ids)",
            extra={"model_path": cfg.model_path},
        )
    return ByteTokenizer(max(model.cfg.vocab_size, 257))


class DaemonRuntime:
    """State shared by the gRPC servicer, the transfer endpoint and the drain logic."""

    def __init__(
        self,
        cfg: DaemonConfig,
        model: LlamaModel | None = None,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.log = logging.getLogger(f"kvbridge.{cfg.role}")
        self.model = model or build_model(cfg)
        mc = self.model.cfg
        self.log.info(
            "model loaded",
            extra={"model": self.model.identity, "family": mc.family, "rope": mc.rope_type,
                   "sliding_window": mc.sliding_window, "eos": list(mc.eos_token_ids)},
        )  # fmt: skip
        self.tokenizer = build_tokenizer(cfg, self.model)
        self.stop_ids = frozenset(self.model.cfg.eos_token_ids)  # plus each request's own
        self.cache: KVCache = allocate_cache(
            self.model, cfg.kv_layout, cfg.num_blocks, cfg.block_size
        )
        self.guard: GuardBands | None = None
        if cfg.guard_bytes:
            self.guard = GuardBands.wrap(self.cache, cfg.guard_bytes)
            self.cache = self.guard.cache
        self.model.check_cache(self.cache)
        if cfg.use_engine_process:  # before the transfer engine registers the cache
            try:
                share_cpu_memory(self.model, self.cache)
            except MemoryError as exc:
                raise ConfigError(str(exc)) from None
        self.allocator = BlockAllocator(cfg.num_blocks)
        self.quarantine = Quarantine(self.allocator, self.log)
        self.registry = RequestRegistry()
        self.metrics = metrics or DaemonMetrics.create(cfg.role)
        self.metrics.blocks_in_use.set_function(lambda: self.allocator.num_used)
        self.metrics.requests_in_flight.set_function(lambda: self.registry.num_live)
        self.metrics.blocks_quarantined.set_function(lambda: self.quarantine.num_blocks)
        self.metrics.threads.set_function(threading.active_count)
        self.compute_lock = threading.Lock()  # one model computation at a time
        self.draining = threading.Event()
        self.compat_hash = ""  # set once the transfer agent knows the topology
        self.paths: dict = {}  # peer -> the transfer agent's PathReport (Stats)

    @property
    def counters(self) -> dict[str, float]:
        """The ``Stats`` counters, read from the Prometheus metrics (one counter system)."""
        return self.metrics.stats_counters()

    def count_transfer(self, nbytes: int, descriptors: int, seconds: float) -> None:
        """One finished KV pull (bytes, descriptors, seconds)."""
        self.metrics.count_transfer(nbytes, descriptors, seconds)

    def count_event(self, name: str) -> None:
        """One more ``name``: the Prometheus counter that ``Stats`` also reads."""
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

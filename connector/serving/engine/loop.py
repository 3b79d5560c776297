"""The decode engine loop: one thread owns the model and the cache, continuous batching.

Servicer threads ``submit`` a ``Sequence`` once its KV is in the cache and read what
the engine ``emit``s (tokens, a finish reason, an error) from their own queue. Each
iteration the loop applies cancels and joins at the step boundary, runs ONE batched
decode step over every active sequence (``DecodeStep``), and hands each sequence its
token; a finished, cancelled or failed sequence leaves while the others go on.

On CUDA (``overlap``) step k+1 is queued before step k's tokens are read, so the
host's work (streaming, joins, leaves) runs while the GPU computes: the tokens of a
step feed the next one on the device. A sequence that finished in step k then runs
once more in step k+1, whose token for it is dropped; that step writes one more
position of its own blocks (within them: a sequence never feeds its last slot), so
``Sequence.left`` (its blocks may be freed) is set only once every step queued
before it left has completed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from kvbridge.connector.serving.engine.batch_state import BatchState
from kvbridge.connector.serving.engine.scheduler import RunningSet, Sequence
from kvbridge.connector.serving.engine.step import DecodeStep, Launched
from kvbridge.connector.serving.model.llama import LlamaModel
from kvbridge.topology.layouts import KVCache

log = logging.getLogger("kvbridge.engine")

_MASK32 = 0xFFFFFFFF


def sequence_error(
    seq: Sequence, block_size: int, num_blocks: int, reserved: int | None
) -> str | None:
    """Why ``seq`` cannot join a cache of ``num_blocks`` blocks of ``block_size``
    (``reserved``: the CUDA graphs' padding block), or None."""
    if not seq.capacity_ok(block_size):
        return (
            f"{seq.prompt_len} prompt + {seq.max_new} new tokens do not fit "
            f"{len(seq.blocks)} blocks of {block_size}"
        )
    bad = [b for b in seq.blocks if not 0 <= b < num_blocks]
    if bad or (reserved is not None and reserved in seq.blocks):
        return f"block ids outside the cache or reserved: {bad[:4]}"
    return None


def fold_seed(seed: int) -> int:
    """A 64-bit seed folded to the 32 bits the device hash uses."""
    return (seed ^ (seed >> 32)) & _MASK32


class DecodeEngine:
    """Continuous-batching decode loop over one model and one paged cache."""

    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        *,
        max_batch: int = 64,
        cuda_graphs: bool = False,
        pad_block: int = 0,
        on_step: Callable[[int, float], None] | None = None,
        stream_interval: int = 1,
        overlap: bool | None = None,
        on_iteration: Callable[[], None] | None = None,
    ) -> None:
        """``pad_block``: a block no sequence owns (padding rows of CUDA graphs write it);
        ``on_step(batch, seconds)`` is called after every step (metrics);
        ``stream_interval``: a sequence's tokens are emitted every that many steps
        (and when it finishes), so its stream sends fewer, larger messages;
        ``overlap``: queue each step before reading the previous one's tokens
        (``None``: on CUDA); ``on_iteration()`` is called after each loop iteration
        and once the loop ended (``EngineProcess`` sends what it collected)."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be positive, got {stream_interval}")
        self.stream_interval = stream_interval
        self.model, self.cache = model, cache
        self.running = RunningSet(max_batch)
        self.state = BatchState(max_batch, cache.num_blocks, model.device, pad_block)
        self.step = DecodeStep(model, cache, self.state, cuda_graphs)
        self.on_step = on_step
        self.on_iteration = on_iteration
        self.steps = 0
        self.overlap = model.device.type == "cuda" if overlap is None else overlap
        self._thread: threading.Thread | None = None
        self._left: list[tuple[int, Sequence]] = []  # (steps queued when it left, seq)
        self._queued = self._completed = 0  # steps queued / steps whose tokens were read
        self._last_done = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> DecodeEngine:
        """Capture the CUDA graphs (if on) and start the loop thread."""
        if self.step.cuda_graphs:
            t0 = time.perf_counter()
            self.step.capture()
            log.info(
                "cuda graphs captured",
                extra={"buckets": sorted(self.step.graphs), "seconds": time.perf_counter() - t0},
            )
        self._thread = threading.Thread(target=self._loop, name="kvbridge-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; sequences still running get a failure."""
        self.running.close()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ any thread
    def submit(self, seq: Sequence) -> None:
        """Join ``seq`` (its KV is in the cache, its blocks checked) at the next step.
        A refused sequence never joined: its ``left`` is set before the error is raised."""
        reserved = self.state.pad_block if self.step.cuda_graphs else None
        error = sequence_error(seq, self.cache.block_size, self.cache.num_blocks, reserved)
        try:
            if error:
                raise ValueError(error)
            self.running.join(seq)
        except (ValueError, RuntimeError):
            seq.left.set()
            raise

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        return self.running.cancel(request_id, reason)

    @property
    def num_running(self) -> int:
        return self.running.num_running

    # --------------------------------------------------------- engine thread
    def _leave(self, seq: Sequence) -> None:
        """Take ``seq`` out of the batch; the last row fills its row. ``seq.left`` waits
        for the steps already queued (``_release``)."""
        n_before, row = len(self.running.active), seq.slot
        moved_from = self.running.remove(seq, notify=False)
        self._left.append((self._queued, seq))
        if moved_from is not None:
            self.state.move_row(moved_from, row)
        if n_before and self.step.cuda_graphs:
            self.state.clear_row(n_before - 1)  # padding again: writes only the scratch block

    def _release(self, everything: bool = False) -> None:
        """Set ``left`` of the sequences no queued step can write any more."""
        keep = []
        for queued, seq in self._left:
            if everything or queued <= self._completed:
                seq.left.set()
            else:
                keep.append((queued, seq))
        self._left = keep

    def _apply_changes(self) -> None:
        cancels, joins = self.running.take_changes()
        for seq, reason in cancels:
            seq.finish = "cancelled"
            if seq.slot >= 0:
                self._leave(seq)
            else:
                self.running.drop_joining(seq)
            seq.emit([], "cancelled", reason)
        for seq in joins:
            sp = seq.sampling
            row = self.running.add(seq)
            try:
                self.state.set_row(
                    row, seq.first_token, seq.position, seq.blocks,
                    (sp.temperature, sp.top_p, sp.top_k, fold_seed(sp.seed)),
                )  # fmt: skip
            except Exception as exc:  # this sequence fails, the batch goes on
                log.exception("joining the batch failed", extra={"request_id": seq.request_id})
                seq.finish = "failed"
                self._leave(seq)
                seq.emit([], "failed", f"joining the batch failed: {type(exc).__name__}: {exc}")

    def _fail_all(self, error: str) -> None:
        for seq in list(self.running.active):
            seq.finish = "failed"
            self._leave(seq)
            seq.emit([], "failed", error)

    def _loop(self) -> None:
        pending: Launched | None = None  # queued, its tokens not read yet
        try:
            while self.running.wait_for_work(timeout=0.5 if pending is None else 0.0):
                self._apply_changes()
                self._release()
                active = self.running.active
                launched = None
                if active:
                    try:
                        launched = self._launch(active)
                    except Exception as exc:  # a broken step fails this batch, not the daemon
                        log.exception("decode step failed", extra={"batch": len(active)})
                        self._fail_all(f"decode step failed: {type(exc).__name__}: {exc}")
                        pending = None
                        self._drain()
                if pending is not None:
                    self._finish(pending)
                    pending = None
                if launched is not None:
                    if self.overlap:
                        pending = launched
                    else:
                        self._finish(launched)
                if self.on_iteration is not None:
                    self.on_iteration()
        finally:
            for seq in list(self.running.active):
                self._leave(seq)
                seq.emit([], "failed", "the decode engine stopped")
            self._drain()
            if self.on_iteration is not None:
                self.on_iteration()

    def _launch(self, active: list[Sequence]) -> Launched:
        n = len(active)
        t0 = time.perf_counter()
        launched = self.step.launch(
            n,
            any(not s.sampling.greedy for s in active),
            # the longest row after this step (CPU path); with a step still unread the
            # host's positions lag one behind
            max(s.position for s in active) + 1 + (1 if self.overlap else 0),
        )
        self._queued = launched.index
        launched.rows, launched.started = list(active), t0
        return launched

    def _finish(self, launched: Launched) -> None:
        """Read a step's tokens, hand them out, let finished sequences leave."""
        tokens = launched.result()
        now = time.perf_counter()
        self._completed = launched.index
        self.steps += 1
        if self.on_step is not None:  # the step's own time, not the wait before it ran
            self.on_step(len(tokens), now - max(launched.started, self._last_done))
        self._last_done = now
        done = []
        for seq, tok in zip(launched.rows, tokens, strict=True):
            if seq.finish or seq.slot < 0:
                continue  # left after this step was queued: its token is dropped
            seq.generated += 1
            if tok in seq.stop:
                seq.finish = "stop"
            elif seq.generated >= seq.max_new:
                seq.finish = "length"
            if seq.finish:
                done.append(seq)
            seq.unsent.append(tok)
            if seq.finish or len(seq.unsent) >= self.stream_interval:
                toks, seq.unsent = seq.unsent, []
                seq.emit(toks, seq.finish, None)
        for seq in done:
            self._leave(seq)
        self._release()

    def _drain(self) -> None:
        """Wait for every queued step (best effort), then release every leaver."""
        if self.model.device.type == "cuda":
            try:
                torch.cuda.current_stream(self.model.device).synchronize()
            except Exception:
                log.exception("waiting for the queued decode steps failed")
        self._completed = self._queued
        self._release(everything=True)

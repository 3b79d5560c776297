"""The decode engine in its own process, so the step does not share a GIL with gRPC.

In one process the engine thread gives the GIL away at every torch call, and every
streamed token wakes a servicer thread and gRPC's server thread that want it back:
at 8 streams on 2 CPU cores the engine thread ran 52% of a core, and a step took
twice its time alone (``bench/README.md``, "CPU"). vLLM V1 (EngineCore) and SGLang
(the scheduler process) run their engines apart from the API server for this reason.

``EngineProcess`` has ``DecodeEngine``'s interface (``start``, ``submit``, ``cancel``,
``stop``, ``num_running``). A ``spawn``ed child runs a ``DecodeEngine`` over the SAME
model weights and KV cache: torch's multiprocessing shares CPU tensors through shared
memory (``share_cpu_memory`` must move them there before the cache is registered with
a transfer engine: the move changes their address) and CUDA tensors through CUDA IPC.
Commands go down one pipe (submit, cancel, stop); each loop iteration the child sends
up, in one message, what it collected: tokens and finishes (``emit``), sequences whose
blocks no queued step writes any more (``left``), step times (``on_step``). A reader
thread here hands them to the sequences. If the child dies, every sequence it held
fails at once and is marked left (a dead process writes nothing), and ``submit``
raises ``EngineDeadError``.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as tmp
from kvbridge.connector.serving.engine.loop import DecodeEngine, sequence_error
from kvbridge.connector.serving.engine.scheduler import Sequence
from kvbridge.connector.serving.model.llama import LlamaModel
from kvbridge.topology.layouts import KVCache

log = logging.getLogger("kvbridge.engine")


class EngineDeadError(RuntimeError):
    """The engine process is gone; no sequence can join."""


def _cpu_tensors(weights, cache: KVCache) -> list[torch.Tensor]:
    """Every CPU tensor of the weights and the cache (allocations and views)."""
    tensors = [t for t in vars(weights).values() if isinstance(t, torch.Tensor)]
    for layer in weights.layers:
        tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    tensors += list(cache.backing)
    for views in cache.layers.values():
        tensors += list(views)
    return [t for t in tensors if t.device.type == "cpu"]


def share_cpu_memory(model: LlamaModel, cache: KVCache, shm: str = "/dev/shm") -> None:
    """Move the CPU weights and cache allocations into shared memory, in place (every
    view follows). Call it before anything records their addresses (transfer-engine
    registration): the data moves. ``MemoryError`` (naming both sizes) when ``shm``
    has less room than they need: a full tmpfs would crash the copy with SIGBUS."""
    tensors = [t for t in _cpu_tensors(model.w, cache) if not t.is_shared()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    need = sum(storages.values())
    if need and os.path.isdir(shm):
        st = os.statvfs(shm)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise MemoryError(
                f"the decode engine process shares {need / 2**20:.0f} MiB of weights and KV "
                f"cache through {shm}, which has {free / 2**20:.0f} MiB free: give it more "
                "(Kubernetes: the chart's shm.sizeLimit) or run --engine-process off"
            )
    for t in tensors:
        t.share_memory_()


@dataclass
class _Spec:
    """What the child needs; tensors travel as shared memory or CUDA IPC handles."""

    model: tuple  # LlamaModel's arguments: cfg, weights, attention_backend, name, fused
    cache: KVCache
    engine: dict  # DecodeEngine's keyword arguments
    torch_threads: int
    log_level: str
    log_static: dict = field(default_factory=dict)


class _Left:
    """A child-side ``Sequence.left``: setting it tells the parent."""

    def __init__(self, rid: str, events: list) -> None:
        self.rid, self.events, self.flag = rid, events, False

    def set(self) -> None:
        if not self.flag:
            self.flag = True
            self.events.append(("l", self.rid))

    def is_set(self) -> bool:
        return self.flag


def _child(spec: _Spec, commands, out) -> None:
    """The engine process: build the engine, apply commands until told to stop."""
    from kvbridge.connector.serving.daemon.logs import setup_logging

    setup_logging(spec.log_level, **spec.log_static)
    if spec.torch_threads > 0:
        torch.set_num_threads(spec.torch_threads)
    events: list = []  # appended by the engine thread (and this one, rarely)

    def flush() -> None:
        batch = events[:]
        if not batch:
            return
        del events[: len(batch)]  # what was appended meanwhile stays for the next flush
        try:
            out.send(batch)
        except OSError:  # the parent is gone: nothing to serve
            os._exit(1)

    try:
        model = LlamaModel(*spec.model)
        engine = DecodeEngine(
            model, spec.cache, **spec.engine,
            on_step=lambda n, s: events.append(("s", n, s)), on_iteration=flush,
        ).start()  # fmt: skip
    except BaseException:
        out.send([("fatal", traceback.format_exc(limit=8))])
        return
    out.send([("ready",)])
    while True:
        try:
            cmd = commands.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        if cmd[0] == "stop":
            break
        if cmd[0] == "cancel":
            engine.cancel(cmd[1], cmd[2])
            continue
        _, rid, blocks, prompt_len, first, max_new, stop, sampling = cmd
        seq = Sequence(
            rid, blocks, prompt_len, first, max_new, stop, sampling,
            emit=lambda toks, fin, err, rid=rid: events.append(("e", rid, toks, fin, err)),
            left=_Left(rid, events),
        )  # fmt: skip
        try:
            engine.submit(seq)
        except Exception as exc:  # checked in the parent already; never leave it hanging
            events.extend([("e", rid, [], "failed", f"{type(exc).__name__}: {exc}"), ("l", rid)])
    engine.stop()
    flush()
    # nothing here owns shared state (the parent owns the shared memory): skip the
    # interpreter's teardown (torch's takes ~0.3 s of the daemon's shutdown)
    logging.shutdown()
    os._exit(0)


class EngineProcess:
    """``DecodeEngine`` in a child process (same interface, same semantics)."""

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
        torch_threads: int = 1,
        log_level: str = "info",
        log_static: dict | None = None,
        start_timeout: float = 600.0,
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be positive, got {stream_interval}")
        self.device = model.device
        self.block_size, self.num_blocks = cache.block_size, cache.num_blocks
        graphs = cuda_graphs and model.device.type == "cuda"
        self.reserved = pad_block if graphs else None
        self.on_step = on_step
        self.on_dead: Callable[[str], None] | None = None  # called once if the child dies
        self.start_timeout = start_timeout
        self._spec = _Spec(
            (model.cfg, model.w, model.attention_backend, model.identity.split("@")[0],
             model.fused),
            cache,
            dict(max_batch=max_batch, cuda_graphs=graphs, pad_block=pad_block,
                 stream_interval=stream_interval, overlap=overlap),
            torch_threads, log_level, dict(log_static or {}),
        )  # fmt: skip
        self._seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()  # _seqs, _dead and the command pipe
        self._dead: str | None = None
        self._stopping = False
        self._proc = self._commands = self._out = self._reader = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> EngineProcess:
        """Start the child and wait until its engine runs (CUDA graphs captured)."""
        if not all(t.is_shared() for t in _cpu_tensors(self._spec.model[1], self._spec.cache)):
            raise ValueError("CPU weights and cache must be in shared memory: share_cpu_memory")
        ctx = tmp.get_context("spawn")
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._out, child_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_child, args=(self._spec, child_commands, child_out),
            name="kvbridge-engine", daemon=True,
        )  # fmt: skip
        self._proc.start()
        child_commands.close()
        child_out.close()
        try:
            if not self._out.poll(self.start_timeout):
                raise RuntimeError(f"no answer within {self.start_timeout:.0f} s")
            first = self._out.recv()[0]
        except (EOFError, OSError, RuntimeError) as exc:
            self._kill()
            raise RuntimeError(f"the decode engine process did not start: {exc}") from None
        if first[0] != "ready":
            self._kill()
            raise RuntimeError(f"the decode engine process did not start:\n{first[1]}")
        self._reader = threading.Thread(
            target=self._read, name="kvbridge-engine-reader", daemon=True
        )
        self._reader.start()
        log.info("decode engine process started", extra={"pid": self._proc.pid})
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child; sequences still running get a failure."""
        self._stopping = True
        if self._proc is None:
            return
        try:
            with self._lock:
                self._commands.send(("stop",))
        except OSError:
            pass
        self._proc.join(timeout)
        self._kill()
        if self._reader is not None:
            self._reader.join(timeout)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # ------------------------------------------------------------ any thread
    def submit(self, seq: Sequence) -> None:
        """Join ``seq`` (its KV is in the cache) at the child's next step. A refused
        sequence never joined: its ``left`` is set before the error is raised."""
        error = sequence_error(seq, self.block_size, self.num_blocks, self.reserved)
        if self.device.type == "cuda" and not error:  # this process's writes land first
            torch.cuda.synchronize(self.device)
        with self._lock:
            if error is None and self._dead is None and seq.request_id in self._seqs:
                error = f"request {seq.request_id!r} is already running"
            if error or self._dead is not None:
                seq.left.set()
                raise ValueError(error) if error else EngineDeadError(self._dead)
            self._seqs[seq.request_id] = seq
            self._commands.send(
                ("submit", seq.request_id, list(seq.blocks), seq.prompt_len, seq.first_token,
                 seq.max_new, seq.stop, seq.sampling)
            )  # fmt: skip

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        with self._lock:
            if request_id not in self._seqs or self._dead is not None:
                return False
            try:
                self._commands.send(("cancel", request_id, reason))
            except OSError:
                return False
            return True

    @property
    def num_running(self) -> int:
        with self._lock:
            return len(self._seqs)

    # --------------------------------------------------------- reader thread
    def _read(self) -> None:
        while True:
            try:
                batch = self._out.recv()
            except (EOFError, OSError):
                break
            gone: dict[str, Sequence] = {}  # left in this batch: a cancel of a joining
            for ev in batch:  # sequence sends its "left" before its "cancelled"
                if ev[0] == "e":
                    seq = self._seqs.get(ev[1]) or gone.get(ev[1])
                    if seq is not None:
                        seq.finish = ev[3] or seq.finish
                        seq.emit(ev[2], ev[3], ev[4])
                elif ev[0] == "l":
                    with self._lock:
                        seq = self._seqs.pop(ev[1], None)
                    if seq is not None:
                        gone[ev[1]] = seq
                        seq.left.set()
                elif ev[0] == "s" and self.on_step is not None:
                    self.on_step(ev[1], ev[2])
        self._gone()

    def _gone(self) -> None:
        """The child's pipe closed: fail and release whatever it still held."""
        if self._proc is not None:
            self._proc.join(5)
        code = None if self._proc is None else self._proc.exitcode
        reason = (
            "the decode engine stopped"
            if self._stopping
            else f"the decode engine process died (exit code {code})"
        )
        with self._lock:
            self._dead = reason
            held = list(self._seqs.values())
            self._seqs.clear()
        if not self._stopping:
            log.error(reason, extra={"sequences": len(held)})
            if self.on_dead is not None:
                self.on_dead(reason)
        for seq in held:
            if not seq.finish:
                seq.finish = "failed"
                seq.emit([], "failed", reason)
            seq.left.set()

"""The batched decode step: device-resident batch state, no host round-trip inside a step.

``BatchState`` holds, per row of the batch (capacity ``max_batch``), the token to
feed, its position, the block table row and the sampling parameters, all on the
model's device. Rows change incrementally: a joining sequence writes its row once
(``set_row``), a leaving one is replaced by the last row (``move_row``), and each
step advances tokens and positions in place. Every index the step uses was checked
on the host when the sequence joined (``Sequence.capacity_ok``, block ids from the
allocator), so the step calls ``paged_decode(..., validate=False)`` and reads
nothing back but the next tokens, once, at its end.

On CUDA (``cuda_graphs=True``) the forward of each batch-size bucket (1, 2, 4, ...,
``max_batch``) is captured once in a CUDA graph; a batch of ``n`` replays the
smallest bucket ``>= n``, whose padding rows point at a scratch block
(``pad_block``) that no sequence owns, at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvbridge.connector.serving.engine.sampling import sample
from kvbridge.connector.serving.model.llama import LlamaModel, layer_name
from kvbridge.kernels import paged_decode
from kvbridge.topology.layouts import KVCache


def buckets(max_batch: int) -> list[int]:
    """Batch sizes captured as graphs: powers of two, then ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


class BatchState:
    """Per-row decode inputs on the device, rows ``[0, n)`` active."""

    def __init__(self, max_batch: int, max_pages: int, device: torch.device, pad_block: int):
        def z(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.device = device
        self.pad_block = pad_block
        self.tokens = z(max_batch)
        self.positions = z(max_batch)
        self.tables = torch.full(
            (max_batch, max_pages), pad_block, dtype=torch.int32, device=device
        )
        self.temperature = z(max_batch, dtype=torch.float32)
        self.top_p = z(max_batch, dtype=torch.float32)
        self.top_k = z(max_batch)
        self.seeds = z(max_batch)
        # CUDA: a joining row's table goes up from pinned host memory without a sync
        # (a pageable copy would wait for everything queued on the stream, relayouts
        # of other requests' pulls included); each host row is rewritten only once
        # the copy out of it completed
        cuda = device.type == "cuda"
        self._host_tables = (
            torch.empty((max_batch, max_pages), dtype=torch.int32, pin_memory=True)
            if cuda
            else None
        )
        self._row_copied: list[torch.cuda.Event | None] = [None] * max_batch

    def set_row(
        self, row: int, token: int, position: int, blocks: list[int], sampling: tuple
    ) -> None:
        """Write a joining sequence's row (host data, copied once)."""
        temperature, top_p, top_k, seed = sampling
        self.tokens[row] = token
        self.positions[row] = position
        table = self.tables[row]
        if self._host_tables is None:
            table.fill_(self.pad_block)
            table[: len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        else:
            done = self._row_copied[row]
            if done is not None:
                done.synchronize()  # the previous copy out of this host row
            host = self._host_tables[row]
            host.fill_(self.pad_block)
            host[: len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            table.copy_(host, non_blocking=True)
            done = self._row_copied[row] = done or torch.cuda.Event()
            done.record()
        self.temperature[row] = temperature
        self.top_p[row] = top_p
        self.top_k[row] = top_k
        self.seeds[row] = seed

    def move_row(self, src: int, dst: int) -> None:
        """Row ``src`` takes row ``dst``'s place (device copies, no sync)."""
        for t in (self.tokens, self.positions, self.tables, self.temperature, self.top_p,
                  self.top_k, self.seeds):  # fmt: skip
            t[dst] = t[src]

    def clear_row(self, row: int) -> None:
        """Make ``row`` padding: scratch block, position 0, greedy."""
        self.tables[row].fill_(self.pad_block)
        self.positions[row] = 0
        self.tokens[row] = 0
        self.temperature[row] = 0.0

    def advance(self, n: int, next_tokens: torch.Tensor) -> None:
        self.tokens[:n] = next_tokens[:n]
        self.positions[:n] += 1


def gathered_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_len: int,
    window: int | None,
) -> torch.Tensor:
    """The torch reference's math for all rows at once (CPU): gather the first
    ``max_len`` tokens' blocks of every row, mask past each length, one fp32 softmax.

    Every table entry must be a valid block id (rows are filled with ``pad_block``)."""
    b, hq, _ = q.shape
    _, bs, hkv, dqk = k_cache.shape
    pages = -(-max_len // bs)
    ids = table[:, :pages].to(torch.int64)
    k = k_cache[ids].reshape(b, pages * bs, hkv, dqk)[:, :max_len].to(torch.float32)
    v = v_cache[ids].reshape(b, pages * bs, hkv, -1)[:, :max_len].to(torch.float32)
    qg = q.to(torch.float32).reshape(b, hkv, hq // hkv, dqk)
    scores = torch.einsum("bhgd,bjhd->bhgj", qg, k) * scale
    j = torch.arange(max_len, device=q.device)[None, :]
    seen = j < seq_lens[:, None]
    if window is not None:
        seen &= j > seq_lens[:, None] - 1 - window
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgj,bjhd->bhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(b, hq, -1).to(q.dtype)


def forward(
    model: LlamaModel,
    cache: KVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    max_len: int | None = None,
) -> torch.Tensor:
    """Logits (B, V) of one decode step; appends each row's K/V through the model's hooks.

    ``max_len`` (the longest row's length, host data): on the CPU with the torch
    attention backend, attend all rows at once (``gathered_attention``) instead of
    ``paged_decode``'s per-sequence loop."""
    cfg, bs = model.cfg, cache.block_size
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    blk = table[rows, positions // bs].to(torch.int64)
    slot = positions % bs
    seq_lens = (positions + 1).to(torch.int32)
    window = getattr(cfg, "sliding_window", None)
    extra = {} if window is None else {"window": window}
    gather = (
        max_len is not None
        and tokens.device.type == "cpu"
        and model.attention_backend in ("auto", "torch")
    )
    x = model.w.embed[tokens]
    for i in range(cfg.num_layers):
        k_cache, v_cache = cache.kv(layer_name(i))
        q = model.qkv_store(x, i, positions, (k_cache, v_cache), blk, slot)[0]  # K/V in place
        if gather:
            attn = gathered_attention(
                q, k_cache, v_cache, table, seq_lens, model.scale, max_len, window
            )
        else:
            attn = paged_decode(
                q, k_cache, v_cache, table, seq_lens, scale=model.scale,
                backend=model.attention_backend, validate=False, **extra,
            )  # fmt: skip
        x = model._mlp_residual(x, attn, i)
    return model._logits(x)


class DecodeStep:
    """One batched step over rows ``[0, n)`` of a ``BatchState``; optional CUDA graphs."""

    def __init__(
        self, model: LlamaModel, cache: KVCache, state: BatchState, cuda_graphs: bool
    ) -> None:
        self.model, self.cache, self.state = model, cache, state
        self.max_batch = state.tokens.shape[0]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cuda_graphs = cuda_graphs and state.device.type == "cuda"
        cuda = state.device.type == "cuda"
        # CUDA: two pinned buffers, so a step's tokens can be read while the next one runs
        self._host_next = (
            torch.empty((2, self.max_batch), dtype=torch.int64, pin_memory=True) if cuda else None
        )
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else []
        self._launches = 0

    def _run(self, n: int, max_len: int | None = None) -> torch.Tensor:
        s = self.state
        return forward(self.model, self.cache, s.tokens[:n], s.positions[:n], s.tables[:n], max_len)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's forward (all rows must be padding: they write the scratch
        block only)."""
        if not self.cuda_graphs:
            return
        pool = None
        side = torch.cuda.Stream(device=self.state.device)
        side.wait_stream(torch.cuda.current_stream(self.state.device))
        with torch.cuda.stream(side):
            for b in buckets(self.max_batch):
                self._run(b)  # compile kernels, warm the allocator outside capture
        torch.cuda.current_stream(self.state.device).wait_stream(side)
        for b in reversed(buckets(self.max_batch)):  # largest first: the pool fits all
            graph = torch.cuda.CUDAGraph()
            # thread_local: transfer-engine threads may touch CUDA while we capture
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                logits = self._run(b)
            pool = graph.pool()
            self.graphs[b] = (graph, logits)
        torch.cuda.synchronize(self.state.device)

    @torch.inference_mode()
    def logits(self, n: int, max_len: int | None = None) -> torch.Tensor:
        """Logits of rows ``[0, n)`` (a view of a graph's output when graphs are on)."""
        if self.graphs:
            b = next(b for b in sorted(self.graphs) if b >= n)
            graph, out = self.graphs[b]
            graph.replay()
            return out[:n]
        return self._run(n, max_len)

    @torch.inference_mode()
    def launch(self, n: int, any_sampling: bool, max_len: int | None = None) -> Launched:
        """Queue the decode of rows ``[0, n)`` and the advance of their tokens and
        positions; ``result()`` of the returned handle gives the next tokens.

        On CUDA nothing waits here: the tokens go to pinned memory behind an event, so
        the caller can queue the next step before reading this one's (the batch state
        on the device is already advanced). ``max_len``: the longest row's length
        after this step (host data, CPU path)."""
        s = self.state
        logits = self.logits(n, max_len)
        if any_sampling:
            nxt = sample(logits, s.temperature[:n], s.top_p[:n], s.top_k[:n], s.seeds[:n],
                         s.positions[:n])  # fmt: skip
        else:
            nxt = logits.argmax(-1)
        s.advance(n, nxt)
        self._launches += 1
        if self._host_next is None:
            return Launched(self._launches, nxt.tolist(), None)
        k = self._launches % 2
        host = self._host_next[k, :n]
        host.copy_(nxt, non_blocking=True)
        self._events[k].record()
        return Launched(self._launches, host, self._events[k])

    def __call__(self, n: int, any_sampling: bool, max_len: int | None = None) -> list[int]:
        """Decode rows ``[0, n)`` and wait: the next tokens."""
        return self.launch(n, any_sampling, max_len).result()


@dataclass(eq=False)
class Launched:
    """A queued step: its number (1, 2, ...) and, once ``result()``, its tokens."""

    index: int
    tokens: list[int] | torch.Tensor  # a list (CPU) or a pinned slice (CUDA)
    done: torch.cuda.Event | None
    rows: list = field(default_factory=list)  # the caller's sequences, in row order
    started: float = 0.0

    def result(self) -> list[int]:
        """The step's tokens (CUDA: waits on its event, the GIL released meanwhile)."""
        if self.done is None:
            return self.tokens
        self.done.synchronize()
        return self.tokens.tolist()

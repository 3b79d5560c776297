"""The batched decode step: device-resident batch state, no host round-trip inside a step.

``BatchState`` (``batch_state.py``) holds, per row of the batch (capacity
``max_batch``), the token to feed, its position, the block table row and the
sampling parameters, all on the model's device in one packed tensor. Rows change
incrementally: a joining sequence writes its row once (``set_row``), a leaving one
is replaced by the last row (``move_row``), and each step advances the active rows'
tokens and positions in place. Every index the step uses was checked on the host
when the sequence joined (``Sequence.capacity_ok``, block ids from the allocator), so
the step calls ``paged_decode(..., validate=False)`` and reads nothing back but the
next tokens, once, at its end.

On CUDA (``cuda_graphs=True``) the whole step of each batch-size bucket (1, 2, 4,
..., ``max_batch``): forward, argmax or sampling, advance and the copy of the tokens
to pinned memory, is captured once per (greedy/sampled, pinned buffer); a batch of
``n`` replays the smallest bucket ``>= n``, whose padding rows (inactive) point at a
scratch block (``pad_block``) that no sequence owns, at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvbridge.connector.serving.engine.batch_state import BatchState
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
        # bucket -> (sampling?, pinned buffer) -> the whole step as one graph
        self.graphs: dict[int, dict[tuple[bool, int], torch.cuda.CUDAGraph]] = {}
        self._bucket = [0] * (self.max_batch + 1)  # n -> the smallest bucket >= n
        self.cuda_graphs = cuda_graphs and state.device.type == "cuda"
        cuda = state.device.type == "cuda"
        # CUDA: two pinned buffers, so a step's tokens can be read while the next one runs
        self._host_next = (
            torch.empty((2, self.max_batch), dtype=torch.int64, pin_memory=True) if cuda else None
        )
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else []
        self._launches = 0

    def _step(self, n: int, any_sampling: bool, k: int, max_len: int | None = None):
        """Forward rows ``[0, n)``, pick the next tokens, advance the active rows; on
        CUDA the tokens go on to pinned buffer ``k``."""
        s = self.state
        logits = forward(self.model, self.cache, s.tokens[:n], s.positions[:n], s.tables[:n],
                         max_len)  # fmt: skip
        if any_sampling:
            nxt = sample(logits, s.temperature[:n], s.top_p[:n], s.top_k[:n], s.seeds[:n],
                         s.positions[:n])  # fmt: skip
        else:
            nxt = logits.argmax(-1)
        s.advance(n, nxt)
        if self._host_next is not None:
            self._host_next[k, :n].copy_(nxt, non_blocking=True)
        return nxt

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's whole step, greedy and sampled, once per pinned buffer
        (all rows must be padding: inactive, they write the scratch block only)."""
        if not self.cuda_graphs:
            return
        sizes = buckets(self.max_batch)
        pool = None
        side = torch.cuda.Stream(device=self.state.device)
        side.wait_stream(torch.cuda.current_stream(self.state.device))
        with torch.cuda.stream(side):
            for b in sizes:
                for sampling in (False, True):
                    self._step(b, sampling, 0)  # compile kernels, warm the allocator
        torch.cuda.current_stream(self.state.device).wait_stream(side)
        for b in reversed(sizes):  # largest first: the pool fits all
            self.graphs[b] = {}
            for key in ((False, 0), (False, 1), (True, 0), (True, 1)):
                graph = torch.cuda.CUDAGraph()
                # thread_local: transfer-engine threads may touch CUDA while we capture
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._step(b, *key)
                pool = graph.pool()
                self.graphs[b][key] = graph
        for n in range(1, self.max_batch + 1):
            self._bucket[n] = next(b for b in sizes if b >= n)
        torch.cuda.synchronize(self.state.device)

    @torch.inference_mode()
    def launch(self, n: int, any_sampling: bool, max_len: int | None = None) -> Launched:
        """Queue the decode of rows ``[0, n)`` and the advance of their tokens and
        positions; ``result()`` of the returned handle gives the next tokens.

        On CUDA nothing waits here: the tokens go to pinned memory behind an event, so
        the caller can queue the next step before reading this one's (the batch state
        on the device is already advanced). With graphs that is two host calls, the
        replay and the event, so the engine thread gives up the GIL twice per step.
        ``max_len``: the longest row's length after this step (host data, CPU path)."""
        self._launches += 1
        k = self._launches % 2
        if self.graphs:
            self.graphs[self._bucket[n]][(any_sampling, k)].replay()
        else:
            nxt = self._step(n, any_sampling, k, max_len)
            if self._host_next is None:
                return Launched(self._launches, nxt.tolist(), None)
        self._events[k].record()
        return Launched(self._launches, self._host_next[k, :n], self._events[k])

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

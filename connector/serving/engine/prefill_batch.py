"""Prefill of concurrent prompts in shared forwards, chunked so a long prompt cannot stall.

Servicer threads call ``PrefillBatcher.prefill(tokens, blocks)``; one thread runs the
model. Each forward takes the next chunk (at most ``chunk_tokens`` in all, shortest
remaining prompts first, at most ``max_prompts`` of them) of every waiting prompt,
packs the chunks into one (T, hidden) batch for the model's projections and MLP
(``model.qkv_store`` / ``model._mlp_residual``: weights read once for all prompts), writes
each token's K/V into its prompt's blocks, and attends per prompt over the K/V
already in the cache (earlier chunks) plus the chunk itself, causally (on CUDA, a
prompt's first chunk attends with one fused SDPA kernel over its own K/V, and when
every chunk of a half-precision forward starts its prompt, one ``varlen_attn`` call
per layer covers them all). A short prompt that arrives while a long one is being
prefilled runs in the very next forward.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field

import torch
from kvbridge.connector.serving.model.llama import LlamaModel, layer_name
from kvbridge.topology.layouts import KVCache
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # one flash-attention call for every prompt of a forward (torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: one SDPA call per prompt
    varlen_attn = None

log = logging.getLogger("kvbridge.engine")

# no cuDNN: it builds an execution plan for every new prompt length (prompts vary)
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CHUNK_TOKENS = 512  # tokens of all prompts together in one forward (CPU)
CHUNK_TOKENS_CUDA = 4096  # on a GPU a forward of a few thousand tokens costs about one of 512


@dataclass(eq=False)
class _Job:
    tokens: list[int]
    blocks: list[int]
    done: int = 0  # tokens already in the cache
    future: Future = field(default_factory=Future)
    alive: Callable[[], bool] | None = None  # False: the caller went away
    abandoned: bool = False  # the caller stopped waiting


class PrefillBatcher:
    """One model-owning thread serving concurrent prefills in packed, chunked forwards."""

    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        chunk_tokens: int | None = None,
        max_prompts: int = 64,
    ) -> None:
        self.model, self.cache = model, cache
        if chunk_tokens is None:
            chunk_tokens = CHUNK_TOKENS_CUDA if model.device.type == "cuda" else CHUNK_TOKENS
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.chunk_tokens, self.max_prompts = chunk_tokens, max_prompts
        self.forwards = 0
        # CUDA, half precision: the prompts' first chunks attend in ONE varlen call per
        # layer (a torch call per prompt and layer gives up the GIL each time)
        self.varlen = (
            _VARLEN_CAUSAL is not None
            and model.device.type == "cuda"
            and model.dtype in (torch.float16, torch.bfloat16)
        )
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="kvbridge-prefill", daemon=True)
        self._thread.start()

    def prefill(
        self,
        tokens: list[int],
        blocks: list[int],
        timeout: float | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor, int] | None:
        """Write the prompt's K/V into ``blocks``; the logits of its last token and their
        argmax (the greedy first token, read back once per forward for all its prompts:
        a read of the logits here would also wait for the next forward, already queued).

        ``None`` when the caller gave up first: ``timeout`` seconds passed or ``alive()``
        turned false before the prompt's last chunk. The prompt then leaves the batch
        at the next forward, and this returns only once no forward writes ``blocks``.
        """
        bs = self.cache.block_size
        if not tokens:
            raise ValueError("prefill needs at least one prompt token")
        if len(blocks) * bs < len(tokens):
            raise ValueError(f"{len(tokens)} tokens need {-(-len(tokens) // bs)} blocks")
        if any(not 0 <= b < self.cache.num_blocks for b in blocks):
            raise ValueError(f"block ids must lie in [0, {self.cache.num_blocks})")
        job = _Job(list(tokens), list(blocks), alive=alive)
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()
        try:
            out = job.future.result(timeout=None if timeout is None else max(timeout, 0.0))
        except FutureTimeoutError:
            with self._cond:
                job.abandoned = True
                self._cond.notify()
            out = job.future.result()  # None, or the result if it finished meanwhile
        if out is None:
            return None
        logits, firsts, k = out
        return logits, firsts.get(k)

    # ------------------------------------------------------------- the thread
    def _plan(self) -> list[tuple[_Job, int]]:
        """(job, chunk length) of the next forward: shortest remaining first."""
        with self._cond:
            self._cond.wait_for(lambda: self._jobs)
            for job in [j for j in self._jobs if j.abandoned or (j.alive and not j.alive())]:
                self._jobs.remove(job)  # its caller gave up: no forward writes it again
                job.future.set_result(None)
            if not self._jobs:
                return []
            jobs = sorted(self._jobs, key=lambda j: len(j.tokens) - j.done)[: self.max_prompts]
        plan, budget = [], self.chunk_tokens
        for job in jobs:
            if budget <= 0:
                break
            n = min(len(job.tokens) - job.done, budget)
            plan.append((job, n))
            budget -= n
        return plan

    def _loop(self) -> None:
        while True:
            plan = self._plan()
            if not plan:
                continue
            try:
                last = self._forward(plan)
                ended = [lg for lg in last if lg is not None]
                firsts, k = (_FirstTokens(ended) if ended else None), 0
                self.forwards += 1
            except Exception as exc:  # fail this forward's prompts, keep serving
                with self._cond:
                    for job, _ in plan:
                        self._jobs.remove(job)
                for job, _ in plan:
                    job.future.set_exception(exc)
                continue
            for (job, n), logits in zip(plan, last, strict=True):
                job.done += n
                if job.done == len(job.tokens):
                    with self._cond:
                        self._jobs.remove(job)
                    job.future.set_result((logits, firsts, k))
                    k += 1

    @torch.inference_mode()
    def _forward(self, plan: list[tuple[_Job, int]]) -> list[torch.Tensor | None]:
        """One packed forward over the planned chunks; last-token logits of each chunk."""
        model, cache, cfg = self.model, self.cache, self.model.cfg
        dev, bs = model.device, cache.block_size
        window = getattr(cfg, "sliding_window", None)
        toks, pos, blk = [], [], []
        for job, n in plan:
            p = range(job.done, job.done + n)
            toks += job.tokens[job.done : job.done + n]
            pos += p
            blk += [job.blocks[t // bs] for t in p]
        tokens = torch.tensor(toks, dtype=torch.int64, device=dev)
        positions = torch.tensor(pos, dtype=torch.int64, device=dev)
        blk_t = torch.tensor(blk, dtype=torch.int64, device=dev)
        slot = positions % bs
        tables = [
            torch.tensor(job.blocks[: -(-(job.done + n) // bs)], dtype=torch.int64, device=dev)
            for job, n in plan
        ]
        group = cfg.num_heads // cfg.num_kv_heads
        flash = dev.type == "cuda" and window is None
        # every chunk a whole prompt's start: one varlen call per layer attends them all
        varlen = flash and self.varlen and all(job.done == 0 for job, _ in plan)
        if varlen:
            ends = [0]
            for _, n in plan:
                ends.append(ends[-1] + n)
            cu = torch.tensor(ends, dtype=torch.int32, device=dev)
            longest = max(n for _, n in plan)
        x = model.w.embed[tokens]
        for i in range(cfg.num_layers):
            k_cache, v_cache = cache.kv(layer_name(i))
            q, k, v = model.qkv_store(x, i, positions, (k_cache, v_cache), blk_t, slot, flash)
            if varlen:
                try:
                    attn = varlen_attn(q, k, v, cu, cu, longest, longest, scale=model.scale,
                                       **_VARLEN_CAUSAL)  # fmt: skip
                    x = model._mlp_residual(x, attn, i)
                    continue
                except Exception:  # e.g. no flash kernel for this GPU: one call per prompt
                    log.exception("varlen attention failed; one SDPA call per prompt from now on")
                    varlen = self.varlen = False
            outs, start = [], 0
            for (job, n), table in zip(plan, tables, strict=True):
                end = job.done + n  # keys [0, end) of this prompt
                if flash and job.done == 0:  # a whole prompt: its own K/V, causal
                    outs.append(_causal_sdpa(q, k, v, start, n, model.scale))
                    start += n
                    continue
                kh = k_cache[table].flatten(0, 1)[:end].repeat_interleave(group, dim=1)
                vh = v_cache[table].flatten(0, 1)[:end].repeat_interleave(group, dim=1)
                qh = q[start : start + n].transpose(0, 1)  # (Hq, n, D)
                scores = (qh @ kh.permute(1, 2, 0)) * model.scale  # (Hq, n, end)
                qp = torch.arange(job.done, end, device=dev)[:, None]
                kp = torch.arange(end, device=dev)[None, :]
                seen = kp <= qp
                if window is not None:
                    seen &= kp > qp - window
                scores = scores.masked_fill(~seen, float("-inf"))
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qh.dtype)
                outs.append((probs @ vh.transpose(0, 1)).transpose(0, 1))  # fp32 softmax
                start += n
            x = model._mlp_residual(x, torch.cat(outs), i)
        ends = torch.tensor(
            [sum(n for _, n in plan[: j + 1]) - 1 for j in range(len(plan))], device=dev
        )
        logits = model._logits(x[ends])
        return [
            logits[j] if job.done + n == len(job.tokens) else None
            for j, (job, n) in enumerate(plan)
        ]


class _FirstTokens:
    """The argmax of one forward's finished prompts, copied to pinned memory behind an
    event: ``get(i)`` waits for that forward only, not for the ones queued after it."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        tokens = torch.stack(logits).argmax(-1)
        self._event = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tokens

    def get(self, i: int) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._host[i])


def _causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, n: int, scale: float
) -> torch.Tensor:
    """Causal attention of rows ``[start, start + n)`` (one prompt from its first token)
    over their own K/V: one fused SDPA kernel instead of the explicit score matrix."""
    rows = slice(start, start + n)
    qh, kh, vh = (t[rows].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, D)
    with sdpa_kernel(SDPA_BACKENDS):
        out = torch.nn.functional.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)


def _varlen_causal() -> dict | None:
    """``varlen_attn``'s keywords for causal GQA on this torch (``None``: not usable).

    torch 2.10 spells causal ``is_causal=True``, later ones ``window_size=(-1, 0)``;
    2.11 takes fewer K/V heads than query heads as they come (checked against SDPA on
    an H200: bf16 rounding apart, equal), 2.13 asks for ``enable_gqa=True``."""
    if varlen_attn is None:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "scale" not in params:
        return None
    if "window_size" in params:
        kw: dict = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kw = {"is_causal": True}
    else:
        return None
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


_VARLEN_CAUSAL = _varlen_causal()
_LOCK = threading.Lock()


def prefill_batcher(rt) -> PrefillBatcher:
    """The daemon runtime's batcher (made on first use; ``rt`` has model, cache, cfg)."""
    with _LOCK:
        batcher = getattr(rt, "prefill_batcher", None)
        if batcher is None:
            batcher = PrefillBatcher(
                rt.model,
                rt.cache,
                chunk_tokens=rt.cfg.prefill_chunk_tokens or None,
                max_prompts=rt.cfg.max_batch,
            )
            rt.prefill_batcher = batcher
        return batcher

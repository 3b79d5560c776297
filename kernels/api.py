"""``paged_decode``: the public entry point (validation, backend choice, fast path)."""

from __future__ import annotations

import torch
from kvbridge.kernels.backends import REGISTRY, Backend, backend_names, resolve
from kvbridge.kernels.checks import DecodeProblem, PagedDecodeError, check_indices, check_inputs

BACKENDS = backend_names()  # the names the CLI offers ("auto" first)
_CALLS: dict[tuple, tuple[DecodeProblem, Backend]] = {}  # metadata key -> checked call


def _scale_key(s: object) -> object:
    return (s.shape, s.dtype, s.device) if isinstance(s, torch.Tensor) else (type(s), s)


def _call_key(q, k, v, bt, sl, scale, k_scale, v_scale, out, backend, window) -> tuple:
    """Everything ``check_inputs`` and the backend choice read, as one hashable key."""
    o = None if out is None else (out.shape, out.stride(), out.dtype, out.device)
    return (
        backend, type(window), window, type(scale), scale,
        _scale_key(k_scale), _scale_key(v_scale), o,
        q.shape, q.stride(), q.dtype, q.device,
        k.shape, k.stride(), k.dtype, k.device, k.data_ptr() == v.data_ptr(),
        v.shape, v.stride(), v.dtype, v.device,
        bt.shape, bt.stride(), bt.dtype, bt.device, sl.shape, sl.dtype, sl.device,
    )  # fmt: skip


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    validate: bool | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache: one or T new query tokens per sequence.

    Args:
        q: (B, Hq, Dqk) one query token per sequence, or (B, T, Hq, Dqk): T new
            tokens, the last T positions of each sequence, causal among
            themselves (multi-token decode, speculative verification).
        k_cache: (num_blocks, block_size, Hkv, Dqk) view, any strides with stride(-1) == 1.
        v_cache: (num_blocks, block_size, Hkv, Dv) view, same rules; may be a slice of
            ``k_cache`` (MLA: Hkv == 1, Dqk == 576, Dv == 512).
        block_table: (B, max_pages) int32/int64; entries no query sees (past the
            length, before the window) are never read and may be -1.
        seq_lens: (B,) int32/int64 tokens per sequence, the T new ones included;
            0 gives zeros (padding rows). Both may be on q's device or on the CPU
            (validated on the host, then copied to the device once).
        scale: softmax scale, default 1/sqrt(Dqk).
        k_scale, v_scale: dequantisation scales of a float8_e4m3fn cache (float or
            one-element tensor); must be None/1.0 for other dtypes.
        out: optional (B, [T,] Hq, Dv) output in q's dtype.
        backend: "auto" or a registered name (``BACKENDS``: "triton", "torch").
        validate: check seq_lens and the needed block ids. None (default): when
            they are on the CPU (no sync), not when on the device; True: always
            (one sync for device tensors, skipped during CUDA graph capture); False:
            never. The Triton kernel never reads outside the cache either way.
        window: sliding window (Mistral): the query at position p sees keys
            p - window < j <= p. None: all keys up to p.

    Returns:
        ``out`` (B, Hq, Dv), or (B, T, Hq, Dv) for a 4-D ``q``, in q's dtype.
    """
    try:
        key = _call_key(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale, v_scale,
                        out, backend, window)  # fmt: skip
        hit = _CALLS.get(key)
    except (AttributeError, TypeError):  # not tensors, unhashable: check_inputs explains
        key, hit = None, None
    if hit is None:
        if not isinstance(backend, str) or (backend != "auto" and backend not in REGISTRY):
            raise PagedDecodeError(
                f"unknown backend {backend!r}; supported: {', '.join(backend_names())}"
            )
        problem = check_inputs(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale,
                               v_scale, out, window)  # fmt: skip
        chosen = resolve(backend, problem, q.device)
        if key is not None:
            if len(_CALLS) > 4096:
                _CALLS.clear()
            _CALLS[key] = (problem, chosen)
    else:
        problem, chosen = hit
    if block_table.is_cpu:
        if validate is not False:
            check_indices(block_table, seq_lens, problem)  # host data: no sync
        if chosen.device_metadata and not q.is_cpu:
            block_table = block_table.to(q.device, non_blocking=True)
            seq_lens = seq_lens.to(q.device, non_blocking=True)
    elif validate and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_indices(block_table, seq_lens, problem)  # one sync
    if out is None:
        out = q.new_empty(problem.out_shape)  # q's dtype and device
    return chosen.launch(q, k_cache, v_cache, block_table, seq_lens, problem, k_scale, v_scale, out)

"""``paged_decode``: the public entry point and backend selection."""

from __future__ import annotations

import torch

from .checks import PagedDecodeError, check_indices, check_inputs
from .reference import torch_paged_decode

BACKENDS = ("auto", "triton", "torch")


def _triton_module():
    """The Triton launcher module, or None when triton is not installed."""
    try:
        from . import triton_launch
    except ImportError:
        return None
    return triton_launch


def _resolve_backend(backend: str, q: torch.Tensor, problem) -> str:
    if backend not in BACKENDS:
        raise PagedDecodeError(f"unknown backend {backend!r}; supported: {', '.join(BACKENDS)}")
    tl_mod = _triton_module()
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if q.is_cuda and tl_mod is not None and tl_mod.support_error(problem) is None:
            return "triton"
        return "torch"
    if tl_mod is None:
        raise PagedDecodeError(
            "backend='triton' needs the triton package (pip install 'kvbridge[triton]'); "
            "use backend='torch'"
        )
    err = tl_mod.support_error(problem)
    if err:
        raise PagedDecodeError(err)
    if not q.is_cuda and not tl_mod.is_interpreted():
        raise PagedDecodeError(
            f"backend='triton' needs CUDA tensors (q is on {q.device}) or the Triton "
            "interpreter (TRITON_INTERPRET=1 set before triton is imported); use "
            "backend='torch' or 'auto' on the CPU"
        )
    return "triton"


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
    validate: bool = True,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over a paged KV cache.

    Args:
        q: (B, Hq, Dqk) queries; stride(-1) == 1.
        k_cache: (num_blocks, block_size, Hkv, Dqk) view, any strides with stride(-1) == 1.
        v_cache: (num_blocks, block_size, Hkv, Dv) view, same rules; may be a slice of
            ``k_cache`` (MLA: Hkv == 1, Dqk == 576, Dv == 512).
        block_table: (B, max_pages) int32/int64; entries past a sequence's length are
            never read and may be -1.
        seq_lens: (B,) int32/int64 tokens per sequence; 0 gives zeros.
        scale: softmax scale, default 1/sqrt(Dqk).
        k_scale, v_scale: dequantisation scales of a float8_e4m3fn cache (float or
            one-element tensor); must be None/1.0 for other dtypes.
        out: optional (B, Hq, Dv) output in q's dtype.
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".
        validate: check seq_lens and the needed block ids on the host (one sync
            on a GPU; skipped during CUDA graph capture). The Triton kernel never
            reads outside the cache either way: it drops ids outside the cache.

    Returns:
        ``out`` (B, Hq, Dv) in q's dtype.
    """
    problem = check_inputs(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale, v_scale, out)
    chosen = _resolve_backend(backend, q, problem)
    if validate and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_indices(block_table, seq_lens, problem)
    if out is None:
        out = torch.empty(
            (problem.batch, problem.num_q_heads, problem.head_dim_v), dtype=q.dtype, device=q.device
        )
    if chosen == "torch":
        return torch_paged_decode(
            q, k_cache, v_cache, block_table, seq_lens, problem, k_scale, v_scale, out
        )
    from .triton_launch import triton_paged_decode

    return triton_paged_decode(
        q, k_cache, v_cache, block_table, seq_lens, problem, k_scale, v_scale, out
    )

"""Input validation for ``paged_decode``: shapes, dtypes, strides and index values.

Everything here reads tensor metadata only, except ``check_indices`` which reads
``block_table`` and ``seq_lens`` (numpy on host tensors: no sync; one device sync
when they live on a GPU). Errors are ``PagedDecodeError`` and name the argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


class PagedDecodeError(ValueError):
    """Bad input to ``paged_decode``, or a backend that cannot run it."""


@dataclass(frozen=True)
class DecodeProblem:
    """The sizes of one decode call, read from the tensors' metadata."""

    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim_qk: int
    head_dim_v: int
    num_blocks: int
    block_size: int
    max_pages: int  # block_table width
    kv_dtype: torch.dtype
    q_dtype: torch.dtype
    v_shares_k: bool  # V is the first head_dim_v columns of K (MLA latent)
    scale: float
    tokens: int = 1  # query tokens per sequence (T): the last T positions, causal
    window: int = 0  # sliding window (0: none): keys j with p - window < j <= p
    multi: bool = False  # q is (B, T, Hq, D) and the output (B, T, Hq, Dv)

    def __hash__(self) -> int:  # hashed on every call (plan lookup): computed once
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(dataclasses.astuple(self))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def out_shape(self) -> tuple[int, ...]:
        b, t, h, dv = self.batch, self.tokens, self.num_q_heads, self.head_dim_v
        return (b, t, h, dv) if self.multi else (b, h, dv)

    def key_span(self) -> int:
        """Most key positions one query row can see (the table's capacity bounds it)."""
        cap = self.max_pages * self.block_size
        return min(cap, self.window + self.tokens - 1) if self.window else cap


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _require(cond: bool, msg: str | Callable[[], str]) -> None:
    if not cond:
        raise PagedDecodeError(msg() if callable(msg) else msg)


def _check_scale(name: str, value: object, fp8: bool, kv_dtype: torch.dtype) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        _require(value.numel() == 1, f"{name} must be a float or a one-element tensor")
        _require(value.is_floating_point(), f"{name} tensor must be floating point")
        _require(
            fp8,
            f"{name} given for a {_names((kv_dtype,))} cache; scales apply only to "
            "float8_e4m3fn caches",
        )
        return
    _require(isinstance(value, (int, float)), f"{name} must be a float or a tensor")
    _require(math.isfinite(float(value)) and float(value) > 0, f"{name}={value} must be > 0")
    _require(
        fp8 or float(value) == 1.0,
        f"{name}={value} given for a {_names((kv_dtype,))} cache; scales apply only to "
        "float8_e4m3fn caches",
    )


def scale_operand(s: object, device: torch.device) -> torch.Tensor | float:
    """A checked dequantisation scale as both backends take it: a tensor becomes an
    fp32 0-d tensor on ``device``, a number a float (``None``: 1.0)."""
    if isinstance(s, torch.Tensor):
        return s.to(device=device, dtype=torch.float32).reshape(())
    return 1.0 if s is None else float(s)


def v_is_prefix_of_k(k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when ``v`` is ``k[..., :Dv]`` (same storage, pointer and outer strides)."""
    return (
        v.data_ptr() == k.data_ptr()
        and v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        and v.stride()[:3] == k.stride()[:3]
        and v.shape[:3] == k.shape[:3]
        and v.shape[3] <= k.shape[3]
    )


def check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None,
    k_scale: object,
    v_scale: object,
    out: torch.Tensor | None,
    window: int | None = None,
) -> DecodeProblem:
    """Validate metadata of every argument; return the problem sizes.

    ``block_table``/``seq_lens`` may live on q's device or on the CPU (host
    metadata, validated without a sync). Messages are only formatted on failure.
    """
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))
    named += (("block_table", block_table), ("seq_lens", seq_lens))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise PagedDecodeError(f"{name} must be a torch.Tensor, got {type(t)}")
    qs, ks, vs = q.shape, k_cache.shape, v_cache.shape
    _require(
        len(qs) in (3, 4),
        lambda: (
            f"q must be (batch, q_heads, head_dim) or (batch, tokens, q_heads, head_dim), "
            f"got shape {tuple(qs)}"
        ),
    )
    for name, shape in (("k_cache", ks), ("v_cache", vs)):
        if len(shape) != 4:
            raise PagedDecodeError(
                f"{name} must be (num_blocks, block_size, kv_heads, head_dim), got shape "
                f"{tuple(shape)}"
            )
    dev = q.device
    for name, t in named[1:3]:
        if t.device != dev:
            raise PagedDecodeError(f"{name} is on {t.device} but q is on {dev}")
    mdev = block_table.device
    if mdev != seq_lens.device or (mdev != dev and mdev.type != "cpu"):
        raise PagedDecodeError(
            f"block_table ({mdev}) and seq_lens ({seq_lens.device}) must both be on q's device "
            f"({dev}) or both on the CPU"
        )
    kd, qd = k_cache.dtype, q.dtype
    _require(
        kd in KV_DTYPES,
        lambda: f"k_cache dtype {kd} unsupported; supported: {_names(KV_DTYPES)}",
    )
    _require(
        v_cache.dtype == kd,
        lambda: f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {kd}",
    )
    _require(qd in Q_DTYPES, lambda: f"q dtype {qd} unsupported; supported: {_names(Q_DTYPES)}")
    fp8 = kd == torch.float8_e4m3fn
    _require(
        fp8 or qd == kd,
        lambda: (
            f"q dtype {qd} must equal the cache dtype {kd} (only float8 caches may differ from q)"
        ),
    )
    for name, t in named[:3]:
        if t.stride(-1) != 1:
            raise PagedDecodeError(
                f"{name} must have stride 1 in its last dim (got strides {t.stride()}); other "
                "strides may be anything"
            )
    n, bs, hkv, dqk = ks
    _require(
        vs[:3] == ks[:3],
        lambda: (
            f"v_cache shape {tuple(vs)} must match k_cache {tuple(ks)} in "
            "(num_blocks, block_size, kv_heads)"
        ),
    )
    multi = len(qs) == 4
    b, t, hq, dq = qs if multi else (qs[0], 1, qs[1], qs[2])
    _require(t >= 1, lambda: f"q has {t} tokens per sequence; need at least 1")
    _require(
        window is None or (type(window) is int and window >= 1),
        lambda: f"window must be None or an int >= 1, got {window!r}",
    )
    _require(bs >= 1 and hkv >= 1, lambda: f"k_cache shape {tuple(ks)} has an empty dim")
    _require(dq == dqk, lambda: f"q head_dim {dq} differs from k_cache head_dim {dqk}")
    _require(
        hq >= 1 and hq % hkv == 0,
        lambda: f"q heads ({hq}) must be a positive multiple of the KV heads ({hkv})",
    )
    bts = block_table.shape
    _require(
        len(bts) == 2 and block_table.dtype in INDEX_DTYPES and bts[0] == b,
        lambda: (
            f"block_table must be a 2-D int32/int64 tensor with {b} rows, got "
            f"{block_table.dtype} of shape {tuple(bts)}"
        ),
    )
    _require(
        block_table.stride(1) == 1 or bts[1] <= 1,
        lambda: "block_table must have stride 1 in its last dim",
    )
    _require(
        seq_lens.dim() == 1 and seq_lens.dtype in INDEX_DTYPES and seq_lens.shape[0] == b,
        lambda: (
            f"seq_lens must be a 1-D int32/int64 tensor of length {b}, got "
            f"{seq_lens.dtype} of shape {tuple(seq_lens.shape)}"
        ),
    )
    dv = vs[3]
    oshape = (b, t, hq, dv) if multi else (b, hq, dv)
    if out is not None:
        _require(isinstance(out, torch.Tensor), lambda: "out must be a torch.Tensor")
        _require(
            out.shape == oshape and out.dtype == qd and out.device == dev,
            lambda: (
                f"out must be a {qd} tensor of shape {oshape} on {dev}, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
            ),
        )
        _require(out.stride(-1) == 1, lambda: "out must have stride 1 in its last dim")
    if scale is None:
        scale = 1.0 / math.sqrt(dqk)
    _require(
        isinstance(scale, (int, float)) and math.isfinite(float(scale)),
        lambda: f"scale must be a finite float, got {scale!r}",
    )
    if k_scale is not None:
        _check_scale("k_scale", k_scale, fp8, kd)
    if v_scale is not None:
        _check_scale("v_scale", v_scale, fp8, kd)
    return DecodeProblem(
        batch=b,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim_qk=dqk,
        head_dim_v=dv,
        num_blocks=n,
        block_size=bs,
        max_pages=bts[1],
        kv_dtype=kd,
        q_dtype=qd,
        v_shares_k=v_is_prefix_of_k(k_cache, v_cache),
        scale=float(scale),
        tokens=t,
        window=window or 0,
        multi=multi,
    )


def _first_bad(mask) -> int:
    return int(np.flatnonzero(mask)[0] if isinstance(mask, np.ndarray) else mask.nonzero()[0, 0])


def check_indices(block_table: torch.Tensor, seq_lens: torch.Tensor, p: DecodeProblem) -> None:
    """Check ``seq_lens`` (0, or T..capacity) and every block id a query can see.

    Entries outside what the queries see (past the length, or before the window)
    are ignored and may be -1. Host tensors: numpy, no sync; device tensors: one sync.
    """
    cap, bs, t = p.max_pages * p.block_size, p.block_size, p.tokens
    host = block_table.device.type == "cpu"
    if host:
        sl = seq_lens.numpy().astype(np.int64)
        bt = block_table.numpy()
        col = np.arange(p.max_pages)
    else:
        sl = seq_lens.to(torch.int64)
        bt = block_table
        col = torch.arange(p.max_pages, device=block_table.device)
    bad_len = (sl < 0) | (sl > cap) | ((sl > 0) & (sl < t))
    pages = (sl + bs - 1) // bs
    first = (sl - t - p.window + 1).clip(0) // bs if p.window else pages * 0
    needed = (col[None, :] < pages[:, None]) & (col[None, :] >= first[:, None])
    bad_id = needed & ((bt < 0) | (bt >= p.num_blocks))
    flags = (bad_len.any(), bad_id.any()) if host else torch.stack(
        [bad_len.any(), bad_id.any()]).tolist()  # fmt: skip
    if flags[0]:
        i = _first_bad(bad_len)
        n = int(sl[i])
        if 0 < n < t:
            raise PagedDecodeError(
                f"seq_lens[{i}] = {n} is shorter than the {t} query tokens per sequence (q has "
                f"T = {t}; seq_lens counts the new tokens too; 0 marks a padding row)"
            )
        raise PagedDecodeError(
            f"seq_lens[{i}] = {n} is outside [0, {cap}] (block_table has "
            f"{p.max_pages} pages of {p.block_size} tokens)"
        )
    if flags[1]:
        i, j = (int(x) for x in (np.argwhere(bad_id)[0] if host else bad_id.nonzero()[0]))
        raise PagedDecodeError(
            f"block_table[{i}, {j}] = {int(bt[i, j])} is not a cache block (0..{p.num_blocks - 1})"
            f" but seq_lens[{i}] = {int(sl[i])} needs it"
        )

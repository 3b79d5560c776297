"""Batched sampling on the device: temperature, top-k, top-p and a per-request seed.

Rows with ``temperature == 0`` take the argmax (greedy, the default). Sampled rows
use the Gumbel-max trick with noise from a counter-based hash of (seed, position,
token id): no generator state, so a request's tokens depend only on its seed and
never on which other sequences share the batch, and the whole thing is a few
element-wise kernels (CUDA-graph friendly, no host sync).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# odd 32-bit multipliers (lowbias32 by Chris Wellons; golden-ratio constants)
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_K_SEED, _K_POS = 0x9E3779B1, 0x85EBCA77


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32 uniforms in (0, 1), a pure function of (seed, position, column)."""
    row = _mix32(((seeds * _K_SEED) ^ (positions * _K_POS)) & _MASK32)
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = _mix32((row[:, None] + cols[None, :] * _K_SEED) & _MASK32)
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Next token per row (int64, on the device).

    ``temperature``/``top_p`` float32 (B,), ``top_k`` int64 (B,) (0: off),
    ``seeds``/``positions`` int64 (B,). ``top_p`` outside (0, 1) is off.
    """
    greedy = logits.argmax(-1)
    vocab = logits.shape[-1]
    temp = temperature.clamp_min(1e-5)[:, None]
    scaled = logits.to(torch.float32) / temp
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp_max(vocab), vocab)[:, None]
    drop = rank >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the better tokens
    p = torch.where((top_p > 0) & (top_p < 1), top_p, 1.0)[:, None]
    drop |= (before >= p) & (rank > 0)  # keep the smallest prefix reaching p (at least one)
    kept = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(scaled, float("-inf")).scatter(-1, order, kept)
    u = uniform_noise(seeds, positions, vocab)
    gumbel = -torch.log(-torch.log(u))
    sampled = (filtered + gumbel).argmax(-1)
    return torch.where(temperature > 0, sampled, greedy)

"""An independent float64 dense Llama forward (no paging) used as ground truth."""

from __future__ import annotations

import math

import torch


def dense_logits(
    w, cfg, tokens: list[int]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits of every position (T, V) and per-layer (K, V) of shape (T, Hkv, D), float64."""
    f = lambda t: t.detach().to(torch.float64)
    t = len(tokens)
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = torch.arange(t, dtype=torch.float64)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()

    def rot(x):  # x (T, H, D): pairs (i, i + D/2) rotated by ang[:, i]
        a, b = x[..., : d // 2], x[..., d // 2 :]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)

    def norm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * f(g)

    x = f(w.embed)[torch.tensor(tokens)]
    kvs = []
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for lw in w.layers:
        h = norm(x, lw.input_norm)
        q = rot((h @ f(lw.wq).T).view(t, hq, d))
        k = rot((h @ f(lw.wk).T).view(t, hkv, d))
        v = (h @ f(lw.wv).T).view(t, hkv, d)
        kvs.append((k, v))
        out = torch.empty(t, hq, d, dtype=torch.float64)
        for head in range(hq):
            kv_head = head // (hq // hkv)
            s = (q[:, head] @ k[:, kv_head].T) / math.sqrt(d)
            s = s.masked_fill(~mask, float("-inf"))
            out[:, head] = torch.softmax(s, -1) @ v[:, kv_head]
        x = x + out.reshape(t, -1) @ f(lw.wo).T
        h = norm(x, lw.post_norm)
        gate = h @ f(lw.w_gate).T
        x = x + ((gate / (1 + torch.exp(-gate))) * (h @ f(lw.w_up).T)) @ f(lw.w_down).T
    return norm(x, w.norm) @ f(w.lm_head).T, kvs


def dense_greedy(w, cfg, prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        logits, _ = dense_logits(w, cfg, seq)
        out.append(int(logits[-1].argmax()))
        seq.append(out[-1])
    return out

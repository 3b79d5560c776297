"""The decoder of every supported family over a paged KV cache (one code path).

Llama, Mistral, Qwen2 and Qwen3 differ only in switches of ``ModelConfig`` (set by
``families.py``): attention biases, q/k RMSNorm, sliding window, rope type. The K/V
of layer ``i`` live in ``cache.kv(f"layer{i}")``: two logical
``(num_blocks, block_size, num_kv_heads, head_dim)`` views of any layout in
``kvbridge.topology.layouts``. Prefill writes them in place through the views
(never a copy of the cache); decode appends one token and attends with
``kvbridge.kernels.paged_decode`` over the views as they are.

Numerics follow transformers: RMSNorm and softmax accumulate in float32 and cast
back; rope tables are computed in float32 and cast to the model dtype. On CUDA the
same maths runs fused (``fused.py``: one q/k/v GEMM, one gate/up GEMM, Triton
RMSNorm, rope + K/V store and SiLU kernels); ``fused=False`` keeps the torch ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from kvbridge.connector.serving.model import fused as fz
from kvbridge.connector.serving.model.config import ModelConfig
from kvbridge.connector.serving.model.identity import model_identity
from kvbridge.connector.serving.model.rope import ROPE_TYPES, apply_rope, rope_tables
from kvbridge.connector.serving.model.weights import ModelWeights, random_weights
from kvbridge.topology.layouts import KVCache


def layer_name(i: int) -> str:
    """Name of layer ``i`` in a ``KVCache`` (the allocator's convention)."""
    return f"layer{i}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm accumulated in float32, cast back, then scaled (transformers' order)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, w, b)


class LlamaModel:
    """Greedy-decoding model of any family; stateless apart from the caller's paged cache.

    ``identity`` (``NAME@DIGEST``) names the config and weights; daemons compare it.
    ``fused``: the fused GPU path (``fused.py``); ``None``: on CUDA devices. Families
    with q/k norms keep the torch ops for q/k/v; the norms and the MLP are fused for all.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        attention_backend: str = "auto",
        name: str | None = None,
        fused: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.w = weights
        self.attention_backend = attention_backend
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        inv_freq, rope_scaling = ROPE_TYPES[cfg.rope_type].inv_freq(cfg, 0)
        self._rope = (inv_freq.to(self.device), rope_scaling)  # computed once, on the device
        self._rope_last: tuple = (None, None, None)
        self.identity = model_identity(name or f"embedded-{cfg.family}", cfg, weights)
        self.fused = self.device.type == "cuda" if fused is None else fused
        self._fused_w = fz.fuse_weights(weights.layers) if self.fused else []
        self._fused_qkv = self.fused and not cfg.qk_norm

    @classmethod
    def random(
        cls,
        cfg: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attention_backend: str = "auto",
    ) -> LlamaModel:
        return cls(cfg, random_weights(cfg, dtype, device), attention_backend)

    # ------------------------------------------------------------------ checks
    def check_cache(self, cache: KVCache) -> None:
        """Raise ``ValueError`` unless ``cache`` holds this model's K/V geometry."""
        cfg = self.cfg
        for i in range(cfg.num_layers):
            name = layer_name(i)
            if name not in cache.layers:
                raise ValueError(f"KV cache has no layer {name!r} (model has {cfg.num_layers})")
            for kind, view in zip("kv", cache.kv(name), strict=True):
                want = (cfg.num_kv_heads, cfg.head_dim)
                if view.dim() != 4 or tuple(view.shape[2:]) != want:
                    raise ValueError(
                        f"KV cache {name} {kind} view has shape {tuple(view.shape)}, "
                        f"expected (blocks, tokens, {want[0]}, {want[1]})"
                    )
                if view.dtype != self.dtype:
                    raise ValueError(
                        f"KV cache {name} dtype {view.dtype} differs from the model's {self.dtype}"
                    )

    def _check_tokens(self, token_ids: torch.Tensor) -> None:
        if token_ids.numel() and (
            int(token_ids.min()) < 0 or int(token_ids.max()) >= self.cfg.vocab_size
        ):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")

    # ----------------------------------------------------------------- helpers
    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``positions``; reused while the caller passes the same tensor."""
        last, cos, sin = self._rope_last
        if last is not positions:
            cos, sin = rope_tables(self.cfg, positions, self.dtype, self._rope)
            self._rope_last = (positions, cos, sin)
        return cos, sin

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fz.rms_norm(x, weight, self.cfg.rms_norm_eps)[0]
        return rms_norm(x, weight, self.cfg.rms_norm_eps)

    def qkv_store(
        self,
        x: torch.Tensor,
        i: int,
        positions: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        blk: torch.Tensor,
        slot: torch.Tensor,
        want_kv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Layer ``i``'s q ``(T, Hq, D)``; its k (rope applied) and v are written into the
        cache views ``kv`` at ``(blk[t], slot[t])`` and returned too when ``want_kv``."""
        if not self._fused_qkv:
            q, k, v = self._qkv(x, i, positions)
            kv[0][blk, slot] = k  # index_put_ through the strided views: in place
            kv[1][blk, slot] = v
            return q, k, v
        cfg = self.cfg
        wqkv, bqkv, _, _ = self._fused_w[i]
        qkv = _linear(self._norm(x, self.w.layers[i].input_norm), wqkv, bqkv)
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = self._rope_tables(positions)  # once per forward (cached by tensor)
        q, k = fz.rope_store(qkv, cos, sin, heads, *kv, blk, slot, want_k=want_kv)
        if not want_kv:
            return q, None, None
        start = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
        return q, k, qkv[:, start:].view(-1, cfg.num_kv_heads, cfg.head_dim)

    def _qkv(
        self, x: torch.Tensor, i: int, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``(T, Hq, D)``, k and v ``(T, Hkv, D)`` of layer ``i`` (rope applied)."""
        cfg, lw = self.cfg, self.w.layers[i]
        h = self._norm(x, lw.input_norm)
        t = x.shape[0]
        q = _linear(h, lw.wq, lw.bq).view(t, cfg.num_heads, cfg.head_dim)
        k = _linear(h, lw.wk, lw.bk).view(t, cfg.num_kv_heads, cfg.head_dim)
        v = _linear(h, lw.wv, lw.bv).view(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
        cos, sin = self._rope_tables(positions)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _mlp_residual(self, x: torch.Tensor, attn: torch.Tensor, i: int) -> torch.Tensor:
        cfg, lw = self.cfg, self.w.layers[i]
        o = _linear(attn.reshape(x.shape[0], -1), lw.wo, lw.bo)
        if self.fused:
            _, _, wgu, bgu = self._fused_w[i]
            h, x = fz.rms_norm(o, lw.post_norm, cfg.rms_norm_eps, residual=x)
            act = fz.silu_mul(_linear(h, wgu, bgu))
            return x + _linear(act, lw.w_down, lw.b_down)
        x = x + o
        h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
        act = torch.nn.functional.silu(_linear(h, lw.w_gate, lw.b_gate)) * _linear(
            h, lw.w_up, lw.b_up
        )
        return x + _linear(act, lw.w_down, lw.b_down)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.w.norm) @ self.w.lm_head.T

    # ----------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(
        self, token_ids: Sequence[int], cache: KVCache, block_ids: Sequence[int]
    ) -> torch.Tensor:
        """Run the prompt, write its K/V into ``block_ids`` of ``cache``; logits of the last token.

        Token ``t`` goes to slot ``t % block_size`` of block ``block_ids[t // block_size]``.
        """
        cfg = self.cfg
        tokens = torch.as_tensor(list(token_ids), dtype=torch.int64, device=self.device)
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError("prefill needs at least one prompt token")
        self._check_tokens(tokens)
        t, bs = tokens.numel(), cache.block_size
        blocks = torch.as_tensor(list(block_ids), dtype=torch.int64, device=self.device)
        if blocks.numel() < -(-t // bs):
            raise ValueError(f"{t} tokens need {-(-t // bs)} blocks of {bs}, got {blocks.numel()}")
        if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= cache.num_blocks):
            raise ValueError(f"block ids must lie in [0, {cache.num_blocks})")
        positions = torch.arange(t, dtype=torch.int64, device=self.device)
        blk, slot = blocks[positions // bs], positions % bs
        group = cfg.num_heads // cfg.num_kv_heads
        visible = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        if cfg.sliding_window is not None:  # query p sees keys p - window < j <= p
            visible = visible.triu(1 - cfg.sliding_window)
        x = self.w.embed[tokens]
        for i in range(cfg.num_layers):
            q, k, v = self.qkv_store(x, i, positions, cache.kv(layer_name(i)), blk, slot, True)
            kh = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, T, D)
            vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
            scores = (q.transpose(0, 1) @ kh.transpose(1, 2)) * self.scale
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            attn = probs @ vh  # (Hq, T, D)
            x = self._mlp_residual(x, attn.transpose(0, 1), i)
        return self._logits(x[-1:])[0]

    # ------------------------------------------------------------------ decode
    @torch.inference_mode()
    def decode_step(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        positions: Sequence[int] | torch.Tensor,
        cache: KVCache,
        block_table: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step for a batch: append each token's K/V, attend, return logits (B, V).

        ``positions[b]`` is the position of ``token_ids[b]`` (the tokens before it are
        in the cache); ``block_table[b]`` lists that sequence's blocks (int32 or int64).
        """
        from kvbridge.kernels import paged_decode

        cfg = self.cfg
        tokens = torch.as_tensor(token_ids, dtype=torch.int64, device=self.device).reshape(-1)
        pos = torch.as_tensor(positions, dtype=torch.int64, device=self.device).reshape(-1)
        if tokens.numel() != pos.numel() or block_table.dim() != 2:
            raise ValueError("decode_step needs one position per token and a 2-D block table")
        if block_table.shape[0] != tokens.numel():
            raise ValueError("block_table needs one row per token")
        self._check_tokens(tokens)
        bs = cache.block_size
        if int(pos.max()) >= block_table.shape[1] * bs or int(pos.min()) < 0:
            raise ValueError("a position lies outside its block table")
        rows = torch.arange(tokens.numel(), device=self.device)
        table = block_table.to(self.device)
        blk = table[rows, pos // bs].to(torch.int64)
        if int(blk.min()) < 0 or int(blk.max()) >= cache.num_blocks:
            raise ValueError(f"block ids must lie in [0, {cache.num_blocks})")
        slot = pos % bs
        seq_lens = (pos + 1).to(torch.int32)
        x = self.w.embed[tokens]
        for i in range(cfg.num_layers):
            k_cache, v_cache = cache.kv(layer_name(i))
            q = self.qkv_store(x, i, pos, (k_cache, v_cache), blk, slot)[0]
            attn = paged_decode(
                q,
                k_cache,
                v_cache,
                table,
                seq_lens,
                scale=self.scale,
                backend=self.attention_backend,
                window=cfg.sliding_window,
            )
            x = self._mlp_residual(x, attn, i)
        return self._logits(x)

"""Sizes and per-family switches of the decoder model (one code path for every family)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class ModelConfigError(ValueError):
    """A checkpoint or config this model cannot serve exactly (one line, names what)."""


@dataclass(frozen=True)
class ModelConfig:
    """Model sizes; the defaults are small so a demo runs fast on 2 CPU cores.

    ``family`` names an entry of ``families.FAMILIES``; the switches below it are
    what the families differ in. ``rope_type``/``rope_params`` follow transformers'
    ``rope_parameters`` (see ``rope.py``); ``sliding_window`` is the attention window
    of every layer (None: full attention).
    """

    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 512
    vocab_size: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    seed: int = 0
    family: str = "llama"
    rope_type: str = "default"
    rope_params: dict = field(default_factory=dict)
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"model num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"model head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ModelConfigError("model rope_theta and rms_norm_eps must be positive")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            raise ModelConfigError(
                f"model sliding_window must be a positive integer, got {self.sliding_window!r}"
            )
        from kvbridge.connector.serving.model.rope import check_rope

        check_rope(self.rope_type, self.rope_params)

    def to_dict(self) -> dict:
        return asdict(self)

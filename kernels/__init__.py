"""kvbridge.kernels: stride-aware paged decode attention (Triton and PyTorch reference).

``paged_decode`` attends directly over a paged KV cache in any layout (any strides,
``stride(-1) == 1``), GQA and MLA, bf16/fp16/fp32 and fp8 e4m3, one or T query
tokens per sequence, optional sliding window. Backends: ``backends.REGISTRY``.
See README.md.
"""

from kvbridge.kernels.api import BACKENDS, paged_decode
from kvbridge.kernels.backends import REGISTRY, Backend, register
from kvbridge.kernels.checks import DecodeProblem, PagedDecodeError

__all__ = [
    "BACKENDS", "REGISTRY", "Backend", "DecodeProblem", "PagedDecodeError", "paged_decode",
    "register",
]  # fmt: skip

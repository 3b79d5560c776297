"""A small Llama-style decoder whose KV cache lives in a paged cache of any layout.

Reading order: ``config.py`` (sizes), ``weights.py`` (seeded random weights and
local Hugging Face safetensors checkpoints), ``llama.py`` (prefill writes K/V
into the paged cache; decode attends with ``kvbridge.kernels.paged_decode``),
``generate.py`` (monolithic greedy reference), ``tokenizer.py`` (byte level).
"""

from kvbridge.connector.serving.model.config import ModelConfig
from kvbridge.connector.serving.model.generate import (
    allocate_cache,
    blocks_needed,
    generate_monolithic,
)
from kvbridge.connector.serving.model.llama import LlamaModel
from kvbridge.connector.serving.model.tokenizer import ByteTokenizer
from kvbridge.connector.serving.model.weights import load_hf_checkpoint, random_weights

__all__ = [
    "ByteTokenizer",
    "LlamaModel",
    "ModelConfig",
    "allocate_cache",
    "blocks_needed",
    "generate_monolithic",
    "load_hf_checkpoint",
    "random_weights",
]

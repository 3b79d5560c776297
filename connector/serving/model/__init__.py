"""The decoder (Llama, Mistral, Qwen2, Qwen3) whose KV cache lives in a paged cache of any layout.

Reading order: ``config.py`` (sizes and family switches), ``families.py`` (the family
registry: ``config.json`` of either transformers form -> ``ModelConfig``), ``rope.py``
(rope types), ``weights.py`` (seeded random weights and local Hugging Face
safetensors checkpoints, every tensor consumed), ``identity.py`` (model digest),
``llama.py`` (prefill writes K/V into the paged cache; decode attends with
``kvbridge.kernels.paged_decode``), ``generate.py`` (monolithic greedy reference),
``tokenizer.py`` (byte level or ``tokenizer.json``, incremental detokenization).
"""

from kvbridge.connector.serving.model.config import ModelConfig, ModelConfigError
from kvbridge.connector.serving.model.families import FAMILIES
from kvbridge.connector.serving.model.generate import (
    allocate_cache,
    blocks_needed,
    generate_monolithic,
)
from kvbridge.connector.serving.model.llama import LlamaModel
from kvbridge.connector.serving.model.tokenizer import ByteTokenizer, Detokenizer, HFTokenizer
from kvbridge.connector.serving.model.weights import load_hf_checkpoint, random_weights

__all__ = [
    "FAMILIES",
    "ByteTokenizer",
    "Detokenizer",
    "HFTokenizer",
    "LlamaModel",
    "ModelConfig",
    "ModelConfigError",
    "allocate_cache",
    "blocks_needed",
    "generate_monolithic",
    "load_hf_checkpoint",
    "random_weights",
]

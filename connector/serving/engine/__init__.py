"""Continuous-batching engine: admission, the engine loop, the batched device step.

Reading order: ``scheduler.py`` (admission by free blocks, running set),
``loop.py`` (the one thread that owns model and cache), ``step.py`` (device batch
state, the batched step, CUDA graphs), ``sampling.py`` (batched sampling),
``prefill_batch.py`` (prompts of concurrent Prefill calls packed into one forward).
"""

from kvbridge.connector.serving.engine.loop import DecodeEngine
from kvbridge.connector.serving.engine.scheduler import (
    Admission,
    AdmissionCancelledError,
    QueueFullError,
    RunningSet,
    SamplingParams,
    Sequence,
)

__all__ = [
    "Admission",
    "AdmissionCancelledError",
    "DecodeEngine",
    "QueueFullError",
    "RunningSet",
    "SamplingParams",
    "Sequence",
]

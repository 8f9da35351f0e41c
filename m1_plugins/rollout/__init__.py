"""The M1 generation engine: paged KV for attention layers, state slots for Mamba layers, CUDA-graph decode,
continuous batching, in-place weight updates. Drives the one model class, `M1ForCausalLM`."""

from .async_engine import AsyncM1Engine, TokenEvent
from .engine import EngineStats, M1Engine, RequestOutput, Sample
from .sampling import SamplingParams

__all__ = ["AsyncM1Engine", "EngineStats", "M1Engine", "RequestOutput", "Sample", "SamplingParams", "TokenEvent"]

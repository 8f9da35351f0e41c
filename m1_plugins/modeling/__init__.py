from .cache import M1HybridCache, state_bytes_per_token, state_shapes
from .configuration_m1 import M1Config
from .modeling_m1 import M1ForCausalLM, M1Model, M1PreTrainedModel

__all__ = ["M1Config", "M1ForCausalLM", "M1HybridCache", "M1Model", "M1PreTrainedModel", "state_bytes_per_token", "state_shapes"]

"""M1 hybrid Transformer/Mamba-2 reasoning models as plugins for Axolotl and VeRL.

Importing the package registers `m1_hybrid` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved hybrid from its own files.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling import M1Config, M1ForCausalLM

__version__ = "0.1.0"


def register() -> None:
    """Register M1Config / M1ForCausalLM with the Auto classes (idempotent)."""
    AutoConfig.register(M1Config.model_type, M1Config, exist_ok=True)
    AutoModelForCausalLM.register(M1Config, M1ForCausalLM, exist_ok=True)


register()

__all__ = ["M1Config", "M1ForCausalLM", "register", "__version__"]

"""Import this module to make transformers load GraniteMoeHybrid checkpoints (e.g. from `m1 export`) with the
Mamba gated RMSNorm normalised per group, as vLLM computes it (see m1_plugins.export).

It exists for VeRL's `actor_rollout_ref.model.external_lib`, whose contract is "import this module": with it,
the FSDP actor computes the same function as the vLLM rollout. Importing m1_plugins.export has no such effect.
"""

from .export import register_grouped_granite

register_grouped_granite()

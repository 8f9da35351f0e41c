"""Registers the `m1` rollout with VeRL and the `m1_hybrid` model with transformers' Auto classes.

The only side-effect module of m1_plugins.verl. VeRL imports it on every `import verl` (driver, TaskRunner
and each Ray worker) through the entry point declared in pyproject.toml:

    [project.entry-points."verl.plugins"]
    m1 = "m1_plugins.verl.register"

It can also be named in `VERL_USE_EXTERNAL_MODULES=m1_plugins.verl.register` or in
`actor_rollout_ref.model.external_lib`, where an import error stops VeRL loudly. Then `rollout.name=m1`
selects the M1 engine: VeRL's worker builds `M1ServerAdapter` through `_ROLLOUT_REGISTRY[("m1", "async")]`
and its LLMServerManager builds `M1Replica` through `RolloutReplicaRegistry` (loaded lazily: the replica
module pulls in Ray actors).

VeRL swallows entry-point import errors at DEBUG level, after which `rollout.name=m1` only fails later
as "Unknown rollout mode: m1". So any failure here is logged at ERROR with its traceback before it
propagates.
"""

import logging

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "m1"
ROLLOUT_ADAPTER = "m1_plugins.verl.rollout.M1ServerAdapter"
_REGISTERED = False


def _load_replica():
    from .server import M1Replica

    return M1Replica


def register() -> None:
    """Fill VeRL's two rollout registries (idempotent). Raises, after logging at ERROR, if it cannot."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        import m1_plugins  # noqa: F401  (registers m1_hybrid with the Auto classes)
        from verl.workers.rollout.base import _ROLLOUT_REGISTRY
        from verl.workers.rollout.replica import RolloutReplicaRegistry

        _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = ROLLOUT_ADAPTER
        RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    except Exception:
        logger.exception("m1_plugins could not register the %r rollout with VeRL; `rollout.name=%s` will be "
                         "unknown to VeRL. Cause:", ROLLOUT_NAME, ROLLOUT_NAME)
        raise
    _REGISTERED = True


register()

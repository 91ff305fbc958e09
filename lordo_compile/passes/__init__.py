"""Graph rewrites, one module each, registered with the manager where they are defined."""

from .manager import (
    INIT,
    Conflict,
    Event,
    PassResult,
    PassRuntime,
    Pipeline,
    Program,
    RegisteredPass,
    RuntimeContext,
    Schedule,
    Snapshot,
    Stage,
    plan_passes,
    register_pass,
    registered_passes,
    released_state,
    replace,
    run_passes,
)
from . import data_parallel, eco, ema_nesterov, fake_quant, gossip, identity, lordo, low_rank, low_rank_ddp, nonfinite, quantized_state, sync  # noqa: E402,F401,I001  (registers the passes, in the policy's order)

__all__ = [
    "INIT",
    "Conflict",
    "Event",
    "PassResult",
    "PassRuntime",
    "Pipeline",
    "Program",
    "RegisteredPass",
    "RuntimeContext",
    "Schedule",
    "Snapshot",
    "Stage",
    "plan_passes",
    "register_pass",
    "registered_passes",
    "released_state",
    "replace",
    "run_passes",
]

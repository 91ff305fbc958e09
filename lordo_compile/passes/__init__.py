"""Graph rewrites, one module each, registered with the manager where they are defined."""

from . import data_parallel, eco, ema_nesterov, fake_quant, gossip, identity, lordo, low_rank, low_rank_ddp, nonfinite, sync  # noqa: F401  (registers the passes)
from .manager import (
    Guard,
    PassResult,
    Program,
    RegisteredPass,
    Rule,
    Schedule,
    Stage,
    plan_passes,
    register_pass,
    registered_passes,
    released_state,
    run_passes,
    Watch,
)

__all__ = [
    "Guard",
    "PassResult",
    "Program",
    "RegisteredPass",
    "Rule",
    "Schedule",
    "Stage",
    "plan_passes",
    "register_pass",
    "registered_passes",
    "released_state",
    "run_passes",
    "Watch",
]

"""Graph rewrites, one module each, registered with the manager where they are defined."""

from . import identity  # noqa: F401  (registers the pass)
from .manager import (
    PassResult,
    Program,
    RegisteredPass,
    Schedule,
    Stage,
    plan_passes,
    register_pass,
    registered_passes,
    run_passes,
)

__all__ = [
    "PassResult",
    "Program",
    "RegisteredPass",
    "Schedule",
    "Stage",
    "plan_passes",
    "register_pass",
    "registered_passes",
    "run_passes",
]

"""Canonical ops a captured training step is written in (see `registry`)."""

from . import eco, ema_nesterov, gossip, lordo, low_rank, moments, optim, quant, rotation, sync  # noqa: F401  (registers the ops)
from .registry import CanonicalOp, all_ops, canonical_op, define_aux_op, define_op, math_for, op_named

__all__ = ["CanonicalOp", "all_ops", "canonical_op", "define_aux_op", "define_op", "math_for", "op_named"]

"""Canonical ops a captured training step is written in (see `registry`)."""

from . import optim  # noqa: F401  (registers the optimizer ops)
from .registry import CanonicalOp, all_ops, canonical_op, op_named

__all__ = ["CanonicalOp", "all_ops", "canonical_op", "op_named"]

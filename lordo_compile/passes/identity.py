"""The identity pass: the captured step, unchanged.

    before:  ... grad = autograd.grad(loss, params); lordo.adamw(p, grad, m, v, ...) ...
    after:   the same graph

It runs when a policy enables no rewrite, so every compiled step goes through the same
pipeline (capture, passes, lowering) and shows the same stages in `step.graphs`.
"""

from __future__ import annotations

from .manager import PassResult, Program, Stage, register_pass


@register_pass("identity", stage=Stage.FORWARD)
def identity(program: Program, option: None) -> PassResult:
    return PassResult(program, ("no change",))

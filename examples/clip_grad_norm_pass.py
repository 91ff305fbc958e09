"""A pass of your own: clip all gradients by their global norm, as a graph rewrite.

    before:  adamw = lordo.adamw(W, grad_W, ...)            (one per parameter)
    after:   norm = global_grad_norm([grad_W, grad_b, ...])
             coefficient = clip_coefficient(norm, max_norm=1.0)
             clipped_grad_W = grad_W * coefficient
             adamw = lordo.adamw(W, clipped_grad_W, ...)

Use it with `lc.Policy(extra_passes=[ClipGradNorm(max_norm=1.0)])`, alone or next to a
library policy. It rewrites the gradient the updates read (`Stage.GRADIENT`), so it runs
after the workers' gradients are combined (DDP's all-reduce) and before any update rule
replaces the updates (GaLore), and the non-finite guard covers what it feeds them. It
computes what `torch.nn.utils.clip_grad_norm_` computes, inside the compiled step.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch

from lordo_compile.graph import PARAM, ROLE, Role, identifier
from lordo_compile.passes import PassResult, Program, Stage, register_pass


@dataclass(frozen=True)
class ClipGradNorm:
    max_norm: float

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"ClipGradNorm.max_norm must be > 0, got {self.max_norm!r}")


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_coefficient(norm: torch.Tensor, *, max_norm: float) -> torch.Tensor:
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


@register_pass("clip_grad_norm", stage=Stage.GRADIENT, option_type=ClipGradNorm)
def clip_grad_norm(program: Program, option: ClipGradNorm) -> PassResult:
    graph = program.graph  # this graph is the pass's own copy: edit it in place
    g = graph.graph
    sites = [site for site in graph.updates() if "lr" in site.op.hyperparameters]
    if sites:
        with g.inserting_before(sites[0].node):
            norm = g.call_function(global_grad_norm, ([site.input("grad") for site in sites],))
            coefficient = g.call_function(clip_coefficient, (norm,), {"max_norm": float(option.max_norm)})
        for node in (norm, coefficient):
            node.meta[ROLE] = Role.OPTIMIZER_UPDATE
        for site in sites:
            grad = site.input("grad")
            with g.inserting_before(site.node):
                clipped = g.create_node("call_function", operator.mul, (grad, coefficient),
                                        name=identifier(f"clipped_grad_{site.param}"))
            clipped.meta.update({ROLE: Role.OPTIMIZER_UPDATE, PARAM: site.param})
            site.node.replace_input_with(grad, clipped)
    # dataclasses.replace keeps every other field of the program (its events, and whatever
    # a later release adds); building a new Program would drop them.
    return PassResult(dataclasses.replace(program, graph=graph), (f"gradients clipped to global norm {option.max_norm}",))

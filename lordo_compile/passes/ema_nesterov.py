"""EMA-Nesterov: the base step taken from a lookahead point along an EMA of parameter updates.

ALGORITHMS.md section 6 (Yau et al., arXiv 2605.25395):

    theta+ = A(theta + beta_t d)          A: the step's own update, whatever earlier passes made it
    d      <- gamma d + (1 - gamma) (theta+ - theta)

    before (every graph):
        linear = torch._C._nn.linear(x, W, b)                                   # forward reads W
        adamw = lordo.adamw(W, grad_W, ...); new_param_W = adamw[0]             # update from W
        write_param_W = W.copy_(new_param_W)
    after:
        ema_nesterov_beta = lordo.ema_nesterov_beta(ema_nesterov_step, beta=..., warmup_steps=..., decay_start=...)
        lookahead_W = aten.addcmul(W, ema_nesterov_direction_W, ema_nesterov_beta)  # theta + beta_t d
        linear = torch._C._nn.linear(x, lookahead_W, b)                         # forward (so the gradient) at it
        adamw = lordo.adamw(lookahead_W, grad_W, ...); new_param_W = adamw[0]   # A from the lookahead point
        new_direction_W = lordo.ema_nesterov_direction(ema_nesterov_direction_W, new_param_W, W, gamma=...)
        ema_nesterov_direction_W.copy_(new_direction_W)                         # before theta is overwritten
        write_param_W = W.copy_(new_param_W)                                    # the stored iterate is theta

The pass rewrites at stage LOOKAHEAD: after the forward, the gradient's combination, the
update rule and any correction of it; before weight storage and sync. Every reader of a
parameter but the writes into it reads the lookahead point: the forward, the update, and
what earlier passes added around the update (CAGE's correction reads it as its weight).
theta+ is what the step writes into theta at this stage, so A includes CAGE's decoupled
correction, and neither a requantization (ECO stores q(theta+) later, d sees theta+) nor a
sync's reset to the anchor is part of d: d stays the EMA of this worker's updates. The
stored parameter stays theta, the iterate without the lookahead: evaluation and
checkpoints see theta, and with beta_t = 0 the step is the base step exactly. d and the
step counter behind beta_t are runtime state (`step.state_dict()`); d is full precision
even where weights are stored quantized (4 bytes per weight).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import ROLE, Role, StateSpec, TrainGraph, tag, writes_into
from ..ops.ema_nesterov import ema_nesterov_beta, ema_nesterov_direction
from .manager import PassResult, Program, Stage, register_pass


@dataclass(frozen=True, kw_only=True)
class EMANesterov:
    """Lookahead along an EMA of parameter updates around the step's optimizer (ALGORITHMS.md 6).

    Args:
      beta: the lookahead step size while the lookahead is on. In a steady direction the
        step grows by 1 / (1 - beta) (for every gamma), so beta is below 1.
      gamma: the EMA decay of d. 0 is the one-step difference d = theta_t - theta_{t-1}:
        Nesterov's lookahead.
      warmup_steps: beta_t = 0 for 0-based steps t < warmup_steps.
      decay_start: beta_t = 0 from this step on (the final decay), or None: never.

    d is updated at every step, also while beta_t = 0: the lookahead starts from a warm
    direction.

    Raises:
      ValueError: for a value out of range, naming the field.
    """

    beta: float = 0.5
    gamma: float = 0.9
    warmup_steps: int = 0
    decay_start: int | None = None

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"EMANesterov.{name} must be a number in [0, 1), got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"EMANesterov.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.decay_start is not None:
            if isinstance(self.decay_start, bool) or not isinstance(self.decay_start, int):
                raise ValueError(f"EMANesterov.decay_start must be an int or None, got {self.decay_start!r}")
            if self.decay_start <= self.warmup_steps:
                raise ValueError(
                    f"EMANesterov.decay_start must be > warmup_steps ({self.warmup_steps}), got "
                    f"{self.decay_start}: the lookahead would never be on. Use decay_start=None for no final decay."
                )


_STEP = StateSpec(name="ema_nesterov.step", shape=(), dtype=torch.int64, owner="ema_nesterov")


def _direction_spec(graph: TrainGraph, param: str) -> StateSpec:
    info = graph.params[param]
    return StateSpec(name=f"ema_nesterov.direction.{param}", shape=info.shape, dtype=info.dtype,
                     owner="ema_nesterov", param=param)


def _schedule(graph: TrainGraph, option: EMANesterov) -> fx.Node:
    """beta_t from the runtime's step counter, and the counter's advance at the step's end."""
    g = graph.graph
    step = graph.add_state(_STEP)
    with g.inserting_after(step):
        beta = tag(g.call_function(ema_nesterov_beta, (step,), {
            "beta": float(option.beta), "warmup_steps": option.warmup_steps,
            "decay_start": -1 if option.decay_start is None else option.decay_start}),
            Role.OPTIMIZER_UPDATE, name="ema_nesterov_beta")
    with g.inserting_after(beta):
        next_step = tag(g.call_function(torch.ops.aten.add.Scalar, (step, 1)), Role.OPTIMIZER_UPDATE,
                        name="next_ema_nesterov_step")
    with g.inserting_before(next(n for n in reversed(g.nodes) if n.op == "output")):
        tag(g.call_method("copy_", (step, next_step)), Role.WRITEBACK, state=_STEP.name,
            name="write_ema_nesterov_step")
    return beta


def _rewrite(graph: TrainGraph, option: EMANesterov) -> list[str]:
    g = graph.graph
    sites = graph.updates()
    beta = _schedule(graph, option)
    directions = {s.param: graph.add_state(_direction_spec(graph, s.param)) for s in sites}
    for site in sites:
        theta, direction = site.input("param"), directions[site.param]
        order = {n: i for i, n in enumerate(g.nodes)}
        writes = sorted((u for u in theta.users if writes_into(u, theta)), key=order.__getitem__)
        # The backward keeps differentiating with respect to theta: through the lookahead
        # point, whose derivative in theta is the identity, that is the gradient at it.
        readers = sorted((u for u in theta.users if u not in writes and u.meta.get(ROLE) != Role.BACKWARD),
                         key=order.__getitem__)
        with g.inserting_before(readers[0]):
            lookahead = tag(g.call_function(torch.ops.aten.addcmul.default, (theta, direction, beta)),
                            Role.FORWARD, site.param, name=f"lookahead_{site.param}")
        for reader in readers:
            reader.replace_input_with(theta, lookahead)
        # theta+ is what the step writes into theta: the update with whatever earlier passes
        # added to it (CAGE's correction).
        update = writes[0]
        with g.inserting_before(update):
            new_direction = tag(g.call_function(ema_nesterov_direction, (direction, update.args[1], theta),
                                                {"gamma": float(option.gamma)}),
                                Role.OPTIMIZER_UPDATE, site.param, name=f"new_direction_{site.param}")
            tag(g.call_method("copy_", (direction, new_direction)), Role.WRITEBACK, site.param,
                _direction_spec(graph, site.param).name, name=f"write_direction_{site.param}")
    return [s.param for s in sites]


@register_pass("ema_nesterov", stage=Stage.LOOKAHEAD, option="ema_nesterov", option_type=EMANesterov)
def ema_nesterov(program: Program, option: EMANesterov) -> PassResult:
    graph = program.graph
    params = _rewrite(graph, option)
    held = sum(spec.nbytes for spec in graph.state.values() if spec.owner == "ema_nesterov")
    end = "the end" if option.decay_start is None else f"step {option.decay_start}"
    summary = (
        (f"lookahead: beta {option.beta} from step {option.warmup_steps} to {end}, gamma {option.gamma}, "
         f"on {len(params)} parameters: {', '.join(params)}"),
        f"state: a direction per parameter, {held:,} bytes",
    )
    return PassResult(program, summary)

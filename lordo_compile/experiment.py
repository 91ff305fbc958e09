"""The tiny-GPT training run the CLI and the benchmarks share.

One function, `train_tiny_gpt`: a seeded model, AdamW with warmup and cosine decay, batches
of CPython's bundled help text (each worker its own, when torch.distributed is initialised),
a compiled step under a policy, and a fixed validation set. It returns what a comparison
needs: losses, per-step times with the graph (set of events) each step ran, and the
compiled step itself (for its memory and graphs). `tiny_gpt_run` builds the run it steps
through, for a loop of its own (timing several runs round robin).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .api import CompiledStep, compile
from .data import ByteBatches
from .models import GPTConfig, TinyGPT
from .ops.eco import quantize as eco_quantize
from .ops.quant import fake_quantize_math
from .policy import Policy
from .testing import training_step


def batch_stream_seed(seed: int, rank: int) -> int:
    """The seed of worker `rank`'s batch order in a run seeded `seed`. Ranks are spaced 2**16
    apart so that runs with different seeds never share a worker's batches (with seed + rank,
    seed 1's worker 0 would read seed 0's worker 1's batches, and paired seeds would not be
    independent draws); rank 0 reads what a single-process run of the same seed reads."""
    return seed + rank * 2 ** 16


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    layers: int = 4
    width: int = 128
    heads: int = 4
    lr: float = 3e-3
    warmup: int = 30
    val_batches: int = 8  # 0: the whole held-out split (`ByteBatches.val_split`)
    seed: int = 0
    compiler: str = "inductor"
    eval_every: int = 0


@dataclass
class RunResult:
    step: CompiledStep
    model: TinyGPT
    train_loss: float
    val_loss: float
    step_seconds: list[float] = field(default_factory=list)
    graphs: list[str] = field(default_factory=list)
    # (step, bytes sent per worker so far, validation loss) every `eval_every` steps.
    curve: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def compile_seconds(self) -> float:
        return self.step_seconds[0]

    def median_ms(self, graph: str = "step") -> float:
        """Median time of the steps (after the first) that ran `graph` ("step": no event)."""
        times = sorted(t for t, p in zip(self.step_seconds[1:], self.graphs[1:]) if p == graph)
        return times[len(times) // 2] * 1e3 if times else float("nan")


@torch.no_grad()
def evaluate(model: TinyGPT, batches: list[tuple[torch.Tensor, torch.Tensor]], step: CompiledStep | None = None
             ) -> float:
    """Mean validation loss of the model as the compiled step's forward computes it."""
    model.eval()
    with as_trained(model, step):
        # Weighted by each batch's tokens: the whole split's last batch is smaller.
        totals = [(float(model.loss(x, y)) * y.numel(), y.numel()) for x, y in batches]
    model.train()
    return sum(t for t, _ in totals) / sum(n for _, n in totals)


@contextlib.contextmanager
def as_trained(model: nn.Module, step: CompiledStep | None):
    """Inside, an eager forward of `model` reads what the compiled step's forward reads:
    quantized weights (and inputs, with activation quantization) under `fake_quant`, the
    quantized copy under ECO's master mode, the stored weights under ECO. Outside, nothing
    has changed."""
    if step is None:
        yield
        return
    with step.materialized(), _quantized_forward(model, step):
        yield


@contextlib.contextmanager
def _quantized_forward(model: nn.Module, step: CompiledStep):
    policy = step.policy
    fake_quant = policy.fake_quant if policy is not None else None
    master = policy.eco if policy is not None and policy.eco is not None and policy.eco.mode == "master" else None
    if fake_quant is None and master is None:
        yield
        return
    names = step.backend.param_names
    if fake_quant is not None:
        exported = step.export_quantized()
        swapped = exported.dequantize()
    else:
        swapped = {names[id(p)]: eco_quantize(p.detach(), **master.quantizer(), rounding="nearest")
                   for p in model.parameters() if id(p) in names and master.choose(_info(step, names[id(p)])) is None}
    saved, hooks = {}, []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        name = names.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if name not in swapped:
            continue
        if name not in saved:  # a tied weight is swapped once
            saved[name] = (weight, weight.detach().clone())
            weight.data.copy_(swapped[name])
        if fake_quant is not None and fake_quant.activation_bits is not None and isinstance(module, nn.Linear):
            kwargs = {**fake_quant.quantizer_kwargs(fake_quant.activation_bits), "group_size": 0, "ste": "identity",
                      "hadamard": exported[name].hadamard}
            hooks.append(module.register_forward_pre_hook(
                lambda _, args, kwargs=kwargs: (fake_quantize_math(args[0], **kwargs),) + args[1:]))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for weight, value in saved.values():
            weight.data.copy_(value)


def _info(step: CompiledStep, name: str):
    return step.backend.captured.params[name]


@dataclass
class TinyGPTRun:
    """A seeded tiny GPT, its AdamW with warmup and cosine decay, this worker's batch stream
    and the compiled step: what `train_tiny_gpt` trains, and what a timing loop steps
    through (several runs in one process, round robin)."""

    config: RunConfig
    model: TinyGPT
    step: CompiledStep
    schedule: torch.optim.lr_scheduler.LRScheduler
    data: ByteBatches
    generator: torch.Generator

    def train_step(self) -> tuple[float, float, str]:
        """One step on the next batch: (loss, seconds the compiled step took, the graph it ran)."""
        x, y = self.data.batch(self.config.batch_size, self.generator)
        index = self.step.backend.runtime.step
        started = time.perf_counter()
        loss = float(self.step(x, y))
        seconds = time.perf_counter() - started
        self.schedule.step()
        return loss, seconds, self.step.backend.schedule.name_at(index)


def tiny_gpt_run(policy: Policy, config: RunConfig = RunConfig()) -> TinyGPTRun:
    torch.manual_seed(config.seed)
    cfg = GPTConfig(block_size=config.seq_len, n_layer=config.layers, d_model=config.width, n_head=config.heads)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / config.warmup)
        return warm * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    # Same model on every worker (same seed), different data on each.
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    generator = torch.Generator().manual_seed(batch_stream_seed(config.seed, rank))
    step = compile(training_step(model.loss, opt), policy, compiler=config.compiler)
    return TinyGPTRun(config, model, step, schedule, ByteBatches(block_size=config.seq_len), generator)


def train_tiny_gpt(policy: Policy, config: RunConfig = RunConfig(), log: Callable[[str], None] | None = None,
                   on_step: Callable[[int, float, CompiledStep], None] | None = None) -> RunResult:
    """Train and evaluate; `log` gets a line every 1/16 of the run, `on_step(i, loss, step)`
    is called after every step (a progress bar)."""
    run = tiny_gpt_run(policy, config)
    step = run.step
    val_batches = run.data.val_batches(config.batch_size, config.val_batches) if config.val_batches else \
        run.data.val_split(config.batch_size)
    result = RunResult(step, run.model, float("nan"), float("nan"))
    for i in range(config.steps):
        loss, seconds, graph = run.train_step()
        result.step_seconds.append(seconds)
        result.graphs.append(graph)
        result.train_loss = loss
        if config.eval_every and ((i + 1) % config.eval_every == 0 or i == 0):
            result.curve.append((i + 1, step.comm_report().bytes_sent, evaluate(run.model, val_batches, step)))
        if log is not None:
            log_step(log, i, loss, seconds, run.schedule.get_last_lr()[0], config)
        if on_step is not None:
            on_step(i, loss, step)
    result.val_loss = result.curve[-1][2] if result.curve and result.curve[-1][0] == config.steps else \
        evaluate(run.model, val_batches, step)
    return result


def log_step(log: Callable[[str], None], i: int, loss: float, seconds: float, lr: float, config: RunConfig) -> None:
    if i == 0:
        log(f"step    1  loss {loss:.3f}  (capture + compile {seconds:.1f} s)")
    elif (i + 1) % max(1, config.steps // 16) == 0 or i + 1 == config.steps:
        log(f"step {i + 1:4d}  loss {loss:.3f}  lr {lr:.2e}")

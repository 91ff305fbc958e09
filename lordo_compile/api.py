"""`compile`, `backend`, `prepare`: the three ways in, and the compiled step they return.

    capture (dynamo + roles) -> passes (policy) -> lowering -> compiler -> runtime

`LordoBackend` is the dynamo backend that runs that pipeline on each graph dynamo
captures; `CompiledStep` wraps a user's step with it, captured as one graph.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import time
import types
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map_only

from . import logs
from . import passes as _passes  # noqa: F401  (registers every pass)
from .capture.discover import Names, find_optimizers, optimizers_in_frame
from .capture.optim import SUPPORTED_OPTIMIZERS, OptimizerAdapter, prepare, prepared_adapters, supported_names
from .capture.roles import InputCatalog, build_train_graph
from .errors import CaptureError
from .graph import ROLE, ParamInfo, Role
from .inspect import GraphView, PhaseGraphs, describe_stage_change, role_counts, update_counts
from .lowering import COMPILERS, compile_phase, lower
from .ops.eco import decode_math
from .ops.quant import QuantizedModel
from .ops.quant import export as quantize_for_export
from .passes import Program, Schedule, Stage, released_state, run_passes
from .passes.collectives import world_size
from .policy import Policy
from .runtime.executor import CompiledPhase, OptimizerChanged, StepExecutor
from .runtime.comm import CommReport, collectives_in
from .runtime.memory import MemoryReport, memory_report
from .runtime.state import RuntimeState


def _enable_capture_config() -> None:
    # Dynamo traces loss.backward() into the graph only with this flag (torch >= 2.9).
    torch._dynamo.config.trace_autograd_ops = True


class LordoBackend:
    """A dynamo backend that captures, rewrites and compiles a training step.

    Use through `lordo_compile.backend(policy)` or `lordo_compile.compile(step, policy)`.
    After the first call, `graphs`, `explain()` and `state_dict()` describe the step.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        compiler: str = "inductor",
        names: Names | None = None,
        arg_names: Sequence[str] = (),
        adapters: Sequence[OptimizerAdapter] | None = None,
        deterministic: bool = True,
    ) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a lordo_compile.Policy, got {type(policy).__name__}")
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        self.policy = policy
        self.compiler = compiler
        self.deterministic = _checked_deterministic(deterministic)
        self.names = names or Names()
        self.arg_names = list(arg_names)
        self._adapters = list(adapters) if adapters is not None else None
        self.runtime = RuntimeState()
        self.graphs: dict[str, PhaseGraphs] = {}
        self.stages: list[Stage] = []
        self.captures = 0
        self.timings: dict[str, float] = {}
        self.param_names: dict[int, str] = {}
        self.adapters: list[OptimizerAdapter] = []
        self.executor: StepExecutor | None = None

    @property
    def schedule(self) -> Schedule:
        """Which phase runs at which step (known once the step has been captured)."""
        if not self.stages:
            raise RuntimeError("nothing captured yet; call the step once")
        return self.stages[-1].program.schedule

    def adapters_for(self, example_inputs: Sequence) -> list[OptimizerAdapter]:
        ids = {id(t) for t in example_inputs}
        candidates = self._adapters if self._adapters is not None else prepared_adapters()
        return [a for a in candidates if any(id(p) in ids for p in a.parameters())]

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        started = time.perf_counter()
        self.timings["backend_entered"] = started
        adapters = self.adapters = self.adapters_for(example_inputs)
        catalog = InputCatalog.build(self.names, self.arg_names, adapters)
        captured = build_train_graph(gm, list(example_inputs), catalog)
        captured.recompile()
        self.stages = run_passes(Program({"step": captured}), self.policy)
        final = self.stages[-1].program
        params = {
            node.meta["lordo_param"]: example_inputs[node.meta["lordo_input"][1]]
            for graph in final.phases.values()
            for node in graph.placeholders()
            if node.meta.get(ROLE) == Role.PARAMETER
        }
        communicates = any(collectives_in(graph) for graph in final.phases.values())
        self.runtime.world_size = world_size(None) if communicates else None
        self.runtime.allocate(final.state(), params)
        self.param_names = {id(tensor): name for name, tensor in params.items()}
        self.timings["capture_and_passes_s"] = time.perf_counter() - started
        self.graphs = {}
        compiled = {}
        started = time.perf_counter()
        for phase, graph in final.phases.items():
            views = self._stage_views(phase)
            lowered = lower(graph)
            views.add(GraphView(phase, "lowered", lowered))
            state_names = list(graph.state)
            inputs = list(example_inputs) + _static(self.runtime.inputs(state_names))
            fn = compile_phase(
                lowered, inputs, self.compiler, lambda aten, v=views, p=phase: v.add(GraphView(p, "aten", aten)),
                deterministic=self.deterministic,
            )
            compiled[phase] = CompiledPhase(fn, state_names, len(collectives_in(graph)))
            self.graphs[phase] = views
        self.timings["codegen_s"] = time.perf_counter() - started
        self.captures += 1
        self._log_capture()
        self.executor = StepExecutor(compiled, final.schedule, self.runtime, adapters, final.watches,
                                     tuple(params[name] for name in final.stored), final.guards,
                                     deterministic=self.deterministic)
        return self.executor

    def _log_capture(self) -> None:
        channels = logs.enabled()
        if "passes" in channels:
            logs.emit("passes", self.explain())
        if "graphs" in channels:
            for views in self.graphs.values():
                final = [view for name, view in views.items() if name not in ("lowered", "aten")][-1]
                logs.emit("graphs", final.text)
        if "comm" in channels:
            logs.emit("comm", str(self.comm_report()))
        if self.executor is not None:
            self.executor.log_comm = "comm" in channels

    @property
    def _known_adapters(self) -> list[OptimizerAdapter]:
        """The optimizers given or found up front, else those the last capture used."""
        return self._adapters if self._adapters is not None else self.adapters

    def _stage_views(self, phase: str) -> PhaseGraphs:
        views = PhaseGraphs(phase)
        for stage in self.stages:
            source = stage.program.phases.get(phase)
            if source is None and stage is self.stages[0]:
                # Every phase derives from the one captured step: show that as its start.
                source = stage.program.phases["step"]
            if source is not None:
                views.add(GraphView(phase, stage.name, source.module, source))
        return views

    def explain(self) -> str:
        """Per phase: what was captured, what each pass changed, what state it added."""
        if not self.stages:
            return "lordo_compile: nothing captured yet; call the step once."
        lines = [
            f"lordo_compile: {self.policy.describe()}, compiler={self.compiler}",
            f"captures: {self.captures} (recompiles: {self.captures - 1})",
        ]
        final = self.stages[-1].program
        for phase, graph in final.phases.items():
            lines.append(f'phase "{phase}"')
            captured = self.stages[0].program.phases.get(phase)
            if captured is not None:
                roles = role_counts(captured)
                updates = ", ".join(f"{n}x {k}" for k, n in sorted(update_counts(captured).items()))
                lines.append(
                    f"  captured: {len(captured.graph.nodes)} nodes, {roles[str(Role.PARAMETER)]} "
                    f"parameters, updates: {updates or 'none'}, "
                    f"{roles[str(Role.COLLECTIVE)]} collective nodes"
                )
            for previous, stage in zip(self.stages, self.stages[1:]):
                if phase not in stage.program.phases:
                    continue
                change = describe_stage_change(previous.program.phases.get(phase), stage.program.phases[phase])
                lines.append(f"  {stage.name}: {change[0]}")
                lines += [f"    {line}" for line in change[1:]]
            lowered = sum(1 for _ in graph.updates())
            lines.append(f"  lowered: {lowered} canonical updates replaced by their aten math")
        for stage in self.stages[1:]:
            lines.append(f"pass {stage.name}:")
            lines += [f"  {note}" for note in stage.summary]
        specs = final.state()
        total = sum(spec.nbytes for spec in specs.values())
        lines.append(f"state added by passes: {len(specs)} tensors, {total:,} bytes")
        report = self.memory_report()
        lines.append(
            f"memory: weights {report.weight_bytes:,} B, gradients {report.gradient_bytes:,} B, optimizer state "
            f"{report.state_bytes_before:,} B before the policy, {report.state_bytes_after:,} B after"
        )
        return "\n".join(lines)

    def comm_report(self) -> CommReport:
        """Collectives issued so far: count and bytes sent per worker, per phase and per step."""
        phases = self.stages[-1].program.phases if self.stages else {}
        return CommReport({name: collectives_in(graph) for name, graph in phases.items()},
                          dict(self.runtime.phase_calls), self.runtime.step)

    def memory_report(self) -> MemoryReport:
        """Bytes of weights, gradients and optimizer state per parameter, before and after the policy."""
        return memory_report(self._known_adapters, self.runtime, self.param_names)

    @contextlib.contextmanager
    def materialized(self):
        """Inside, every parameter a pass stores in another form (ECO's codes) holds its value
        in full precision, for an eager forward or `model.state_dict()`; outside, it is freed again."""
        stored = self.executor.stored if self.executor is not None else None
        if stored is None or not stored.tensors:
            yield
            return
        option = self.policy.quantized_weights
        with stored.allocated(), torch.no_grad():
            for tensor in stored.tensors:
                name = self.param_names[id(tensor)]
                codes, scales = self.runtime.tensors[f"eco.codes.{name}"], self.runtime.tensors[f"eco.scales.{name}"]
                tensor.copy_(decode_math(codes, scales, format=option.format, group_size=option.group_size))
            yield

    def export_quantized(self) -> QuantizedModel:
        """The weights the policy's `fake_quant` quantizes, as integer codes and scales.

        They are the current weights, quantized as the compiled forward quantizes them (each
        in the basis its layer's current rotation choice says), so `dequantize()` gives
        exactly the weights the next forward multiplies by.
        """
        option = self.policy.fake_quant
        if option is None:
            raise ValueError("export_quantized() needs a policy with fake_quant (Policy.cage or Policy(fake_quant=...))")
        if not self.stages:
            raise RuntimeError("nothing captured yet; call the step once")
        infos = self.stages[0].program.phases["step"].params
        tensors = {name: p for adapter in self._known_adapters for p in adapter.parameters()
                   if (name := self.param_names.get(id(p))) is not None}
        return QuantizedModel({
            name: quantize_for_export(tensors[name].detach(), bits=option.bits, quantizer=option.quantizer,
                                      group_size=option.group_size,
                                      hadamard=option.rotates(name, self.runtime.tensors))
            for name, info in infos.items() if name in tensors and option.choose(info) is None
        })

    def state_dict(self) -> dict:
        """What the compiled step adds to the model's and optimizers' own state dicts."""
        return {"runtime": self.runtime.state_dict(), "optimizers": [a.state_dict() for a in self._known_adapters]}

    def load_state_dict(self, state: dict) -> None:
        self.runtime.load_state_dict(state["runtime"])
        for adapter, adapter_state in zip(self._known_adapters, state["optimizers"]):
            adapter.load_state_dict(adapter_state)


def _static(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Runtime state as fake tensors of fixed shape, for AOTAutograd to trace with.

    Handed real, AOTAutograd would give them symbolic sizes in dynamo's shape environment
    without a source, and dynamo then fails building guards on them.
    """
    context = torch._guards.TracingContext.try_get()
    if context is None or context.fake_mode is None:
        return tensors
    return [context.fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def _detach(out):
    return tree_map_only(torch.Tensor, torch.Tensor.detach, out)


def _entry_for(step: Callable) -> Callable:
    """A fresh function (own code object, so own dynamo cache) that detaches outputs.

    Users return `loss`, whose graph `backward` consumed; dynamo refuses to return it,
    so the compiled step returns it detached, as eager code would use it.
    """

    def entry(*args, **kwargs):
        return _detach(step(*args, **kwargs))

    code = entry.__code__.replace(co_name=f"lordo_{getattr(step, '__name__', 'step')}")
    return types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)


class CompiledStep:
    """A training step captured as one graph per phase, rewritten by a policy, compiled.

    Call it like the original step. `graphs[phase][stage]` holds every stage of every
    phase; `explain()` says what each pass did; `state_dict()` holds what passes added.
    """

    def __init__(
        self,
        step: Callable,
        policy: Policy,
        *,
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
        compiler: str = "inductor",
        deterministic: bool = True,
    ) -> None:
        if not callable(step):
            raise TypeError(f"compile() takes the training step function, got {type(step).__name__}")
        found = list(optimizers) if optimizers is not None else find_optimizers(step, SUPPORTED_OPTIMIZERS)
        if not found:
            raise ValueError(
                f"found no torch.optim optimizer in the closure, globals or self of {step!r}; "
                "pass it explicitly: lordo_compile.compile(step, policy, optimizers=[opt])"
            )
        self.step = step
        self.adapters = prepare(*found)
        names = Names.of_step(step)
        release_state(policy, self.adapters, names)
        try:
            arg_names = [
                p.name for p in inspect.signature(step).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            arg_names = []
        self.backend = LordoBackend(
            policy, compiler=compiler, names=names, arg_names=arg_names, adapters=self.adapters,
            deterministic=deterministic,
        )
        self._compiled = torch.compile(_entry_for(step), backend=self.backend, fullgraph=True)

    @property
    def policy(self) -> Policy:
        return self.backend.policy

    @property
    def graphs(self) -> dict[str, PhaseGraphs]:
        return self.backend.graphs

    @property
    def captures(self) -> int:
        return self.backend.captures

    def explain(self) -> str:
        return self.backend.explain()

    def memory_report(self) -> MemoryReport:
        return self.backend.memory_report()

    def comm_report(self) -> CommReport:
        return self.backend.comm_report()

    def export_quantized(self) -> QuantizedModel:
        return self.backend.export_quantized()

    def materialized(self):
        """A context in which weights held in another form (ECO) are readable: see LordoBackend."""
        return self.backend.materialized()

    def state_dict(self) -> dict:
        return self.backend.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.backend.load_state_dict(state)

    def __call__(self, *args, **kwargs):
        _enable_capture_config()
        try:
            return self._compiled(*args, **kwargs)
        except OptimizerChanged:
            for adapter in self.adapters:
                adapter.replan()
            return self._compiled(*args, **kwargs)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
            raise _capture_error(error) from None
        except torch._dynamo.exc.BackendCompilerFailed as error:
            if isinstance(error.inner_exception, (ValueError, NotImplementedError)):
                raise error.inner_exception.with_traceback(None) from None
            raise


def _capture_error(error: Exception) -> CaptureError:
    """Dynamo's refusal, restated: where in the user's code, why, and what to do."""
    text = str(error)
    frames = [
        (f.filename, f.lineno, (f.line or "").strip())
        for f in (getattr(error, "real_stack", None) or [])
    ] or [
        (path, int(line), code.strip())
        for path, line, code in re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', text)
    ]
    frames = [f for f in frames if "/lordo_compile/" not in f[0]]
    user = [f for f in frames if "/torch/" not in f[0]]
    where = f"{user[-1][0]}:{user[-1][1]} (`{user[-1][2]}`)" if user else "an unknown line"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = getattr(error, "gb_type", None) or (lines[0] if lines else type(error).__name__)
    detail = lines[1] if len(lines) > 1 and lines[1].startswith("Explanation") else ""
    hint = ""
    if any("/torch/optim/" in f[0] for f in frames):
        hint = (
            f" The graph break is inside torch.optim: lordo_compile captures {supported_names()}, "
            "and only optimizers it found or was given (lordo_compile.compile(..., optimizers=[opt]))."
        )
    return CaptureError(
        f"lordo_compile cannot capture the step as one graph: {reason} at {where}. {detail} "
        f"Move that code out of the step (or make it traceable) and compile again.{hint}"
    )


def compile(
    step: Callable,
    policy: Policy | None = None,
    *,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    compiler: str = "inductor",
    deterministic: bool = True,
) -> CompiledStep:
    """Capture `step` (forward, backward, optimizer step) as one graph and compile it.

    Args:
      step: an ordinary training step; it may return the loss as is.
      policy: the rewrites to apply; `Policy()` (the default) compiles the step unchanged.
      optimizers: the optimizers the step uses; found in its closure/globals when omitted.
      compiler: "inductor" (default), "aot_eager" (no code generation), or "eager" (run
        the rewritten graph directly).
      deterministic: compile and run with `torch.use_deterministic_algorithms(True)`, so two
        runs with the same seed, inputs and thread count give bit-identical results. False
        lets Inductor use atomic scatter-adds (an embedding's backward), which are faster
        with several threads and round differently from run to run.
    """
    return CompiledStep(step, policy if policy is not None else Policy(), optimizers=optimizers, compiler=compiler,
                        deterministic=deterministic)


def backend(
    policy: Policy | None = None,
    *,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    compiler: str = "inductor",
    deterministic: bool = True,
) -> LordoBackend:
    """A backend for `torch.compile(step, backend=..., fullgraph=True)`.

    Prepares `optimizers`, or else every optimizer among the caller's locals and globals,
    and turns on `torch._dynamo.config.trace_autograd_ops` (needed to capture backward).
    The step must return `loss.detach()`: dynamo refuses to return a tensor whose graph
    backward consumed (`lordo_compile.compile` handles that for you).
    """
    _enable_capture_config()
    caller = sys._getframe(1)
    if optimizers is None:
        optimizers = optimizers_in_frame(caller)
    policy = policy if policy is not None else Policy()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a lordo_compile.Policy, got {type(policy).__name__}")
    adapters = prepare(*optimizers)
    names = Names.of_frame(caller)
    release_state(policy, adapters, names)
    return LordoBackend(policy, compiler=compiler, names=names, adapters=adapters, deterministic=deterministic)


def _checked_deterministic(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"deterministic must be True or False, got {value!r}")
    return value


def release_state(policy: Policy, adapters: Sequence[OptimizerAdapter], names: Names) -> None:
    """Before capture, free the optimizer state the policy's passes will hold themselves."""
    for adapter in adapters:
        for g, plan in enumerate(adapter.groups):
            for i, p in enumerate(plan.params):
                name = names.params.get(id(p)) or f"{type(adapter.optimizer).__name__}.param_groups[{g}][{i}]"
                info = ParamInfo(name, tuple(p.shape), p.dtype, names.module_types.get(id(p)))
                for key, owner in released_state(policy, info, plan.op.name).items():
                    adapter.release(p, key, owner)


def dynamo_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None) -> Callable:
    """The `backend="lordo"` entry point: `options={"policy": ..., "compiler": ..., "deterministic": ...}`.

    Optimizers must be prepared before the first call (`lordo_compile.prepare(opt)`).
    """
    options = dict(options or {})
    policy = options.pop("policy", None) or Policy()
    compiler = options.pop("compiler", "inductor")
    deterministic = options.pop("deterministic", True)
    if options:
        raise ValueError(f"unknown lordo backend options {sorted(options)}; known: policy, compiler, deterministic")
    return LordoBackend(policy, compiler=compiler, deterministic=deterministic)(gm, example_inputs)

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
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.optim.lr_scheduler import LRScheduler
from torch.utils._pytree import tree_map_only

from . import logs
from . import passes as _passes  # noqa: F401  (registers every pass)
from .capture import logging_calls, schedulers
from .capture.discover import Names, find_optimizers, find_schedulers, in_frame
from .capture.optim import SUPPORTED_OPTIMIZERS, OptimizerAdapter, prepare, prepared_adapters, supported_names
from .capture.roles import InputCatalog, build_train_graph
from .distributed import check_workers, world_size
from .errors import CaptureError
from .graph import ROLE, ParamInfo, Role, TrainGraph
from .inspect import GraphView, GraphStages, describe_stage_change, role_counts, update_counts
from .lowering import COMPILERS, checked_mode, compile_phase, lower, require_deterministic_cublas, uses_cuda_graphs
from .passes import Pipeline, RuntimeContext, Schedule, Stage, asked_lowerings, released_state, run_passes
from .policy import Policy
from .runtime.comm import CommReport, collectives_in
from .runtime.executor import CompiledGraph, OptimizerChanged, StepExecutor
from .runtime.memory import MemoryReport, memory_report
from .runtime.state import RuntimeState


def _enable_capture_config() -> None:
    # Dynamo traces loss.backward() into the graph only with this flag (torch >= 2.9).
    torch._dynamo.config.trace_autograd_ops = True


class LordoBackend:
    """A dynamo backend that captures, rewrites and compiles a training step.

    Use through `lordo_compile.backend(policy)` or `lordo_compile.compile(step, policy)`.
    After the first call, `graphs`, `explain()` and `state_dict()` describe the step.

    The step is rewritten, at capture, for every set of events a step can carry (none for
    an ordinary step, or any combination of the events the passes declare); each such graph is
    compiled the first time a step carries its events and reused after
    (`docs/events.md` says why, with measurements).
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
        mode: str | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a lordo_compile.Policy, got {type(policy).__name__}")
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        self.policy = policy
        self.compiler = compiler
        self.mode = checked_mode(mode, compiler)
        self.deterministic = _checked_deterministic(deterministic)
        self.names = names or Names()
        self.arg_names = list(arg_names)
        self._adapters = list(adapters) if adapters is not None else None
        self.runtime = RuntimeState()
        self.graphs: dict[str, GraphStages] = {}
        self.pipeline: Pipeline | None = None
        self.pass_runtimes: list = []
        self.captures = 0
        self.timings: dict[str, float] = {}
        self.param_names: dict[int, str] = {}
        self.adapters: list[OptimizerAdapter] = []
        self.executor: StepExecutor | None = None
        self.logging_calls: list[logging_calls.LoggingCall] = []
        self.after_call: list[Callable[[], None]] = []
        self._passes_state: dict = {}

    @property
    def schedule(self) -> Schedule:
        """Which events fall on which step (known once the step has been captured)."""
        if self.pipeline is None:
            raise RuntimeError("nothing captured yet; call the step once")
        return self.pipeline.schedule

    @property
    def captured(self) -> TrainGraph:
        """The step as captured, before any pass."""
        if self.pipeline is None:
            raise RuntimeError("nothing captured yet; call the step once")
        return next(iter(self.pipeline.graphs.values()))[0].program.graph

    def adapters_for(self, example_inputs: Sequence) -> list[OptimizerAdapter]:
        ids = {id(t) for t in example_inputs}
        candidates = self._adapters if self._adapters is not None else prepared_adapters()
        return [a for a in candidates if any(id(p) in ids for p in a.parameters())]

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        started = time.perf_counter()
        self.timings["backend_entered"] = started
        adapters = self.adapters = self.adapters_for(example_inputs)
        self.logging_calls = logging_calls.take_recorded(gm.graph)
        self.after_call = schedulers.take_recorded(gm.graph)
        catalog = InputCatalog.build(self.names, self.arg_names, adapters)
        captured = build_train_graph(gm, list(example_inputs), catalog)
        captured.lint()
        if self.deterministic:
            note = require_deterministic_cublas(captured.device)
            if note is not None:
                warnings.warn(note, UserWarning, stacklevel=2)
        pipeline = self.pipeline = run_passes(captured, self.policy)
        final = pipeline.final()
        check_workers([registered.name for registered, _ in pipeline.plan
                       if {registered.stage, *(stage for stage, _ in registered.also)} & {Stage.COMBINE, Stage.SYNC}])
        params = {
            node.meta["lordo_param"]: example_inputs[node.meta["lordo_input"][1]]
            for node in captured.placeholders()
            if node.meta.get(ROLE) == Role.PARAMETER
        }
        self.param_names = {id(tensor): name for name, tensor in params.items()}
        self.pass_runtimes = [
            registered.runtime(option, RuntimeContext(self.runtime, params, final, registered.name))
            for registered, option in pipeline.plan if registered.runtime is not None
        ]
        communicates = any(collectives_in(graph, self.pass_runtimes) for graph in final.values())
        self.runtime.world_size = world_size(None) if communicates else None
        self.runtime.allocate(pipeline.state(), params,
                              lambda fresh: [hook.setup(fresh) for hook in self.pass_runtimes], device=captured.device)
        self._load_passes_state()
        self.timings["capture_and_passes_s"] = time.perf_counter() - started
        self.timings["codegen_s"] = 0.0
        self.graphs = {}
        symbolic = any(_is_symbolic(value) for value in example_inputs)
        compiled = {}
        for name, graph in final.items():
            views = self._stage_views(name)
            lowered = lower(graph)
            views.add(GraphView(name, "lowered", lowered))
            self.graphs[name] = views
            state_names = list(graph.state)
            in_graph = sum(c.in_graph for c in collectives_in(graph, self.pass_runtimes))
            lowerings = asked_lowerings(self.pass_runtimes, graph)
            entry = CompiledGraph(name, state_names, in_graph,
                                  self._builder(lowered, views, state_names, lowerings))
            if symbolic:
                # Symbolic sizes live in dynamo's shape environment, which exists only now.
                entry.fn = entry.build(tuple(example_inputs), _static(self.runtime.inputs(state_names)))
            compiled[graph.events] = entry
        self.captures += 1
        self._log_capture()
        self.executor = StepExecutor(compiled, pipeline.schedule, self.runtime, adapters, self.pass_runtimes,
                                     deterministic=self.deterministic, after_call=self.after_call,
                                     cuda_graphs=self.compiler == "inductor" and uses_cuda_graphs(self.mode, captured.device))
        self.executor.log_comm = "comm" in logs.enabled()
        return self.executor

    def _builder(self, lowered: fx.GraphModule, views: GraphStages, state_names: list[str],
                 lowerings: list) -> Callable:
        def build(args: tuple, state: list | None = None) -> Callable:
            started = time.perf_counter()
            inputs = list(args) + (state if state is not None else self.runtime.inputs(state_names))
            fn = compile_phase(lowered, inputs, self.compiler,
                               lambda aten: views.add(GraphView(views.events, "aten", aten)),
                               deterministic=self.deterministic, mode=self.mode, lowerings=lowerings)
            self.timings["codegen_s"] = self.timings.get("codegen_s", 0.0) + time.perf_counter() - started
            return fn

        return build

    def _log_capture(self) -> None:
        channels = logs.enabled()
        if "passes" in channels:
            logs.emit("passes", self.explain())
        if "graphs" in channels:
            for call in self.logging_calls:
                logs.emit("graphs", call.note())
            for views in self.graphs.values():
                final = [view for name, view in views.items() if name not in ("lowered", "aten")][-1]
                logs.emit("graphs", final.text)
        if "comm" in channels:
            logs.emit("comm", str(self.comm_report()))

    @property
    def _known_adapters(self) -> list[OptimizerAdapter]:
        """The optimizers given or found up front, else those the last capture used."""
        return self._adapters if self._adapters is not None else self.adapters

    def _stage_views(self, name: str) -> GraphStages:
        views = GraphStages(name)
        for snapshot in self.pipeline.graphs[name]:
            graph = snapshot.program.graph
            views.add(GraphView(name, snapshot.name, None, graph))
        return views

    def explain(self) -> str:
        """Per set of events: what was captured, what each pass changed, what state it added."""
        if self.pipeline is None:
            return "lordo_compile: nothing captured yet; call the step once."
        lines = [
            f"lordo_compile: {self.policy.describe()}, compiler={self.compiler}",
            f"captures: {self.captures} (recompiles: {self.captures - 1})",
        ]
        if self.pipeline.schedule.events:
            lines.append("events: " + ", ".join(
                f"{e.name} (step {e.first}" + (f", then every {e.every})" if e.every else " only)")
                for e in self.pipeline.schedule.events))
        captured = self.captured
        roles = role_counts(captured)
        updates = ", ".join(f"{n}x {k}" for k, n in sorted(update_counts(captured).items()))
        lines.append(
            f"captured: {len(captured.graph.nodes)} nodes, {roles[str(Role.PARAMETER)]} parameters, "
            f"updates: {updates or 'none'}, {roles[str(Role.COLLECTIVE)]} collective nodes"
        )
        if self.after_call:
            calls = ", ".join(f"{call.func.__qualname__}()" for call in self.after_call)
            lines.append(f"after each call, eagerly: {calls}")
        if self.logging_calls:
            ran = sum(call.ran for call in self.logging_calls)
            lines.append(f"logging calls in the step: {ran} ran once at capture, {len(self.logging_calls) - ran} "
                         "dropped (LORDO_LOGS=graphs names them)")
        for name, snapshots in self.pipeline.graphs.items():
            lines.append(f'graph "{name}"')
            for previous, snapshot in zip(snapshots, snapshots[1:]):
                change = describe_stage_change(previous.program.graph, snapshot.program.graph)
                lines.append(f"  {snapshot.name}: {change[0]}")
                lines += [f"    {line}" for line in change[1:]]
            lowered = sum(1 for _ in snapshots[-1].program.graph.updates())
            lines.append(f"  lowered: {lowered} canonical updates replaced by their aten math")
        hooks = {hook.context.owner: hook for hook in self.pass_runtimes}
        for registered, _ in self.pipeline.plan:
            stages = ", ".join(stage.name.lower() for stage, _, _ in registered.rewrites())
            lines.append(f"pass {registered.name}: rewrites {stages}")
            lines += [f"  {note}" for note in self.pipeline.summaries.get(registered.name, ())]
            if registered.name in hooks:
                lines += [f"  {line}" for line in hooks[registered.name].describe()]
        specs = self.pipeline.state()
        total = sum(spec.nbytes for spec in specs.values())
        lines.append(f"state added by passes: {len(specs)} tensors, {total:,} bytes")
        report = self.memory_report()
        lines.append(
            f"memory: weights {report.weight_bytes:,} B, gradients {report.gradient_bytes:,} B, optimizer state "
            f"{report.state_bytes_before:,} B before the policy, {report.state_bytes_after:,} B after"
        )
        return "\n".join(lines)

    def comm_report(self) -> CommReport:
        """Collectives issued so far: count and bytes sent per worker, per graph and per step."""
        graphs = self.pipeline.final() if self.pipeline is not None else {}
        return CommReport({name: collectives_in(graph, self.pass_runtimes) for name, graph in graphs.items()},
                          dict(self.runtime.calls), self.runtime.step)

    def memory_report(self) -> MemoryReport:
        """Bytes of weights, gradients and optimizer state per parameter, before and after the policy."""
        return memory_report(self._known_adapters, self.runtime, self.param_names)

    @contextlib.contextmanager
    def materialized(self):
        """Inside, every parameter a pass holds in another form is readable in full precision
        (for an eager forward or `model.state_dict()`); outside, it is held as before."""
        # no_grad outermost: the hooks' own contexts then restore grad mode inside it.
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for hook in self.pass_runtimes:
                context = hook.materialized()
                if context is not None:
                    stack.enter_context(context)
            yield

    def export_quantized(self) -> Any:
        """The weights the policy's forward reads quantized, as integer codes and scales (a
        `QuantizedModel`).

        They are the current weights, quantized as the compiled forward quantizes them, so
        `dequantize()` gives exactly the weights the next forward multiplies by.
        """
        if self.pipeline is None:
            raise RuntimeError("nothing captured yet; call the step once")
        for hook in self.pass_runtimes:
            exported = hook.export_quantized()
            if exported is not None:
                return exported
        raise ValueError("export_quantized() needs a policy whose forward reads quantized weights; none of "
                         f"the passes of {self.policy.describe()} quantizes the forward")

    def state_dict(self) -> dict:
        """What the compiled step adds to the model's and optimizers' own state dicts."""
        for hook in self.pass_runtimes:
            hook.settle()
        return {"runtime": self.runtime.state_dict(), "optimizers": [a.state_dict() for a in self._known_adapters],
                "passes": {hook.context.owner: hook.state_dict() for hook in self.pass_runtimes}}

    def load_state_dict(self, state: dict) -> None:
        for hook in self.pass_runtimes:
            hook.settle()
        self.runtime.load_state_dict(state["runtime"])
        for adapter, adapter_state in zip(self._known_adapters, state["optimizers"]):
            adapter.load_state_dict(adapter_state)
        # Before the first call the pass runtimes do not exist yet: they load it when created.
        self._passes_state = state.get("passes", {})
        if self.pass_runtimes:
            self._load_passes_state()

    def _load_passes_state(self) -> None:
        for hook in self.pass_runtimes:
            hook.load_state_dict(self._passes_state.get(hook.context.owner, {}))
        self._passes_state = {}


def _is_symbolic(value: Any) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(not isinstance(size, int) for size in value.shape)


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
        mode: str | None = None,
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
        schedulers.defer(*find_schedulers(step))
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
            deterministic=deterministic, mode=mode,
        )
        self._compiled = torch.compile(_entry_for(step), backend=self.backend, fullgraph=True)

    @property
    def policy(self) -> Policy:
        return self.backend.policy

    @property
    def graphs(self) -> dict[str, GraphStages]:
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

    def export_quantized(self) -> Any:
        return self.backend.export_quantized()

    def materialized(self):
        """A context in which weights held in another form are readable: see LordoBackend."""
        return self.backend.materialized()

    def state_dict(self) -> dict:
        return self.backend.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.backend.load_state_dict(state)

    def __call__(self, *args, **kwargs):
        _enable_capture_config()
        schedulers.defer(*(a for a in (*args, *kwargs.values()) if isinstance(a, LRScheduler)))
        with logging_calls.capturing():
            return self._call(*args, **kwargs)

    def _call(self, *args, **kwargs):
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
    if isinstance(error, schedulers.SchedulerStepError):
        return CaptureError(f"lordo_compile cannot capture the step at {where}: {error.reason}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = getattr(error, "gb_type", None) or (lines[0] if lines else type(error).__name__)
    detail = lines[1] if len(lines) > 1 and lines[1].startswith("Explanation") else ""
    hint = ""
    if "LRScheduler.step" in text:
        hint = (
            " lordo_compile runs scheduler.step() after the compiled call for the schedulers the step reaches "
            "through its closure, globals, self or arguments when it is compiled; create this one before "
            "lordo_compile.compile(), or step it after the call."
        )
    elif any("/torch/optim/" in f[0] for f in frames):
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
    mode: str | None = None,
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
        with several threads and round differently from run to run. On a CUDA device it
        needs cuBLAS's deterministic workspace: CUBLAS_WORKSPACE_CONFIG is set to ":4096:8"
        when unset, and a different value is refused.
      mode: torch.compile's mode for Inductor ("default", "reduce-overhead", "max-autotune",
        "max-autotune-no-cudagraphs"): its code generation options, as torch.compile applies them.
        On a CUDA device, "reduce-overhead" and "max-autotune" replay the whole step as CUDA
        graphs; the parameters and the state it writes are their static inputs, and what the
        step returns is cloned out of the graphs' memory.
    """
    return CompiledStep(step, policy if policy is not None else Policy(), optimizers=optimizers, compiler=compiler,
                        deterministic=deterministic, mode=mode)


def backend(
    policy: Policy | None = None,
    *,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    compiler: str = "inductor",
    deterministic: bool = True,
    mode: str | None = None,
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
        optimizers = in_frame(caller, torch.optim.Optimizer)
    schedulers.defer(*in_frame(caller, LRScheduler))
    policy = policy if policy is not None else Policy()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a lordo_compile.Policy, got {type(policy).__name__}")
    adapters = prepare(*optimizers)
    names = Names.of_frame(caller)
    release_state(policy, adapters, names)
    return LordoBackend(policy, compiler=compiler, names=names, adapters=adapters, deterministic=deterministic,
                        mode=mode)


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
    """The `backend="lordo"` entry point: `options={"policy": ..., "compiler": ..., "deterministic": ...,
    "mode": ...}`.

    Optimizers must be prepared before the first call (`lordo_compile.prepare(opt)`).
    """
    options = dict(options or {})
    policy = options.pop("policy", None) or Policy()
    compiler = options.pop("compiler", "inductor")
    deterministic = options.pop("deterministic", True)
    mode = options.pop("mode", None)
    if options:
        raise ValueError(f"unknown lordo backend options {sorted(options)}; known: policy, compiler, deterministic, "
                         "mode")
    return LordoBackend(policy, compiler=compiler, deterministic=deterministic, mode=mode)(gm, example_inputs)

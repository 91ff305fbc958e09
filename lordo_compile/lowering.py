"""Lowering: canonical nodes become their math, then AOTAutograd and a code generator.

    TrainGraph (lordo.adamw nodes)  --lower-->  GraphModule (torch ops only)
        --compile_phase-->  Inductor (C++ on CPU, Triton on GPU) | aot_eager | eager

`lower` swaps each canonical node's target for the op's `math` function; AOTAutograd
traces that function into aten ops, so Inductor sees the whole update and fuses it.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_custom_graph_passes

from .graph import TrainGraph
from .ops import math_for

COMPILERS = ("inductor", "aot_eager", "eager")
# torch.compile's modes; each is a set of Inductor config patches (`torch._inductor.list_mode_options`).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Inductor options for every step graph. Inductor looks for fusions among the nodes that read
# one buffer, trying each node with the next `max_fusion_buffer_group_pairwise_attempts` (64 by
# default) in every fusion round. Every node of a whole-step update reads the hyperparameters (and
# any flag that guards the writes), so those groups hold hundreds of nodes: on the tiny GPT, 16 cuts the
# scheduler's time from 7.2 to 4.8 s of a cold first call (python -m benchmarks.first_call,
# benchmarks/results/first_call_processes.json); the step computes the same bits
# (tests/test_lowering.py).
INDUCTOR_CONFIG = {"max_fusion_buffer_group_pairwise_attempts": 16}
# The most arguments one C++ function of Inductor's CPU code may take (Inductor's own bound: 500);
# see `bounded_cpu_kernel_groups`. None: Inductor's bound.
CPU_KERNEL_GROUP_ARGS: int | None = 64
# The two cuBLAS workspace settings under which cuBLAS gives the same bits on every run.
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def checked_mode(mode: str | None, compiler: str) -> str | None:
    """`mode` if it is one of torch.compile's and the compiler is Inductor; else a ValueError."""
    if mode is None:
        return None
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (torch.compile's) or None, got {mode!r}")
    if compiler != "inductor":
        raise ValueError(f"mode={mode!r} chooses Inductor's options, but compiler={compiler!r}; "
                         "use compiler='inductor' or leave mode out")
    return mode


def require_deterministic_cublas(device: torch.device) -> str | None:
    """Before a deterministic step runs on a CUDA device: cuBLAS must have a fixed workspace.

    `torch.use_deterministic_algorithms(True)` makes every CUDA matmul raise unless
    CUBLAS_WORKSPACE_CONFIG is one of `DETERMINISTIC_CUBLAS`. Unset, it is set here (returns
    a note saying so), since PyTorch reads it at each matmul; set to anything else, the user
    chose another workspace on purpose, and a ValueError says what to change."""
    if device.type != "cuda":
        return None
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current in DETERMINISTIC_CUBLAS:
        return None
    if current is not None:
        raise ValueError(
            f"deterministic=True on {device} needs CUBLAS_WORKSPACE_CONFIG set to one of {DETERMINISTIC_CUBLAS} "
            f"(cuBLAS is otherwise free to round differently from run to run), but it is {current!r}. Set it to "
            f"{DETERMINISTIC_CUBLAS[0]!r} before starting Python, or compile with deterministic=False."
        )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    return (f"deterministic=True on {device}: set CUBLAS_WORKSPACE_CONFIG={DETERMINISTIC_CUBLAS[0]} "
            "(cuBLAS's deterministic workspace; PyTorch refuses CUDA matmuls under deterministic algorithms "
            "without it)")


def lower(train_graph: TrainGraph) -> fx.GraphModule:
    """A copy of the graph with every lordo op replaced by its math."""
    module = train_graph.copy().module
    for node in module.graph.nodes:
        math = math_for(node.target) if node.op == "call_function" else None
        if math is not None:
            node.target = math
    module.recompile()
    return module


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """`torch.use_deterministic_algorithms(True)` for the duration, when `enabled`.

    Inductor reads the flag when it lowers: with it, a scatter-add (an embedding's backward)
    becomes a serial kernel; without it, a parallel loop of atomic adds whose order, and so
    whose rounding, changes from run to run with more than one thread. On a GPU the same
    flag picks the deterministic eager kernels at run time.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if not enabled or previous:
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def compile_phase(
    module: fx.GraphModule,
    example_inputs: Sequence,
    compiler: str,
    on_aten_graph: Callable[[fx.GraphModule], None],
    deterministic: bool = True,
    mode: str | None = None,
    lowerings: Sequence = (),
) -> Callable:
    """Compile a lowered phase; `on_aten_graph` receives the graph AOTAutograd produced.

    With `deterministic`, code generation picks kernels whose result does not depend on
    thread timing (see `deterministic_algorithms`). `mode` is torch.compile's (Inductor only).
    `lowerings`: what the passes ask of code generation (`passes.Lowering`): their rewrites
    of the aten graph run before `on_aten_graph`, their Inductor config patches around it."""
    with deterministic_algorithms(deterministic):
        return _compile_phase(module, example_inputs, compiler, on_aten_graph, mode, lowerings)


def _compile_phase(module, example_inputs, compiler, on_aten_graph, mode, lowerings) -> Callable:
    if compiler == "eager":
        return module.forward

    def rewritten(graph: fx.GraphModule, for_inductor: bool = False) -> fx.GraphModule:
        for lowering in lowerings:
            for rewrite in lowering.aten_rewrites:
                rewrite(graph)
        if for_inductor:
            write_inputs_when_computed(graph)
            compute_scalars_once(graph)
        on_aten_graph(graph)
        return graph
    if compiler == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(graph: fx.GraphModule, inputs):
            return make_boxed_func(rewritten(graph).forward)

        return aot_autograd(fw_compiler=keep)(module, list(example_inputs))
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(graph: fx.GraphModule, inputs, **kwargs):
            if torch._inductor.config.triton.cudagraphs:
                # CUDA graph trees replay a graph only when every input it writes has a fixed
                # address; the inputs a step writes are its parameters and the state the runtime
                # allocated once, so they are declared static (a batch is never written).
                kwargs["static_input_idxs"] = sorted({*kwargs.get("static_input_idxs", ()),
                                                      *written_inputs(graph)})
            with torch._inductor.config.patch(
                    {**INDUCTOR_CONFIG,
                     **{key: value for lowering in lowerings for key, value in lowering.inductor_config.items()}}), \
                    bounded_cpu_kernel_groups(CPU_KERNEL_GROUP_ARGS), dtype_rules_built_once():
                return compile_fx_inner(rewritten(graph, for_inductor=True), inputs, **kwargs)

        from torch._inductor import list_mode_options

        patches = list_mode_options(mode) if mode is not None else None
        with cacheable_tracing(example_inputs) as inputs:
            return compile_fx(module, inputs, inner_compile=inner, config_patches=patches)
    raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")


@contextlib.contextmanager
def cacheable_tracing(example_inputs: Sequence) -> Iterator[list]:
    """Inside, a tracing context with a shape environment, as dynamo gives torch.compile's
    graphs; yields the inputs as fake tensors of fixed shape in its fake mode.

    Why: Inductor's FX graph cache looks up a graph's code only within such a context (outside
    one it bypasses the cache: "No shape env"), so a step compiled outside dynamo would
    regenerate all its code in every process. Inside dynamo (a step with symbolic sizes)
    its context is used as it is."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if TracingContext.try_get() is not None:
        yield list(example_inputs)
        return
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    with tracing(TracingContext(fake_mode)):
        yield [fake_mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value
               for value in example_inputs]


@contextlib.contextmanager
def bounded_cpu_kernel_groups(max_args: int | None) -> Iterator[None]:
    """Inside, Inductor's C++ code generation starts a new function once the one it is writing
    takes more than `max_args` arguments (None: Inductor's own bound).

    Why: on the CPU, Inductor writes the kernels it schedules one after another, with no
    library call between them, into one C++ function, and its wrapper allocates every buffer
    that function writes before calling it and frees them after. When every update waits for
    the last gradient, nothing separates the updates: every update's intermediates were then
    alive at once, one function of about 400 arguments on the tiny GPT. Bounded, the wrapper
    frees each group's buffers before allocating the next's: some policies' peaks fall, by up
    to 39% (`python -m benchmarks.memory --without CPU_KERNEL_GROUP_ARGS` measures them
    without it), and every kernel computes the same bits (tests/test_lowering.py).
    Inductor's code for GPUs has no such groups. The bound enters Inductor's cache key
    (`CpuKernelGroupBound`), after the post-grad passes the user set."""
    from torch._inductor.codegen.cpp import CppScheduling

    if max_args is None:
        yield
        return
    previous = CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM
    CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = max_args
    users = get_custom_graph_passes(torch._inductor.config.post_grad_custom_post_pass)
    try:
        with torch._inductor.config.patch(post_grad_custom_post_pass=(*users, CpuKernelGroupBound(max_args))):
            yield
    finally:
        CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = previous


class CpuKernelGroupBound(CustomGraphPass):
    """A post-grad pass that leaves the graph as it is: its `uuid` puts the C++ function bound
    (`bounded_cpu_kernel_groups`) into Inductor's FX graph cache key.

    Why: the key hashes the graph, Inductor's config and each custom pass's `uuid()`, but not a
    class attribute of Inductor's C++ scheduler; without this, a compile under another bound (an
    earlier lordo_compile, an ablation) would be handed that bound's code on a cache hit."""

    def __init__(self, max_args: int) -> None:
        self.max_args = max_args

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return f"lordo_compile CPU kernel group bound {self.max_args}"


@contextlib.contextmanager
def dtype_rules_built_once() -> Iterator[None]:
    """Inside, Inductor's dtype propagation handler builds its per-op rules once, not once for
    every op its code generation writes.

    Why: Inductor asks `DtypePropagationOpsHandler()` for each op of each kernel it writes; the
    handler is one shared object, but its `__init__` sets its ~700 rules again at each call,
    allocating them anew and freeing the old ones, and in some processes the allocator then maps
    and unmaps memory at every call. Built per op, the tiny GPT's kernel source took 27.8 s of a
    cold first call, against 13.2 s built once (`python -m benchmarks.first_call`, README
    "Measured"). The rules come from Inductor's tables, which only grow as ops register, so they
    are built again when a table's length changes. The generated code is the same
    (tests/test_lowering.py)."""
    from torch._inductor import dtype_propagation, utils
    from torch._inductor.codegen import common

    handler = dtype_propagation.DtypePropagationOpsHandler
    build = handler.__init__
    built_for = None

    def build_once(self) -> None:
        nonlocal built_for
        handler_and_tables = (id(self), len(utils.op_dtype_propagation_rules), len(common.pointwise_overrides_data))
        if handler_and_tables != built_for:
            build(self)
            built_for = handler_and_tables

    handler.__init__ = build_once
    try:
        yield
    finally:
        handler.__init__ = build


def uses_cuda_graphs(mode: str | None, device: torch.device) -> bool:
    """Whether a step compiled with torch.compile's `mode` on `device` replays as CUDA graphs."""
    from torch._inductor import list_mode_options

    return device.type == "cuda" and mode is not None and bool(list_mode_options(mode).get("triton.cudagraphs"))


def written_inputs(graph: fx.GraphModule) -> list[int]:
    """The positions of the graph inputs that the graph writes into (`copy_` into a placeholder)."""
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    written = {node.args[0] for node in graph.graph.nodes
               if node.op == "call_function" and node.target is torch.ops.aten.copy_.default}
    return [index for index, node in enumerate(placeholders) if node in written]


def write_inputs_when_computed(graph: fx.GraphModule) -> None:
    """Move each write into a graph input (`copy_(input, value)`, which AOTAutograd puts at the
    end of the graph) to just after the last read of the input, with `value` when the write is
    its only use: to just after `value`'s own inputs.

    Why: when Inductor lowers a write into an input, it gives every value lowered so far that
    reads the input, each intermediate of a chain inlined on its own, a buffer of its own
    (`GraphLowering.mark_buffer_mutated`). At the end of the graph that is every step of every
    parameter's update: each bias correction's nine scalars per parameter, each moment's
    partial sums. Written when computed, the chain that reads a new moment or step count reads
    a buffer that nothing writes later and stays inlined: on the tiny GPT, 1,792 scheduler
    nodes become 1,168 (python -m benchmarks.first_call), and the step computes the same bits
    (tests/test_lowering.py). Reads through views of the input count as reads; an input the
    graph returns is left alone. Moving the writes changes how Inductor groups the updates,
    and with it some policies' peak memory (`python -m benchmarks.memory
    --without write_inputs_when_computed` measures it)."""
    nodes = graph.graph.nodes
    writes = [node for node in nodes
              if node.op == "call_function" and node.target is torch.ops.aten.copy_.default
              and node.args[0].op == "placeholder"]
    writes_into = collections.Counter(write.args[0] for write in writes)
    for write in writes:
        target, value = write.args
        if writes_into[target] > 1:
            continue
        order = {node: index for index, node in enumerate(nodes)}
        readers = _reads_of(target) - {write, value}
        if any(reader.op == "output" for reader in readers):
            continue
        if value.op == "call_function" and len(value.users) == 1:
            anchor = max([*value.all_input_nodes, *readers], key=order.__getitem__)
            if order[anchor] < order[value]:
                anchor.append(value)
                value.append(write)
                continue
        anchor = max([value, *readers], key=order.__getitem__)
        if order[anchor] + 1 < order[write]:
            anchor.append(write)
    graph.graph.lint()
    graph.recompile()


# Scalar ops that cost a library call in generated C++. Inductor compiles with -fmath-errno, so
# the C++ compiler may not hoist such a call out of the loop that a scalar is inlined into.
COSTLY_SCALAR_OPS = frozenset(getattr(torch.ops.aten, name) for name in (
    "pow", "sqrt", "rsqrt", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p",
    "sin", "cos", "tan", "tanh", "sigmoid", "erf", "atan", "atan2"))


@torch.library.custom_op("lordo::computed_once", mutates_args=())
def computed_once(scalar: torch.Tensor) -> torch.Tensor:
    """The value itself; under Inductor, stored in a buffer of its own (`compute_scalars_once`)."""
    return scalar.clone()


@computed_once.register_fake
def _(scalar: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(scalar)


def _realize(scalar):
    scalar.realize()
    return scalar


def compute_scalars_once(graph: fx.GraphModule) -> None:
    """Give each 0-d value on the CPU that a loop reads, and whose computation calls a costly
    scalar op (`COSTLY_SCALAR_OPS`), a buffer of its own, computed once per call.

    Why: Inductor inlines a 0-d value into every loop that reads it, and its C++ evaluates the
    inlined expression at each vectorized iteration; with -fmath-errno the compiler cannot hoist
    `std::pow`. Adam's bias corrections, `1 - beta ** t`, were so computed once per 8 entries
    of every moment: at batch 1 x 128 the tiny GPT's step takes 0.79x the time it takes
    without this rewrite, the two timed round robin in one run (`scalars_once_gain` in
    benchmarks/results/step_time_scalars_once.json). On a GPU every entry has its own thread
    anyway, so this is CPU only. Like `write_inputs_when_computed`, it changes how Inductor
    groups the updates, and with it some policies' peak memory (`python -m benchmarks.memory
    --without compute_scalars_once` measures it)."""
    from torch._inductor.lowering import lowerings, register_lowering

    if computed_once._opoverload not in lowerings:
        register_lowering(computed_once._opoverload, type_promotion_kind=None)(_realize)
    costly: set[fx.Node] = set()
    for node in list(graph.graph.nodes):
        if not (node.op == "call_function" and _is_cpu_scalar(node.meta.get("val"))):
            continue
        # In graph order, so each 0-d input has been looked at already.
        if (getattr(node.target, "overloadpacket", None) in COSTLY_SCALAR_OPS
                or any(source in costly for source in node.all_input_nodes)):
            costly.add(node)
        loops = [user for user in node.users if _is_cpu_loop(user.meta.get("val"))]
        if node not in costly or not loops:
            continue
        with graph.graph.inserting_after(node):
            once = graph.graph.call_function(computed_once._opoverload, (node,))
        once.meta["val"] = node.meta["val"]
        for user in loops:
            user.replace_input_with(node, once)
    graph.graph.lint()
    graph.recompile()


def _is_cpu_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu"


def _is_cpu_loop(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.device.type == "cpu"


def _reads_of(node: fx.Node) -> set[fx.Node]:
    """The nodes that read `node`, directly or through ops whose result may alias it (views)."""
    reads: set[fx.Node] = set()
    pending = [node]
    while pending:
        for user in pending.pop().users:
            if user in reads:
                continue
            reads.add(user)
            if _may_alias_input(user):
                pending.append(user)
    return reads


def _may_alias_input(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.op == "call_function"
    return any(result.alias_info is not None for result in schema.returns)

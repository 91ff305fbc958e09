"""Lowering: canonical nodes become their math, then AOTAutograd and a code generator.

    TrainGraph (lordo.adamw nodes)  --lower-->  GraphModule (torch ops only)
        --compile_phase-->  Inductor (C++ on CPU, Triton on GPU) | aot_eager | eager

`lower` swaps each canonical node's target for the op's `math` function; AOTAutograd
traces that function into aten ops, so Inductor sees the whole update and fuses it.
"""

from __future__ import annotations

import contextlib
import operator
import os
from typing import Callable, Iterator, Sequence

import torch
import torch.fx as fx

from .graph import OVERLAP, TrainGraph
from .ops import math_for

COMPILERS = ("inductor", "aot_eager", "eager")
# torch.compile's modes; each is a set of Inductor config patches (`torch._inductor.list_mode_options`).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
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


_COLLECTIVES = {torch.ops._c10d_functional.all_reduce, torch.ops._c10d_functional.all_gather_into_tensor,
                torch.ops._c10d_functional.reduce_scatter_tensor, torch.ops._c10d_functional.all_to_all_single,
                torch.ops._c10d_functional.broadcast}
# Ops that only lay out their inputs (a bucket's concatenation, a gradient's views): moving one
# next to a collective costs no compute order.
_LAYOUT = {torch.ops.aten.cat, torch.ops.aten._unsafe_view, torch.ops.aten.split_with_sizes, torch.ops.aten.split}


def schedule_collectives(module: fx.GraphModule) -> None:
    """Start every collective as soon as its inputs exist, and wait for it only where its
    result is first computed with, so that it runs while the nodes in between compute (a
    gradient bucket's all-reduce during the rest of the backward). Run on the graphs whose
    collectives a pass marked `graph.OVERLAP`.

    AOTAutograd writes a step's backward as one run of ops with the collectives after it, the
    order of the traced program; here only the collectives, their waits and the layout ops
    (views, concatenations, splits) that feed or cut them move. Compute keeps its order, and
    so do the collectives among themselves (every worker issues them in the same order).
    """
    graph = module.graph
    for node in [n for n in graph.nodes if _packet(n) in _COLLECTIVES]:
        _raise(node)
    for node in [n for n in graph.nodes if _packet(n) is torch.ops._c10d_functional.wait_tensor]:
        _sink(node)
    graph.lint()
    module.recompile()


def _packet(node: fx.Node):
    return getattr(node.target, "_overloadpacket", None) if node.op == "call_function" else None


def _lays_out(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        _packet(node) in _LAYOUT or getattr(node.target, "is_view", False) or node.target is operator.getitem)


def _raise(node: fx.Node) -> None:
    """Move `node` (and the layout ops it reads, first) to just after its last input, the
    last collective before it, or the last op that writes in place (whose write it might read)."""
    for source in node.all_input_nodes:
        if _lays_out(source):
            _raise(source)
    last = node.prev
    while (last not in node.all_input_nodes and not _writes(last) and _packet(last) not in _COLLECTIVES
           and last.op not in ("root", "placeholder")):
        last = last.prev
    last.append(node)


def _writes(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _sink(node: fx.Node) -> None:
    """Move `node` (and the layout ops that read it, first) to just before its first reader."""
    for reader in list(node.users):
        if _lays_out(reader):
            _sink(reader)
    readers = set(node.users)
    if not readers:
        return
    first = node.next
    while first not in readers:
        first = first.next
    first.prepend(node)


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
) -> Callable:
    """Compile a lowered phase; `on_aten_graph` receives the graph AOTAutograd produced.

    With `deterministic`, code generation picks kernels whose result does not depend on
    thread timing (see `deterministic_algorithms`). `mode` is torch.compile's (Inductor only)."""
    with deterministic_algorithms(deterministic):
        return _compile_phase(module, example_inputs, compiler, on_aten_graph, mode)


def _compile_phase(module, example_inputs, compiler, on_aten_graph, mode) -> Callable:
    if compiler == "eager":
        return module.forward
    overlap = any(node.meta.get(OVERLAP) for node in module.graph.nodes)
    if compiler == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(graph: fx.GraphModule, inputs):
            if overlap:
                schedule_collectives(graph)
            on_aten_graph(graph)
            return make_boxed_func(graph.forward)

        return aot_autograd(fw_compiler=keep)(module, list(example_inputs))
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(graph: fx.GraphModule, inputs, **kwargs):
            if overlap:
                schedule_collectives(graph)
            on_aten_graph(graph)
            # Inductor's reordering for peak memory computes each weight's gradient late, just
            # before its update reads it, which would leave nothing for a collective to overlap.
            with torch._inductor.config.patch(reorder_for_peak_memory=not overlap):
                return compile_fx_inner(graph, inputs, **kwargs)

        from torch._inductor import list_mode_options

        patches = list_mode_options(mode) if mode is not None else None
        return compile_fx(module, list(example_inputs), inner_compile=inner, config_patches=patches)
    raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")

"""Lowering: canonical nodes become their math, then AOTAutograd and a code generator.

    TrainGraph (lordo.adamw nodes)  --lower-->  GraphModule (torch ops only)
        --compile_phase-->  Inductor (C++ on CPU, Triton on GPU) | aot_eager | eager

`lower` swaps each canonical node's target for the op's `math` function; AOTAutograd
traces that function into aten ops, so Inductor sees the whole update and fuses it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.fx as fx

from .graph import TrainGraph
from .ops import math_for

COMPILERS = ("inductor", "aot_eager", "eager")


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
) -> Callable:
    """Compile a lowered phase; `on_aten_graph` receives the graph AOTAutograd produced.

    With `deterministic`, code generation picks kernels whose result does not depend on
    thread timing (see `deterministic_algorithms`)."""
    with deterministic_algorithms(deterministic):
        return _compile_phase(module, example_inputs, compiler, on_aten_graph)


def _compile_phase(module, example_inputs, compiler, on_aten_graph) -> Callable:
    if compiler == "eager":
        return module.forward
    if compiler == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(graph: fx.GraphModule, inputs):
            on_aten_graph(graph)
            return make_boxed_func(graph.forward)

        return aot_autograd(fw_compiler=keep)(module, list(example_inputs))
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(graph: fx.GraphModule, inputs, **kwargs):
            on_aten_graph(graph)
            return compile_fx_inner(graph, inputs, **kwargs)

        return compile_fx(module, list(example_inputs), inner_compile=inner)
    raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")

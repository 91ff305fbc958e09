"""Lowering's rewrites of the aten graph before Inductor: where the writes into inputs go."""

import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import lordo_compile as lc
from lordo_compile import lowering
from lordo_compile.models import MLP
from lordo_compile.lowering import write_inputs_when_computed
from lordo_compile.testing import counting_scheduler_nodes, fresh_inductor_cache, training_step

aten = torch.ops.aten


def order(module: fx.GraphModule) -> list[str]:
    return [node.name for node in module.graph.nodes if node.op == "call_function"]


def call(graph: fx.Graph, name: str, target, *args) -> fx.Node:
    return graph.create_node("call_function", target, args, name=name)


def run(module: fx.GraphModule, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """The graph's outputs, then its inputs as the graph left them (fx runs copy_ in place)."""
    inputs = [tensor.clone() for tensor in inputs]
    return [*module(*inputs), *inputs]


def step_like_graph() -> fx.GraphModule:
    """An Adam-like tail: a step count and a moment written back at the end, as AOTAutograd
    leaves them, with the count's bias correction read after the moment is computed."""
    graph = fx.Graph()
    count, moment, grad = (graph.placeholder(name) for name in ("count", "moment", "grad"))
    new_count = call(graph, "new_count", aten.add.Tensor, count, 1)
    decayed = call(graph, "decayed", aten.mul.Tensor, moment, 0.9)
    new_moment = call(graph, "new_moment", aten.add.Tensor, decayed, grad)
    correction = call(graph, "correction", aten.pow.Scalar, 0.9, new_count)
    update = call(graph, "update", aten.div.Tensor, new_moment, correction)
    call(graph, "write_count", aten.copy_.default, count, new_count)
    call(graph, "write_moment", aten.copy_.default, moment, new_moment)
    graph.output((update,))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_each_write_moves_to_just_after_its_value_and_computes_the_same():
    module = step_like_graph()
    inputs = (torch.tensor(3.0), torch.randn(5), torch.randn(5))
    expected = run(module, *inputs)
    write_inputs_when_computed(module)
    assert order(module) == ["new_count", "write_count", "decayed", "new_moment", "write_moment", "correction", "update"]
    for got, want in zip(run(module, *inputs), expected):
        assert torch.equal(got, want)
    # What that gives the math: 0.9 ** 4 and (0.9 m + g) / 0.9 ** 4.
    assert torch.equal(expected[1], torch.tensor(4.0))
    assert torch.allclose(expected[0], (0.9 * inputs[1] + inputs[2]) / 0.9**4)


def test_a_value_used_only_by_its_write_moves_up_to_its_inputs():
    graph = fx.Graph()
    flag, count = graph.placeholder("flag"), graph.placeholder("count")
    new_count = call(graph, "new_count", aten.add.Tensor, count, 1)
    later = call(graph, "later", aten.mul.Tensor, new_count, 2)
    kept = call(graph, "kept", aten.where.self, flag, new_count, count)
    call(graph, "write_count", aten.copy_.default, count, kept)
    graph.output((later,))
    module = fx.GraphModule(torch.nn.Module(), graph)
    write_inputs_when_computed(module)
    assert order(module) == ["new_count", "kept", "write_count", "later"]


def test_a_read_through_a_view_keeps_the_write_after_it():
    graph = fx.Graph()
    weight, x = graph.placeholder("weight"), graph.placeholder("x")
    transposed = call(graph, "transposed", aten.t.default, weight)
    new_weight = call(graph, "new_weight", aten.mul.Tensor, weight, 0.5)
    product = call(graph, "product", aten.mm.default, x, transposed)
    scaled = call(graph, "scaled", aten.mul.Tensor, product, 2)
    call(graph, "write_weight", aten.copy_.default, weight, new_weight)
    graph.output((scaled,))
    module = fx.GraphModule(torch.nn.Module(), graph)
    inputs = (torch.randn(3, 4), torch.randn(2, 4))
    expected = run(module, *inputs)
    write_inputs_when_computed(module)
    assert order(module) == ["transposed", "new_weight", "product", "write_weight", "scaled"]
    for got, want in zip(run(module, *inputs), expected):
        assert torch.equal(got, want)


def test_an_input_the_graph_returns_keeps_its_write_at_the_end():
    graph = fx.Graph()
    count = graph.placeholder("count")
    new_count = call(graph, "new_count", aten.add.Tensor, count, 1)
    other = call(graph, "other", aten.mul.Tensor, new_count, 3)
    call(graph, "write_count", aten.copy_.default, count, new_count)
    graph.output((other, count))
    module = fx.GraphModule(torch.nn.Module(), graph)
    write_inputs_when_computed(module)
    assert order(module) == ["new_count", "other", "write_count"]


def mlp_adamw_run(monkeypatch, as_before: bool):
    """Three AdamW steps of an MLP through Inductor (fresh cache); the parameters, the
    scheduler's node count, and the generated code. `as_before`: without the lowering's two
    choices (writes moved, Inductor's fusion search narrowed)."""
    with monkeypatch.context() as patch:
        if as_before:
            patch.setattr(lowering, "write_inputs_when_computed", lambda graph: None)
            patch.setattr(lowering, "INDUCTOR_CONFIG", {})
        torch.manual_seed(0)
        model = MLP((16, 32, 32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy())
        generator = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator))
                   for _ in range(3)]
        counts: list[int] = []
        with fresh_inductor_cache(), counting_scheduler_nodes(counts):
            _, sources = run_and_get_code(step, *batches[0])
    for batch in batches[1:]:
        step(*batch)
    return [p.detach().clone() for p in model.parameters()], counts, "\n".join(sources)


@pytest.mark.inductor
def test_inductor_keeps_the_update_inlined_with_the_same_bits(monkeypatch):
    params, counts, code = mlp_adamw_run(monkeypatch, as_before=False)
    params_before, counts_before, _ = mlp_adamw_run(monkeypatch, as_before=True)
    for got, want in zip(params, params_before):
        assert torch.equal(got, want)
    # With the writes at the end, each of the 6 parameters' bias corrections and moments left
    # ~13 values realized on their own (212 nodes for the MLP); moved, those stay inlined.
    assert counts_before == [212], counts_before
    assert counts == [134], counts
    updates = re.findall(r"^(cpp_fused_\w*sqrt\w*) = ", code, flags=re.M)
    assert len(updates) == 1, updates

"""Lowering's rewrites of the aten graph before Inductor: where the writes into inputs go."""

import collections
import functools
import re
from typing import NamedTuple

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch._inductor.dtype_propagation import DtypePropagationOpsHandler
from torch._inductor.utils import run_and_get_code

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.lowering import (CpuKernelGroupBound, bounded_cpu_kernel_groups, compute_scalars_once, computed_once,
                                    dtype_rules_built_once, uses_cuda_graphs, write_inputs_when_computed,
                                    written_inputs)
from lordo_compile.testing import (LOWERING_CHOICES, counting_calls, counting_scheduler_nodes, fresh_inductor_cache,
                                   lowering_without, training_step)

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


def test_the_inputs_a_step_writes_are_the_static_inputs_of_cuda_graphs():
    # count and moment are written back; grad, a batch-like input, is only read.
    assert written_inputs(step_like_graph()) == [0, 1]
    assert uses_cuda_graphs("reduce-overhead", torch.device("cuda"))
    assert uses_cuda_graphs("max-autotune", torch.device("cuda"))
    assert not uses_cuda_graphs("max-autotune-no-cudagraphs", torch.device("cuda"))
    assert not uses_cuda_graphs(None, torch.device("cuda"))
    assert not uses_cuda_graphs("reduce-overhead", torch.device("cpu"))


def test_a_costly_scalar_that_a_loop_reads_is_computed_once():
    graph = fx.Graph()
    count, beta, moment = (graph.placeholder(name) for name in ("count", "beta", "moment"))
    power = call(graph, "power", aten.pow.Tensor_Tensor, beta, count)
    correction = call(graph, "correction", aten.rsub.Scalar, power, 1)
    next_count = call(graph, "next_count", aten.add.Tensor, count, 1)
    corrected = call(graph, "corrected", aten.div.Tensor, moment, correction)
    counted = call(graph, "counted", aten.mul.Tensor, moment, next_count)
    graph.output((corrected, counted, correction))
    module = fx.GraphModule(torch.nn.Module(), graph)
    inputs = (torch.tensor(3.0), torch.tensor(0.9), torch.randn(5))
    FakeTensorProp(module).propagate(*inputs)
    expected = run(module, *inputs)
    compute_scalars_once(module)
    once = [node for node in module.graph.nodes if node.target is computed_once._opoverload]
    # Only `correction` reaches a loop through a pow; `next_count` is cheap to inline, and the
    # output reads `correction` itself.
    assert [node.args[0].name for node in once] == ["correction"]
    assert [user.name for user in once[0].users] == ["corrected"]
    for got, want in zip(run(module, *inputs), expected):
        assert torch.equal(got, want)


class MlpRun(NamedTuple):
    params: list[torch.Tensor]
    scheduler_nodes: list[int]
    code: str
    dtype_rule_builds: int


@functools.cache
def mlp_adamw_run(without: tuple[str, ...] = ()) -> MlpRun:
    """Three AdamW steps of an MLP through Inductor (fresh cache); the parameters, the
    scheduler's node count, the generated code, and how often the dtype rules were built.
    `without`: the lowering's choices (`LOWERING_CHOICES`) turned off. Cached: three tests read
    the run as shipped, and none changes what it returns."""
    with lowering_without(*without):
        torch.manual_seed(0)
        model = MLP((16, 32, 32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy())
        generator = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator))
                   for _ in range(3)]
        counts: list[int] = []
        builds: list[int] = []
        with fresh_inductor_cache(), counting_scheduler_nodes(counts), \
                counting_calls(DtypePropagationOpsHandler, "__init__", builds):
            _, sources = run_and_get_code(step, *batches[0])
    for batch in batches[1:]:
        step(*batch)
    return MlpRun([p.detach().clone() for p in model.parameters()], counts, "\n".join(sources), len(builds))


@pytest.mark.inductor
def test_inductor_keeps_the_update_inlined_with_the_same_bits():
    params, counts, code, _ = mlp_adamw_run()
    params_before, counts_before, _, _ = mlp_adamw_run(without=tuple(LOWERING_CHOICES))
    for got, want in zip(params, params_before):
        assert torch.equal(got, want)
    # With the writes at the end, each of the 6 parameters' bias corrections and moments left
    # ~13 values realized on their own (212 nodes for the MLP); moved, those stay inlined but
    # for the two scalars per parameter that compute_scalars_once keeps apart.
    assert counts_before == [212], counts_before
    assert counts == [146], counts
    # The six updates (and the non-finite check) in two C++ functions: CPU_KERNEL_GROUP_ARGS
    # ends the first near 64 arguments.
    updates = re.findall(r"^(cpp_fused_\w*sqrt\w*) = ", code, flags=re.M)
    assert len(updates) == 2, updates


def kernel_arguments(code: str) -> list[int]:
    """How many arguments each C++ function in Inductor's output `code` takes."""
    return [len(re.findall(r"'[^']*\*'", arguments))
            for arguments in re.findall(r"cpp_pybinding\(\[(.*?)\]", code, flags=re.S)]


def code_with_and_without(choice: str) -> tuple[str, str]:
    """The MLP's generated code as shipped and without the lowering's `choice`, once both
    runs are seen to leave the same parameters, bit for bit."""
    params, _, code, _ = mlp_adamw_run()
    params_without, _, code_without, _ = mlp_adamw_run(without=(choice,))
    for got, want in zip(params, params_without):
        assert torch.equal(got, want)
    return code, code_without


@pytest.mark.inductor
def test_cpu_kernel_groups_end_near_their_bound_with_the_same_bits():
    code, code_unbounded = code_with_and_without("CPU_KERNEL_GROUP_ARGS")
    # Under Inductor's bound (500) the check and the six updates are one function of 86
    # arguments; a group ends after the kernel that takes it past 64.
    assert kernel_arguments(code_unbounded)[-1:] == [86], kernel_arguments(code_unbounded)
    assert kernel_arguments(code)[-2:] == [65, 29], kernel_arguments(code)


def mlp_adamw_compiled(cache_lookups: collections.Counter) -> tuple[str, list[torch.Tensor]]:
    """Inductor's code for an MLP's AdamW step, compiled in whatever cache is current, and the
    parameters after two steps; adds the FX graph cache's hits and misses to `cache_lookups`."""
    torch.manual_seed(0)
    model = MLP((16, 32, 32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy())
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)) for _ in range(2)]
    counters.clear()
    _, sources = run_and_get_code(step, *batches[0])
    cache_lookups.update({outcome: counters["inductor"][f"fxgraph_cache_{outcome}"] for outcome in ("hit", "miss")})
    step(*batches[1])
    assert "aten" in step.graphs["step"]
    return "\n".join(sources), [p.detach().clone() for p in model.parameters()]


@pytest.mark.inductor
def test_inductor_cache_serves_a_step_again_but_not_under_another_kernel_group_bound():
    cache_lookups = collections.Counter()
    with fresh_inductor_cache():
        bounded, params = mlp_adamw_compiled(cache_lookups)
        with lowering_without("CPU_KERNEL_GROUP_ARGS"):
            unbounded, params_unbounded = mlp_adamw_compiled(cache_lookups)
        _, params_again = mlp_adamw_compiled(cache_lookups)
    # The step compiled outside dynamo is looked up (outside a tracing context Inductor
    # bypasses its cache); the unbounded step is compiled, not handed the bounded step's code.
    assert cache_lookups == {"miss": 2, "hit": 1}, cache_lookups
    assert kernel_arguments(bounded)[-2:] == [65, 29], kernel_arguments(bounded)
    assert kernel_arguments(unbounded)[-1:] == [86], kernel_arguments(unbounded)
    for got, unbounded_got, want in zip(params_again, params_unbounded, params):
        assert torch.equal(got, want) and torch.equal(unbounded_got, want)


def test_the_kernel_group_bound_keeps_the_users_post_grad_passes():
    class UsersPass(CustomGraphPass):
        def __call__(self, graph):
            return None

        def uuid(self):
            return "the user's"

    users = UsersPass()
    with torch._inductor.config.patch(post_grad_custom_post_pass=users):
        with bounded_cpu_kernel_groups(64):
            passes = torch._inductor.config.post_grad_custom_post_pass
        with bounded_cpu_kernel_groups(None):
            unbounded = torch._inductor.config.post_grad_custom_post_pass
    assert passes[0] is users and [type(p) for p in passes[1:]] == [CpuKernelGroupBound]
    assert unbounded is users


@pytest.mark.inductor
def test_dtype_rules_built_once_leave_the_generated_code_as_it_was():
    code, code_rules_per_op = code_with_and_without("dtype_rules_built_once")
    # The AOT ID counts the graphs AOTAutograd compiled in the process; the rest is the same.
    without_id = [re.sub(r"# AOT ID: .*", "", text) for text in (code, code_rules_per_op)]
    assert without_id[0] == without_id[1]
    # The compile builds the rules once; without, once for every op it writes.
    assert mlp_adamw_run().dtype_rule_builds == 1
    assert mlp_adamw_run(without=("dtype_rules_built_once",)).dtype_rule_builds > 100


def test_dtype_rules_are_built_again_only_when_a_rule_table_grows():
    import torch._inductor.lowering  # noqa: F401  (registers the rules)
    from torch._inductor import utils

    # A rule the handler's __init__ sets: a new object each time it runs.
    name, rule = next(iter(utils.op_dtype_propagation_rules.items()))

    def rules():
        return getattr(DtypePropagationOpsHandler(), name)

    original_init = DtypePropagationOpsHandler.__init__
    with dtype_rules_built_once():
        first = rules()
        assert rules() is first
        utils.op_dtype_propagation_rules["lordo_test_op"] = rule
        try:
            rebuilt = rules()
            assert rebuilt is not first and hasattr(DtypePropagationOpsHandler(), "lordo_test_op")
            assert rules() is rebuilt
        finally:
            del utils.op_dtype_propagation_rules["lordo_test_op"]
    assert DtypePropagationOpsHandler.__init__ is original_init
    assert rules() is not rules()


@pytest.mark.inductor
def test_inductor_computes_each_bias_correction_once_per_call():
    code, code_inlined = code_with_and_without("compute_scalars_once")
    # AdamW's beta1 ** t and beta2 ** t for each of the 6 parameters: outside every loop, or
    # inside the loop over each moment when inlined.
    assert calls_in_loops(code, "std::pow(") == (0, 2 * 6)
    assert calls_in_loops(code_inlined, "std::pow(") == (2 * 6, 0)


def calls_in_loops(code: str, call: str) -> tuple[int, int]:
    """How many times the C++ kernels in Inductor's output `code` write `call` inside a for
    loop's body, and how many outside any loop."""
    inside = outside = 0
    for kernel in re.findall(r"r\'\'\'(.*?)\'\'\'", code, flags=re.S):
        blocks: list[bool] = []
        loop_header = False
        for line in kernel.splitlines():
            stripped = line.strip()
            if call in stripped:
                if any(blocks):
                    inside += stripped.count(call)
                else:
                    outside += stripped.count(call)
            if stripped.startswith("for("):
                loop_header = True
            for char in stripped:
                if char == "{":
                    blocks.append(loop_header)
                    loop_header = False
                elif char == "}":
                    blocks.pop()
    return inside, outside

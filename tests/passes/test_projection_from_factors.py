"""A projected gradient formed from the factors of the gradient's product (passes/projection.py):
R = (dY^T X) P computed as dY^T (X P), and P^T (dY^T X) as (P^T dY^T) X, against the product
formed in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import lordo_compile as lc
from lordo_compile.passes.projection import project_from_factors
from lordo_compile.testing import training_step

MM = torch.ops.aten.mm.default


def _tall(dy, x, p):
    return torch.mm(dy.t(), x) @ p


def _wide(dy, x, p):
    return p.t() @ torch.mm(dy.t(), x)


def _transposed_product(dy, x, p):
    return torch.mm(x.t(), dy).t() @ p


def _inputs(k, m, n, rank, tall):
    generator = torch.Generator().manual_seed(0)
    dy, x = torch.randn(k, m, generator=generator), torch.randn(k, n, generator=generator)
    p = torch.linalg.qr(torch.randn(n if tall else m, rank, generator=generator)).Q
    return dy, x, p


def _products(graph) -> list[tuple[int, ...]]:
    return [tuple(node.meta["val"].shape) for node in graph.graph.nodes if node.target is MM]


@pytest.mark.parametrize("fn, tall", [(_tall, True), (_wide, False), (_transposed_product, True)],
                         ids=["tall", "wide", "transposed product"])
def test_the_projection_is_taken_from_the_factors_and_the_gradient_never_formed(fn, tall):
    k, m, n, rank = 6, 24, 16, 3
    m, n = (m, n) if tall else (n, m)
    inputs = _inputs(k, m, n, rank, tall)
    graph = make_fx(fn, tracing_mode="fake")(*inputs)
    gradient = {(m, n), (n, m)}  # the transposed product forms G^T
    assert gradient & set(_products(graph))

    assert project_from_factors(graph, inputs=3, positions=[2]) == 1

    assert not gradient & set(_products(graph))
    dy, x, p = (t.double() for t in inputs)
    expected = (dy.T @ x) @ p if tall else p.T @ (dy.T @ x)
    torch.testing.assert_close(graph(*inputs).double(), expected, rtol=1e-5, atol=1e-5)


def _unchanged(graph, **kwargs) -> bool:
    before = graph.code
    return project_from_factors(graph, **kwargs) == 0 and graph.code == before


def test_a_gradient_read_elsewhere_is_still_formed():
    def also_returned(dy, x, p):
        g = torch.mm(dy.t(), x)
        return g @ p, g

    inputs = _inputs(6, 24, 16, 3, tall=True)
    assert _unchanged(make_fx(also_returned, tracing_mode="fake")(*inputs), inputs=3, positions=[2])


def test_the_order_that_takes_more_multiplications_is_left_alone():
    # 64 rows into a 4 x 4 gradient of rank 3: formed, 4*4*(64+3) = 1072; from the factors, 3*64*8 = 1536.
    inputs = _inputs(64, 4, 4, 3, tall=True)
    assert _unchanged(make_fx(_tall, tracing_mode="fake")(*inputs), inputs=3, positions=[2])


def test_only_the_inputs_named_as_projections_are_taken_for_one():
    inputs = _inputs(6, 24, 16, 3, tall=True)
    assert _unchanged(make_fx(_tall, tracing_mode="fake")(*inputs), inputs=3, positions=[0])
    # Another graph's inputs (a count that differs): nothing is assumed about their order.
    assert _unchanged(make_fx(_tall, tracing_mode="fake")(*inputs), inputs=4, positions=[2])


def test_a_galore_step_never_forms_the_projected_weights_gradients():
    torch.manual_seed(0)
    # 0.weight is 32 x 64 (wide), 2.weight 48 x 32 (tall): both projected at rank 8; 4.weight stays dense.
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy.galore(rank=8, update_proj_gap=100), compiler="aot_eager")
    for _ in range(2):
        step(torch.randn(16, 64), torch.randn(16, 4))

    ordinary = _products(step.graphs["step"]["aten"].module)
    refresh = _products(step.graphs["refresh"]["aten"].module)
    for shape in [(32, 64), (48, 32)]:
        # The refresh takes an SVD of the gradient, so forms it; an ordinary step only projects
        # back the update (one product of the weight's shape).
        assert (ordinary.count(shape), refresh.count(shape)) == (1, 2), shape
    assert ordinary.count((4, 48)) == refresh.count((4, 48)) == 1

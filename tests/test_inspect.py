"""step.graphs, explain(), diffs and DOT export describe what the compiler did."""

import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.graph import Role
from lordo_compile.models import MLP
from lordo_compile.testing import training_step


@pytest.fixture
def step():
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = torch.optim.AdamW(
        [{"params": [model.net[0].weight], "lr": 1e-3}, {"params": [model.net[0].bias, *model.net[2].parameters()]}]
    )

    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)

    compiled = lc.compile(train_step, lc.Policy(on_nonfinite=None), compiler="aot_eager")
    compiled(torch.randn(4, 8), torch.randn(4, 2))
    return compiled


def test_every_stage_is_recorded_and_printable(step):
    stages = step.graphs["step"]
    assert list(stages) == ["captured", "identity", "lowered", "aten"]
    for view in stages.values():
        text = str(view)
        assert text.startswith('# graph "step" after ')
        assert "/" not in text.replace(" / ", "")  # no file paths
    assert "lordo.adamw" in stages["captured"].text
    assert "lordo.adamw" not in stages["lowered"].text
    assert "ops.optim.adamw" in stages["lowered"].text


def test_every_node_has_the_role_of_what_it_computes(step):
    graph = step.graphs["step"]["captured"].train_graph
    # Role.OTHER is the catch-all: only dynamo's grad-mode switches belong there.
    assert Counter(node.meta["lordo_role"] for node in graph.nodes()) == {
        Role.PARAMETER: 4, Role.BATCH_INPUT: 2, Role.FORWARD: 3, Role.LOSS: 1, Role.BACKWARD: 1, Role.GRADIENT: 4,
        Role.HYPERPARAMETER: 2 * (1 + 5),  # per group: its tuple, lr, beta1, beta2, eps, weight_decay
        Role.OPTIMIZER_STATE: 4 * 3,  # exp_avg, exp_avg_sq, step
        Role.OPTIMIZER_UPDATE: 4 * (1 + 4),  # lordo.adamw and its four outputs
        Role.WRITEBACK: 4 * 4, Role.OUTPUT: 2, Role.OTHER: 2,
    }
    assert {node.target for node in graph.nodes(Role.OTHER)} == {torch._C._set_grad_enabled}
    updates = graph.updates()
    assert [u.param for u in updates] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    # The two groups' hyperparameters are separate inputs.
    lr_inputs = {u.input("lr").name for u in updates}
    assert lr_inputs == {"group0_lr", "group1_lr"}


def test_explain_says_what_happened(step):
    text = step.explain()
    assert "captures: 1 (recompiles: 0)" in text
    assert "4x lordo.adamw" in text
    assert "identity: no change" in text
    assert "state added by passes: 0 tensors, 0 bytes" in text


def test_dot_export(step):
    dot = step.graphs["step"]["captured"].to_dot()
    assert dot.startswith('digraph "step.captured"')
    assert '"grad_net_0_weight" -> "adamw_net_0_weight"' in dot


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed")
def test_svg_export(step):
    pytest.importorskip("pydot")
    assert "<svg" in step.graphs["step"]["captured"].to_svg()


def test_svg_without_graphviz_says_how_to_get_it(step, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pydot", None)
    with pytest.raises(ImportError, match="lordo-compile\\[dot\\]"):
        step.graphs["step"]["captured"].to_svg()

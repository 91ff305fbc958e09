"""The example pass in examples/: a user's own rewrite, tested the way ours are."""

import importlib.util
import pathlib
import sys

import expecttest
import pytest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from common import max_rel_diff, mlp_problem
from lordo_compile.models import MLP
from lordo_compile.testing import capture, fresh_inductor_cache, stage_diff, training_step

_PATH = pathlib.Path(__file__).parents[1] / "examples" / "clip_grad_norm_pass.py"
_spec = importlib.util.spec_from_file_location("clip_grad_norm_pass", _PATH)
example = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = example  # dataclasses look their module up there
_spec.loader.exec_module(example)


def test_matches_torch_clip_grad_norm():
    model, loss_fn, batches = mlp_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = lc.Policy(extra_passes=[example.ClipGradNorm(max_norm=0.1)])
    step = lc.compile(training_step(loss_fn, opt), policy, compiler="aot_eager")
    reference, reference_loss, _ = mlp_problem()
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for x, y in batches:
        step(x, y)
        reference_loss(x, y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        reference_opt.step()
        reference_opt.zero_grad()
    assert max_rel_diff(list(reference.parameters()), list(model.parameters())) <= 1e-5


class TestClipGradNormGraph(expecttest.TestCase):
    def test_rewrite(self):
        torch.manual_seed(0)
        model = MLP((8, 16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)
        step = capture(train_step, torch.randn(4, 8), torch.randn(4, 2),
                       policy=lc.Policy(extra_passes=[example.ClipGradNorm(max_norm=1.0)]))
        self.assertExpectedInline(stage_diff(step, "captured", "clip_grad_norm"), """\
--- captured
+++ clip_grad_norm
@@ -19,9 +19,15 @@
 group0_weight_decay = group0_hyperparameters[1]  # f64[]  hyperparameter
-sgd_net_0_weight = lordo.sgd(net_0_weight, grad_net_0_weight, group0_lr, group0_weight_decay, maximize=False)  # f32[16, 8]  optimizer_update
+global_grad_norm = clip_grad_norm_pass.global_grad_norm([grad_net_0_weight, grad_net_0_bias, grad_net_2_weight, grad_net_2_bias])  # f32[]  optimizer_update  <clip_grad_norm>
+clip_coefficient = clip_grad_norm_pass.clip_coefficient(global_grad_norm, max_norm=1.0)  # f32[]  optimizer_update  <clip_grad_norm>
+clipped_grad_net_0_weight = mul(grad_net_0_weight, clip_coefficient)  # f32[16, 8]  optimizer_update  <clip_grad_norm>
+sgd_net_0_weight = lordo.sgd(net_0_weight, clipped_grad_net_0_weight, group0_lr, group0_weight_decay, maximize=False)  # f32[16, 8]  optimizer_update
 write_param_net_0_weight = net_0_weight.copy_(sgd_net_0_weight)  # f32[16, 8]  writeback  [param]
-sgd_net_0_bias = lordo.sgd(net_0_bias, grad_net_0_bias, group0_lr, group0_weight_decay, maximize=False)  # f32[16]  optimizer_update
+clipped_grad_net_0_bias = mul(grad_net_0_bias, clip_coefficient)  # f32[16]  optimizer_update  <clip_grad_norm>
+sgd_net_0_bias = lordo.sgd(net_0_bias, clipped_grad_net_0_bias, group0_lr, group0_weight_decay, maximize=False)  # f32[16]  optimizer_update
 write_param_net_0_bias = net_0_bias.copy_(sgd_net_0_bias)  # f32[16]  writeback  [param]
-sgd_net_2_weight = lordo.sgd(net_2_weight, grad_net_2_weight, group0_lr, group0_weight_decay, maximize=False)  # f32[2, 16]  optimizer_update
+clipped_grad_net_2_weight = mul(grad_net_2_weight, clip_coefficient)  # f32[2, 16]  optimizer_update  <clip_grad_norm>
+sgd_net_2_weight = lordo.sgd(net_2_weight, clipped_grad_net_2_weight, group0_lr, group0_weight_decay, maximize=False)  # f32[2, 16]  optimizer_update
 write_param_net_2_weight = net_2_weight.copy_(sgd_net_2_weight)  # f32[2, 16]  writeback  [param]
-sgd_net_2_bias = lordo.sgd(net_2_bias, grad_net_2_bias, group0_lr, group0_weight_decay, maximize=False)  # f32[2]  optimizer_update
+clipped_grad_net_2_bias = mul(grad_net_2_bias, clip_coefficient)  # f32[2]  optimizer_update  <clip_grad_norm>
+sgd_net_2_bias = lordo.sgd(net_2_bias, clipped_grad_net_2_bias, group0_lr, group0_weight_decay, maximize=False)  # f32[2]  optimizer_update
 write_param_net_2_bias = net_2_bias.copy_(sgd_net_2_bias)  # f32[2]  writeback  [param]
""")


@pytest.mark.inductor
def test_inductor_runs_the_pass_in_a_fresh_cache():
    model, loss_fn, batches = mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    policy = lc.Policy(extra_passes=[example.ClipGradNorm(max_norm=0.1)])
    with fresh_inductor_cache():
        step = lc.compile(training_step(loss_fn, opt), policy, compiler="inductor")
        step(*batches[0])
    assert "clip_grad_norm" in step.graphs["step"]
    assert any("global_grad_norm" in line for line in step.graphs["step"]["clip_grad_norm"].text.splitlines())

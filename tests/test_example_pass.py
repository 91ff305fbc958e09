"""The example pass in examples/: a user's own rewrite, tested the way ours are."""

import importlib.util
import pathlib
import re
import sys

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import lordo_compile as lc
from common import assert_close, mlp_problem, named_parameters
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
    assert_close(named_parameters(model), named_parameters(reference))


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
def test_inductor_compiles_the_pass_in_a_fresh_cache():
    model, loss_fn, batches = mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    policy = lc.Policy(extra_passes=[example.ClipGradNorm(max_norm=0.37)])
    with fresh_inductor_cache():
        step = lc.compile(training_step(loss_fn, opt), policy, compiler="inductor")
        _, sources = run_and_get_code(step, *batches[0])
    code = "\n".join(sources)
    # The generated C++ computes the global norm (SGD alone takes no square root) and the
    # clip coefficient max_norm / (norm + 1e-6), with this run's max_norm.
    kernels = re.findall(r"^(cpp_fused_\w+) = ", code, flags=re.M)
    assert any("linalg_vector_norm" in k and "clamp" in k for k in kernels), kernels
    assert "std::sqrt" in code
    assert "static_cast<float>(0.37)" in code and "static_cast<float>(1e-06)" in code

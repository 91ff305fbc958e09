"""Snapshots of the fake-quant pass (forward rewrite) and CAGE's optimizer rewrite on an MLP."""

import expecttest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.testing import capture, stage_diff, training_step


def _step(fake_quant):
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)
    return capture(train_step, torch.randn(4, 8), torch.randn(4, 2), policy=lc.Policy(fake_quant=fake_quant))


class TestFakeQuantGraphs(expecttest.TestCase):
    def test_forward_reads_quantized_weights_and_activations(self):
        step = _step(lc.FakeQuant(bits=4, quantizer="absmax", group_size=8, activation_bits=8))
        self.assertExpectedInline(stage_diff(step, "captured", "fake_quant"), """\
--- captured
+++ fake_quant
@@ -19,5 +19,9 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
-input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
+fake_quantize_net_0_weight = lordo.fake_quantize(net_0_weight, bits=4, quantizer='absmax', group_size=8, hadamard=False, ste='identity')  # f32[16, 8]  forward  <fake_quant>
+fake_quantize_input_net_0_weight = lordo.fake_quantize(x, bits=8, quantizer='absmax', group_size=0, hadamard=False, ste='identity')  # f32[4, 8]  forward  <fake_quant>
+input_1 = torch._C._nn.linear(fake_quantize_input_net_0_weight, fake_quantize_net_0_weight, net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
-input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
+fake_quantize_net_2_weight = lordo.fake_quantize(net_2_weight, bits=4, quantizer='absmax', group_size=8, hadamard=False, ste='identity')  # f32[2, 16]  forward  <fake_quant>
+fake_quantize_input_net_2_weight = lordo.fake_quantize(input_2, bits=8, quantizer='absmax', group_size=0, hadamard=False, ste='identity')  # f32[4, 16]  forward  <fake_quant>
+input_3 = torch._C._nn.linear(fake_quantize_input_net_2_weight, fake_quantize_net_2_weight, net_2_bias)  # f32[4, 2]  forward
 loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
""")

    def test_cage_decoupled_correction(self):
        step = _step(lc.FakeQuant(bits=3, correction=lc.CAGE(lam=10.0, total_steps=100)))
        # The forward's reads at stage FORWARD, the correction after the update at stage UPDATE.
        self.assertExpectedInline(stage_diff(step, "captured", "fake_quant:update"), """\
--- captured
+++ fake_quant:update
@@ -19,5 +19,10 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
-input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
+fake_quant_step: i64[]  optimizer_state  [fake_quant.step]  <fake_quant>
+cage_lambda = lordo.cage_lambda(fake_quant_step, lam=10.0, silence_steps=80, ramp_steps=20, constant=False)  # f64[]  optimizer_update  <fake_quant>
+next_fake_quant_step = aten.add.Scalar(fake_quant_step, 1)  # i64[]  optimizer_update  <fake_quant>
+fake_quantize_net_0_weight = lordo.fake_quantize(net_0_weight, bits=3, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[16, 8]  forward  <fake_quant>
+input_1 = torch._C._nn.linear(x, fake_quantize_net_0_weight, net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
-input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
+fake_quantize_net_2_weight = lordo.fake_quantize(net_2_weight, bits=3, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[2, 16]  forward  <fake_quant>
+input_3 = torch._C._nn.linear(input_2, fake_quantize_net_2_weight, net_2_bias)  # f32[4, 2]  forward
 loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
@@ -36,2 +41,3 @@
 new_param_net_0_weight = adamw_net_0_weight[0]  # f32[16, 8]  optimizer_update
+cage_param_net_0_weight = lordo.cage_decoupled(new_param_net_0_weight, net_0_weight, fake_quantize_net_0_weight, cage_lambda, group0_lr)  # f32[16, 8]  optimizer_update  <fake_quant>
 new_exp_avg_net_0_weight = adamw_net_0_weight[1]  # f32[16, 8]  optimizer_update
@@ -39,3 +45,3 @@
 new_step_net_0_weight = adamw_net_0_weight[3]  # f32[]  optimizer_update
-write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 8]  writeback  [param]
+write_param_net_0_weight = net_0_weight.copy_(cage_param_net_0_weight)  # f32[16, 8]  writeback  [param]
 write_exp_avg_net_0_weight = exp_avg_net_0_weight.copy_(new_exp_avg_net_0_weight)  # f32[16, 8]  writeback  [exp_avg]
@@ -54,2 +60,3 @@
 new_param_net_2_weight = adamw_net_2_weight[0]  # f32[2, 16]  optimizer_update
+cage_param_net_2_weight = lordo.cage_decoupled(new_param_net_2_weight, net_2_weight, fake_quantize_net_2_weight, cage_lambda, group0_lr)  # f32[2, 16]  optimizer_update  <fake_quant>
 new_exp_avg_net_2_weight = adamw_net_2_weight[1]  # f32[2, 16]  optimizer_update
@@ -57,3 +64,3 @@
 new_step_net_2_weight = adamw_net_2_weight[3]  # f32[]  optimizer_update
-write_param_net_2_weight = net_2_weight.copy_(new_param_net_2_weight)  # f32[2, 16]  writeback  [param]
+write_param_net_2_weight = net_2_weight.copy_(cage_param_net_2_weight)  # f32[2, 16]  writeback  [param]
 write_exp_avg_net_2_weight = exp_avg_net_2_weight.copy_(new_exp_avg_net_2_weight)  # f32[2, 16]  writeback  [exp_avg]
@@ -72,2 +79,3 @@
 detach = loss.detach()  # f32[]  output
+write_fake_quant_step = fake_quant_step.copy_(next_fake_quant_step)  # i64[]  writeback  [fake_quant.step]  <fake_quant>
 return (detach,)
""")

    def test_cage_coupled_correction(self):
        step = _step(lc.FakeQuant(bits=3, correction=lc.CAGE(lam=10.0, total_steps=100, form="coupled")))
        # The forward's reads at stage FORWARD, the correction into the gradient at stage GRADIENT.
        self.assertExpectedInline(stage_diff(step, "captured", "fake_quant:gradient"), """\
--- captured
+++ fake_quant:gradient
@@ -19,5 +19,10 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
-input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
+fake_quant_step: i64[]  optimizer_state  [fake_quant.step]  <fake_quant>
+cage_lambda = lordo.cage_lambda(fake_quant_step, lam=10.0, silence_steps=80, ramp_steps=20, constant=False)  # f64[]  optimizer_update  <fake_quant>
+next_fake_quant_step = aten.add.Scalar(fake_quant_step, 1)  # i64[]  optimizer_update  <fake_quant>
+fake_quantize_net_0_weight = lordo.fake_quantize(net_0_weight, bits=3, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[16, 8]  forward  <fake_quant>
+input_1 = torch._C._nn.linear(x, fake_quantize_net_0_weight, net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
-input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
+fake_quantize_net_2_weight = lordo.fake_quantize(net_2_weight, bits=3, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[2, 16]  forward  <fake_quant>
+input_3 = torch._C._nn.linear(input_2, fake_quantize_net_2_weight, net_2_bias)  # f32[4, 2]  forward
 loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
@@ -25,4 +30,6 @@
 grad_net_0_weight = grad[0]  # f32[16, 8]  gradient
+cage_grad_net_0_weight = lordo.cage_coupled(grad_net_0_weight, net_0_weight, fake_quantize_net_0_weight, cage_lambda)  # f32[16, 8]  optimizer_update  <fake_quant>
 grad_net_0_bias = grad[1]  # f32[16]  gradient
 grad_net_2_weight = grad[2]  # f32[2, 16]  gradient
+cage_grad_net_2_weight = lordo.cage_coupled(grad_net_2_weight, net_2_weight, fake_quantize_net_2_weight, cage_lambda)  # f32[2, 16]  optimizer_update  <fake_quant>
 grad_net_2_bias = grad[3]  # f32[2]  gradient
@@ -34,3 +41,3 @@
 group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
-adamw_net_0_weight = lordo.adamw(net_0_weight, grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 8], f32[16, 8], f32[16, 8], f32[])  optimizer_update
+adamw_net_0_weight = lordo.adamw(net_0_weight, cage_grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 8], f32[16, 8], f32[16, 8], f32[])  optimizer_update
 new_param_net_0_weight = adamw_net_0_weight[0]  # f32[16, 8]  optimizer_update
@@ -52,3 +59,3 @@
 write_step_net_0_bias = step_net_0_bias.copy_(new_step_net_0_bias)  # f32[]  writeback  [step]
-adamw_net_2_weight = lordo.adamw(net_2_weight, grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
+adamw_net_2_weight = lordo.adamw(net_2_weight, cage_grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
 new_param_net_2_weight = adamw_net_2_weight[0]  # f32[2, 16]  optimizer_update
@@ -72,2 +79,3 @@
 detach = loss.detach()  # f32[]  output
+write_fake_quant_step = fake_quant_step.copy_(next_fake_quant_step)  # i64[]  writeback  [fake_quant.step]  <fake_quant>
 return (detach,)
""")

"""Snapshots of the EMA-Nesterov pass on an MLP: alone, after CAGE, and in LoRDO's sync phase."""

import expecttest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.testing import capture, stage_diff, training_step

LOOKAHEAD = lc.EMANesterov(beta=0.5, gamma=0.9, warmup_steps=10, decay_start=90)


def _step(**policy):
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)
    return capture(train_step, torch.randn(4, 8), torch.randn(4, 2), policy=lc.Policy(ema_nesterov=LOOKAHEAD, **policy))


class TestEMANesterovGraphs(expecttest.TestCase):
    def test_forward_and_update_read_the_lookahead_point(self):
        step = _step()
        self.assertExpectedInline(stage_diff(step, "captured", "ema_nesterov"), """\
--- captured
+++ ema_nesterov
@@ -19,5 +19,16 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
-input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
+ema_nesterov_step: i64[]  optimizer_state  [ema_nesterov.step]  <ema_nesterov>
+ema_nesterov_direction_net_0_weight: f32[16, 8]  optimizer_state  [ema_nesterov.direction.net.0.weight]  <ema_nesterov>
+ema_nesterov_direction_net_0_bias: f32[16]  optimizer_state  [ema_nesterov.direction.net.0.bias]  <ema_nesterov>
+ema_nesterov_direction_net_2_weight: f32[2, 16]  optimizer_state  [ema_nesterov.direction.net.2.weight]  <ema_nesterov>
+ema_nesterov_direction_net_2_bias: f32[2]  optimizer_state  [ema_nesterov.direction.net.2.bias]  <ema_nesterov>
+ema_nesterov_beta = lordo.ema_nesterov_beta(ema_nesterov_step, beta=0.5, warmup_steps=10, decay_start=90)  # f32[]  optimizer_update  <ema_nesterov>
+next_ema_nesterov_step = aten.add.Scalar(ema_nesterov_step, 1)  # i64[]  optimizer_update  <ema_nesterov>
+lookahead_net_0_weight = aten.addcmul(net_0_weight, ema_nesterov_direction_net_0_weight, ema_nesterov_beta)  # f32[16, 8]  forward  <ema_nesterov>
+lookahead_net_0_bias = aten.addcmul(net_0_bias, ema_nesterov_direction_net_0_bias, ema_nesterov_beta)  # f32[16]  forward  <ema_nesterov>
+input_1 = torch._C._nn.linear(x, lookahead_net_0_weight, lookahead_net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
-input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
+lookahead_net_2_weight = aten.addcmul(net_2_weight, ema_nesterov_direction_net_2_weight, ema_nesterov_beta)  # f32[2, 16]  forward  <ema_nesterov>
+lookahead_net_2_bias = aten.addcmul(net_2_bias, ema_nesterov_direction_net_2_bias, ema_nesterov_beta)  # f32[2]  forward  <ema_nesterov>
+input_3 = torch._C._nn.linear(input_2, lookahead_net_2_weight, lookahead_net_2_bias)  # f32[4, 2]  forward
 loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
@@ -34,3 +45,3 @@
 group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
-adamw_net_0_weight = lordo.adamw(net_0_weight, grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 8], f32[16, 8], f32[16, 8], f32[])  optimizer_update
+adamw_net_0_weight = lordo.adamw(lookahead_net_0_weight, grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 8], f32[16, 8], f32[16, 8], f32[])  optimizer_update
 new_param_net_0_weight = adamw_net_0_weight[0]  # f32[16, 8]  optimizer_update
@@ -39,2 +50,4 @@
 new_step_net_0_weight = adamw_net_0_weight[3]  # f32[]  optimizer_update
+new_direction_net_0_weight = lordo.ema_nesterov_direction(ema_nesterov_direction_net_0_weight, new_param_net_0_weight, net_0_weight, gamma=0.9)  # f32[16, 8]  optimizer_update  <ema_nesterov>
+write_direction_net_0_weight = ema_nesterov_direction_net_0_weight.copy_(new_direction_net_0_weight)  # f32[16, 8]  writeback  [ema_nesterov.direction.net.0.weight]  <ema_nesterov>
 write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 8]  writeback  [param]
@@ -43,3 +56,3 @@
 write_step_net_0_weight = step_net_0_weight.copy_(new_step_net_0_weight)  # f32[]  writeback  [step]
-adamw_net_0_bias = lordo.adamw(net_0_bias, grad_net_0_bias, exp_avg_net_0_bias, exp_avg_sq_net_0_bias, step_net_0_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16], f32[16], f32[16], f32[])  optimizer_update
+adamw_net_0_bias = lordo.adamw(lookahead_net_0_bias, grad_net_0_bias, exp_avg_net_0_bias, exp_avg_sq_net_0_bias, step_net_0_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16], f32[16], f32[16], f32[])  optimizer_update
 new_param_net_0_bias = adamw_net_0_bias[0]  # f32[16]  optimizer_update
@@ -48,2 +61,4 @@
 new_step_net_0_bias = adamw_net_0_bias[3]  # f32[]  optimizer_update
+new_direction_net_0_bias = lordo.ema_nesterov_direction(ema_nesterov_direction_net_0_bias, new_param_net_0_bias, net_0_bias, gamma=0.9)  # f32[16]  optimizer_update  <ema_nesterov>
+write_direction_net_0_bias = ema_nesterov_direction_net_0_bias.copy_(new_direction_net_0_bias)  # f32[16]  writeback  [ema_nesterov.direction.net.0.bias]  <ema_nesterov>
 write_param_net_0_bias = net_0_bias.copy_(new_param_net_0_bias)  # f32[16]  writeback  [param]
@@ -52,3 +67,3 @@
 write_step_net_0_bias = step_net_0_bias.copy_(new_step_net_0_bias)  # f32[]  writeback  [step]
-adamw_net_2_weight = lordo.adamw(net_2_weight, grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
+adamw_net_2_weight = lordo.adamw(lookahead_net_2_weight, grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
 new_param_net_2_weight = adamw_net_2_weight[0]  # f32[2, 16]  optimizer_update
@@ -57,2 +72,4 @@
 new_step_net_2_weight = adamw_net_2_weight[3]  # f32[]  optimizer_update
+new_direction_net_2_weight = lordo.ema_nesterov_direction(ema_nesterov_direction_net_2_weight, new_param_net_2_weight, net_2_weight, gamma=0.9)  # f32[2, 16]  optimizer_update  <ema_nesterov>
+write_direction_net_2_weight = ema_nesterov_direction_net_2_weight.copy_(new_direction_net_2_weight)  # f32[2, 16]  writeback  [ema_nesterov.direction.net.2.weight]  <ema_nesterov>
 write_param_net_2_weight = net_2_weight.copy_(new_param_net_2_weight)  # f32[2, 16]  writeback  [param]
@@ -61,3 +78,3 @@
 write_step_net_2_weight = step_net_2_weight.copy_(new_step_net_2_weight)  # f32[]  writeback  [step]
-adamw_net_2_bias = lordo.adamw(net_2_bias, grad_net_2_bias, exp_avg_net_2_bias, exp_avg_sq_net_2_bias, step_net_2_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2], f32[2], f32[2], f32[])  optimizer_update
+adamw_net_2_bias = lordo.adamw(lookahead_net_2_bias, grad_net_2_bias, exp_avg_net_2_bias, exp_avg_sq_net_2_bias, step_net_2_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2], f32[2], f32[2], f32[])  optimizer_update
 new_param_net_2_bias = adamw_net_2_bias[0]  # f32[2]  optimizer_update
@@ -66,2 +83,4 @@
 new_step_net_2_bias = adamw_net_2_bias[3]  # f32[]  optimizer_update
+new_direction_net_2_bias = lordo.ema_nesterov_direction(ema_nesterov_direction_net_2_bias, new_param_net_2_bias, net_2_bias, gamma=0.9)  # f32[2]  optimizer_update  <ema_nesterov>
+write_direction_net_2_bias = ema_nesterov_direction_net_2_bias.copy_(new_direction_net_2_bias)  # f32[2]  writeback  [ema_nesterov.direction.net.2.bias]  <ema_nesterov>
 write_param_net_2_bias = net_2_bias.copy_(new_param_net_2_bias)  # f32[2]  writeback  [param]
@@ -72,2 +91,3 @@
 detach = loss.detach()  # f32[]  output
+write_ema_nesterov_step = ema_nesterov_step.copy_(next_ema_nesterov_step)  # i64[]  writeback  [ema_nesterov.step]  <ema_nesterov>
 return (detach,)
""")

    def test_after_cage_the_corrected_update_moves_d(self):
        step = _step(fake_quant=lc.FakeQuant(bits=4, correction=lc.CAGE(total_steps=100)))
        self.assertExpectedInline(stage_diff(step, "fake_quant", "ema_nesterov"), """\
--- fake_quant
+++ ema_nesterov
@@ -19,7 +19,21 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
-fake_quantize_net_0_weight = lordo.fake_quantize(net_0_weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[16, 8]  forward  <fake_quant>
-input_1 = torch._C._nn.linear(x, fake_quantize_net_0_weight, net_0_bias)  # f32[4, 16]  forward
+fake_quant_step: i64[]  optimizer_state  [fake_quant.step]  <fake_quant>
+ema_nesterov_step: i64[]  optimizer_state  [ema_nesterov.step]  <ema_nesterov>
+ema_nesterov_direction_net_0_weight: f32[16, 8]  optimizer_state  [ema_nesterov.direction.net.0.weight]  <ema_nesterov>
+ema_nesterov_direction_net_0_bias: f32[16]  optimizer_state  [ema_nesterov.direction.net.0.bias]  <ema_nesterov>
+ema_nesterov_direction_net_2_weight: f32[2, 16]  optimizer_state  [ema_nesterov.direction.net.2.weight]  <ema_nesterov>
+ema_nesterov_direction_net_2_bias: f32[2]  optimizer_state  [ema_nesterov.direction.net.2.bias]  <ema_nesterov>
+ema_nesterov_beta = lordo.ema_nesterov_beta(ema_nesterov_step, beta=0.5, warmup_steps=10, decay_start=90)  # f32[]  optimizer_update  <ema_nesterov>
+next_ema_nesterov_step = aten.add.Scalar(ema_nesterov_step, 1)  # i64[]  optimizer_update  <ema_nesterov>
+cage_lambda = lordo.cage_lambda(fake_quant_step, lam=10.0, silence_steps=80, ramp_steps=20, constant=False)  # f64[]  optimizer_update  <fake_quant>
+next_fake_quant_step = aten.add.Scalar(fake_quant_step, 1)  # i64[]  optimizer_update  <fake_quant>
+lookahead_net_0_weight = aten.addcmul(net_0_weight, ema_nesterov_direction_net_0_weight, ema_nesterov_beta)  # f32[16, 8]  forward  <ema_nesterov>
+fake_quantize_net_0_weight = lordo.fake_quantize(lookahead_net_0_weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[16, 8]  forward  <fake_quant>
+lookahead_net_0_bias = aten.addcmul(net_0_bias, ema_nesterov_direction_net_0_bias, ema_nesterov_beta)  # f32[16]  forward  <ema_nesterov>
+input_1 = torch._C._nn.linear(x, fake_quantize_net_0_weight, lookahead_net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
-fake_quantize_net_2_weight = lordo.fake_quantize(net_2_weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[2, 16]  forward  <fake_quant>
-input_3 = torch._C._nn.linear(input_2, fake_quantize_net_2_weight, net_2_bias)  # f32[4, 2]  forward
+lookahead_net_2_weight = aten.addcmul(net_2_weight, ema_nesterov_direction_net_2_weight, ema_nesterov_beta)  # f32[2, 16]  forward  <ema_nesterov>
+fake_quantize_net_2_weight = lordo.fake_quantize(lookahead_net_2_weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[2, 16]  forward  <fake_quant>
+lookahead_net_2_bias = aten.addcmul(net_2_bias, ema_nesterov_direction_net_2_bias, ema_nesterov_beta)  # f32[2]  forward  <ema_nesterov>
+input_3 = torch._C._nn.linear(input_2, fake_quantize_net_2_weight, lookahead_net_2_bias)  # f32[4, 2]  forward
 loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
@@ -36,4 +50,5 @@
 group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
-adamw_net_0_weight = lordo.adamw(net_0_weight, grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 8], f32[16, 8], f32[16, 8], f32[])  optimizer_update
+adamw_net_0_weight = lordo.adamw(lookahead_net_0_weight, grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 8], f32[16, 8], f32[16, 8], f32[])  optimizer_update
 new_param_net_0_weight = adamw_net_0_weight[0]  # f32[16, 8]  optimizer_update
+cage_param_net_0_weight = lordo.cage_decoupled(new_param_net_0_weight, lookahead_net_0_weight, fake_quantize_net_0_weight, cage_lambda, group0_lr)  # f32[16, 8]  optimizer_update  <fake_quant>
 new_exp_avg_net_0_weight = adamw_net_0_weight[1]  # f32[16, 8]  optimizer_update
@@ -41,3 +56,5 @@
 new_step_net_0_weight = adamw_net_0_weight[3]  # f32[]  optimizer_update
-write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 8]  writeback  [param]
+new_direction_net_0_weight = lordo.ema_nesterov_direction(ema_nesterov_direction_net_0_weight, cage_param_net_0_weight, net_0_weight, gamma=0.9)  # f32[16, 8]  optimizer_update  <ema_nesterov>
+write_direction_net_0_weight = ema_nesterov_direction_net_0_weight.copy_(new_direction_net_0_weight)  # f32[16, 8]  writeback  [ema_nesterov.direction.net.0.weight]  <ema_nesterov>
+write_param_net_0_weight = net_0_weight.copy_(cage_param_net_0_weight)  # f32[16, 8]  writeback  [param]
 write_exp_avg_net_0_weight = exp_avg_net_0_weight.copy_(new_exp_avg_net_0_weight)  # f32[16, 8]  writeback  [exp_avg]
@@ -45,3 +62,3 @@
 write_step_net_0_weight = step_net_0_weight.copy_(new_step_net_0_weight)  # f32[]  writeback  [step]
-adamw_net_0_bias = lordo.adamw(net_0_bias, grad_net_0_bias, exp_avg_net_0_bias, exp_avg_sq_net_0_bias, step_net_0_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16], f32[16], f32[16], f32[])  optimizer_update
+adamw_net_0_bias = lordo.adamw(lookahead_net_0_bias, grad_net_0_bias, exp_avg_net_0_bias, exp_avg_sq_net_0_bias, step_net_0_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16], f32[16], f32[16], f32[])  optimizer_update
 new_param_net_0_bias = adamw_net_0_bias[0]  # f32[16]  optimizer_update
@@ -50,2 +67,4 @@
 new_step_net_0_bias = adamw_net_0_bias[3]  # f32[]  optimizer_update
+new_direction_net_0_bias = lordo.ema_nesterov_direction(ema_nesterov_direction_net_0_bias, new_param_net_0_bias, net_0_bias, gamma=0.9)  # f32[16]  optimizer_update  <ema_nesterov>
+write_direction_net_0_bias = ema_nesterov_direction_net_0_bias.copy_(new_direction_net_0_bias)  # f32[16]  writeback  [ema_nesterov.direction.net.0.bias]  <ema_nesterov>
 write_param_net_0_bias = net_0_bias.copy_(new_param_net_0_bias)  # f32[16]  writeback  [param]
@@ -54,4 +73,5 @@
 write_step_net_0_bias = step_net_0_bias.copy_(new_step_net_0_bias)  # f32[]  writeback  [step]
-adamw_net_2_weight = lordo.adamw(net_2_weight, grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
+adamw_net_2_weight = lordo.adamw(lookahead_net_2_weight, grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
 new_param_net_2_weight = adamw_net_2_weight[0]  # f32[2, 16]  optimizer_update
+cage_param_net_2_weight = lordo.cage_decoupled(new_param_net_2_weight, lookahead_net_2_weight, fake_quantize_net_2_weight, cage_lambda, group0_lr)  # f32[2, 16]  optimizer_update  <fake_quant>
 new_exp_avg_net_2_weight = adamw_net_2_weight[1]  # f32[2, 16]  optimizer_update
@@ -59,3 +79,5 @@
 new_step_net_2_weight = adamw_net_2_weight[3]  # f32[]  optimizer_update
-write_param_net_2_weight = net_2_weight.copy_(new_param_net_2_weight)  # f32[2, 16]  writeback  [param]
+new_direction_net_2_weight = lordo.ema_nesterov_direction(ema_nesterov_direction_net_2_weight, cage_param_net_2_weight, net_2_weight, gamma=0.9)  # f32[2, 16]  optimizer_update  <ema_nesterov>
+write_direction_net_2_weight = ema_nesterov_direction_net_2_weight.copy_(new_direction_net_2_weight)  # f32[2, 16]  writeback  [ema_nesterov.direction.net.2.weight]  <ema_nesterov>
+write_param_net_2_weight = net_2_weight.copy_(cage_param_net_2_weight)  # f32[2, 16]  writeback  [param]
 write_exp_avg_net_2_weight = exp_avg_net_2_weight.copy_(new_exp_avg_net_2_weight)  # f32[2, 16]  writeback  [exp_avg]
@@ -63,3 +85,3 @@
 write_step_net_2_weight = step_net_2_weight.copy_(new_step_net_2_weight)  # f32[]  writeback  [step]
-adamw_net_2_bias = lordo.adamw(net_2_bias, grad_net_2_bias, exp_avg_net_2_bias, exp_avg_sq_net_2_bias, step_net_2_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2], f32[2], f32[2], f32[])  optimizer_update
+adamw_net_2_bias = lordo.adamw(lookahead_net_2_bias, grad_net_2_bias, exp_avg_net_2_bias, exp_avg_sq_net_2_bias, step_net_2_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2], f32[2], f32[2], f32[])  optimizer_update
 new_param_net_2_bias = adamw_net_2_bias[0]  # f32[2]  optimizer_update
@@ -68,2 +90,4 @@
 new_step_net_2_bias = adamw_net_2_bias[3]  # f32[]  optimizer_update
+new_direction_net_2_bias = lordo.ema_nesterov_direction(ema_nesterov_direction_net_2_bias, new_param_net_2_bias, net_2_bias, gamma=0.9)  # f32[2]  optimizer_update  <ema_nesterov>
+write_direction_net_2_bias = ema_nesterov_direction_net_2_bias.copy_(new_direction_net_2_bias)  # f32[2]  writeback  [ema_nesterov.direction.net.2.bias]  <ema_nesterov>
 write_param_net_2_bias = net_2_bias.copy_(new_param_net_2_bias)  # f32[2]  writeback  [param]
@@ -74,2 +98,4 @@
 detach = loss.detach()  # f32[]  output
+write_fake_quant_step = fake_quant_step.copy_(next_fake_quant_step)  # i64[]  writeback  [fake_quant.step]  <fake_quant>
+write_ema_nesterov_step = ema_nesterov_step.copy_(next_ema_nesterov_step)  # i64[]  writeback  [ema_nesterov.step]  <ema_nesterov>
 return (detach,)
""")

    def test_lordo_sync_phase_keeps_the_reset_out_of_d(self):
        step = _step(lordo=lc.LoRDO(rank=4, sync_every=4))
        self.assertExpectedInline(stage_diff(step, "lordo", "ema_nesterov", events="sync"), """\
--- lordo
+++ ema_nesterov
@@ -25,5 +25,16 @@
 lordo_sync_error_net_0_weight: f32[16, 8]  optimizer_state  [lordo.sync_error.net.0.weight]  <lordo>
-input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
+ema_nesterov_step: i64[]  optimizer_state  [ema_nesterov.step]  <ema_nesterov>
+ema_nesterov_direction_net_0_weight: f32[16, 8]  optimizer_state  [ema_nesterov.direction.net.0.weight]  <ema_nesterov>
+ema_nesterov_direction_net_0_bias: f32[16]  optimizer_state  [ema_nesterov.direction.net.0.bias]  <ema_nesterov>
+ema_nesterov_direction_net_2_weight: f32[2, 16]  optimizer_state  [ema_nesterov.direction.net.2.weight]  <ema_nesterov>
+ema_nesterov_direction_net_2_bias: f32[2]  optimizer_state  [ema_nesterov.direction.net.2.bias]  <ema_nesterov>
+ema_nesterov_beta = lordo.ema_nesterov_beta(ema_nesterov_step, beta=0.5, warmup_steps=10, decay_start=90)  # f32[]  optimizer_update  <ema_nesterov>
+next_ema_nesterov_step = aten.add.Scalar(ema_nesterov_step, 1)  # i64[]  optimizer_update  <ema_nesterov>
+lookahead_net_0_weight = aten.addcmul(net_0_weight, ema_nesterov_direction_net_0_weight, ema_nesterov_beta)  # f32[16, 8]  forward  <ema_nesterov>
+lookahead_net_0_bias = aten.addcmul(net_0_bias, ema_nesterov_direction_net_0_bias, ema_nesterov_beta)  # f32[16]  forward  <ema_nesterov>
+input_1 = torch._C._nn.linear(x, lookahead_net_0_weight, lookahead_net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
-input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
+lookahead_net_2_weight = aten.addcmul(net_2_weight, ema_nesterov_direction_net_2_weight, ema_nesterov_beta)  # f32[2, 16]  forward  <ema_nesterov>
+lookahead_net_2_bias = aten.addcmul(net_2_bias, ema_nesterov_direction_net_2_bias, ema_nesterov_beta)  # f32[2]  forward  <ema_nesterov>
+input_3 = torch._C._nn.linear(input_2, lookahead_net_2_weight, lookahead_net_2_bias)  # f32[4, 2]  forward
 loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
@@ -40,3 +51,3 @@
 group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
-lordo_adamw_net_0_weight = lordo.lordo_adamw(net_0_weight, grad_net_0_weight, lordo_u_net_0_weight, lordo_v_net_0_weight, lordo_error_net_0_weight, step_net_0_weight, lordo_projection_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, omega=0.7, mu=1.0, normalizer='column', full_rank_input='gradient', clip=0.0, weight_decay_at='before', tall=True, maximize=False)  # (f32[16, 8], f32[16, 4], f32[16, 4], f32[16, 8], f32[])  optimizer_update  <lordo>
+lordo_adamw_net_0_weight = lordo.lordo_adamw(lookahead_net_0_weight, grad_net_0_weight, lordo_u_net_0_weight, lordo_v_net_0_weight, lordo_error_net_0_weight, step_net_0_weight, lordo_projection_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, omega=0.7, mu=1.0, normalizer='column', full_rank_input='gradient', clip=0.0, weight_decay_at='before', tall=True, maximize=False)  # (f32[16, 8], f32[16, 4], f32[16, 4], f32[16, 8], f32[])  optimizer_update  <lordo>
 new_param_net_0_weight_1 = lordo_adamw_net_0_weight[0]  # f32[16, 8]  optimizer_update  <lordo>
@@ -49,5 +60,7 @@
 write_error_net_0_weight = lordo_error_net_0_weight.copy_(new_error_net_0_weight)  # f32[16, 8]  writeback  [error]  <lordo>
+new_direction_net_0_weight = lordo.ema_nesterov_direction(ema_nesterov_direction_net_0_weight, new_param_net_0_weight_1, net_0_weight, gamma=0.9)  # f32[16, 8]  optimizer_update  <ema_nesterov>
+write_direction_net_0_weight = ema_nesterov_direction_net_0_weight.copy_(new_direction_net_0_weight)  # f32[16, 8]  writeback  [ema_nesterov.direction.net.0.weight]  <ema_nesterov>
 write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight_1)  # f32[16, 8]  writeback  [param]
 write_step_net_0_weight = step_net_0_weight.copy_(new_step_net_0_weight_1)  # f32[]  writeback  [step]
-adamw_net_0_bias = lordo.adamw(net_0_bias, grad_net_0_bias, exp_avg_net_0_bias, exp_avg_sq_net_0_bias, step_net_0_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16], f32[16], f32[16], f32[])  optimizer_update
+adamw_net_0_bias = lordo.adamw(lookahead_net_0_bias, grad_net_0_bias, exp_avg_net_0_bias, exp_avg_sq_net_0_bias, step_net_0_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16], f32[16], f32[16], f32[])  optimizer_update
 new_param_net_0_bias = adamw_net_0_bias[0]  # f32[16]  optimizer_update
@@ -56,2 +69,4 @@
 new_step_net_0_bias = adamw_net_0_bias[3]  # f32[]  optimizer_update
+new_direction_net_0_bias = lordo.ema_nesterov_direction(ema_nesterov_direction_net_0_bias, new_param_net_0_bias, net_0_bias, gamma=0.9)  # f32[16]  optimizer_update  <ema_nesterov>
+write_direction_net_0_bias = ema_nesterov_direction_net_0_bias.copy_(new_direction_net_0_bias)  # f32[16]  writeback  [ema_nesterov.direction.net.0.bias]  <ema_nesterov>
 write_param_net_0_bias = net_0_bias.copy_(new_param_net_0_bias)  # f32[16]  writeback  [param]
@@ -60,3 +75,3 @@
 write_step_net_0_bias = step_net_0_bias.copy_(new_step_net_0_bias)  # f32[]  writeback  [step]
-adamw_net_2_weight = lordo.adamw(net_2_weight, grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
+adamw_net_2_weight = lordo.adamw(lookahead_net_2_weight, grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
 new_param_net_2_weight = adamw_net_2_weight[0]  # f32[2, 16]  optimizer_update
@@ -65,2 +80,4 @@
 new_step_net_2_weight = adamw_net_2_weight[3]  # f32[]  optimizer_update
+new_direction_net_2_weight = lordo.ema_nesterov_direction(ema_nesterov_direction_net_2_weight, new_param_net_2_weight, net_2_weight, gamma=0.9)  # f32[2, 16]  optimizer_update  <ema_nesterov>
+write_direction_net_2_weight = ema_nesterov_direction_net_2_weight.copy_(new_direction_net_2_weight)  # f32[2, 16]  writeback  [ema_nesterov.direction.net.2.weight]  <ema_nesterov>
 write_param_net_2_weight = net_2_weight.copy_(new_param_net_2_weight)  # f32[2, 16]  writeback  [param]
@@ -69,3 +86,3 @@
 write_step_net_2_weight = step_net_2_weight.copy_(new_step_net_2_weight)  # f32[]  writeback  [step]
-adamw_net_2_bias = lordo.adamw(net_2_bias, grad_net_2_bias, exp_avg_net_2_bias, exp_avg_sq_net_2_bias, step_net_2_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2], f32[2], f32[2], f32[])  optimizer_update
+adamw_net_2_bias = lordo.adamw(lookahead_net_2_bias, grad_net_2_bias, exp_avg_net_2_bias, exp_avg_sq_net_2_bias, step_net_2_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2], f32[2], f32[2], f32[])  optimizer_update
 new_param_net_2_bias = adamw_net_2_bias[0]  # f32[2]  optimizer_update
@@ -74,2 +91,4 @@
 new_step_net_2_bias = adamw_net_2_bias[3]  # f32[]  optimizer_update
+new_direction_net_2_bias = lordo.ema_nesterov_direction(ema_nesterov_direction_net_2_bias, new_param_net_2_bias, net_2_bias, gamma=0.9)  # f32[2]  optimizer_update  <ema_nesterov>
+write_direction_net_2_bias = ema_nesterov_direction_net_2_bias.copy_(new_direction_net_2_bias)  # f32[2]  writeback  [ema_nesterov.direction.net.2.bias]  <ema_nesterov>
 write_param_net_2_bias = net_2_bias.copy_(new_param_net_2_bias)  # f32[2]  writeback  [param]
@@ -80,2 +99,3 @@
 detach = loss.detach()  # f32[]  output
+write_ema_nesterov_step = ema_nesterov_step.copy_(next_ema_nesterov_step)  # i64[]  writeback  [ema_nesterov.step]  <ema_nesterov>
 return (detach,)
""")

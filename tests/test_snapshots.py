"""Snapshots of captured graphs, reviewed like code (EXPECTTEST_ACCEPT=1 rewrites them)."""

import expecttest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.testing import capture, stage_diff, stage_text
from lordo_compile.testing import training_step


def _mlp_step(make_optimizer, policy=None):
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = make_optimizer(model)

    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)

    return capture(train_step, torch.randn(4, 8), torch.randn(4, 2), policy=policy)


class TestCapturedGraphs(expecttest.TestCase):
    def test_mlp_sgd_momentum(self):
        step = _mlp_step(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
        self.assertExpectedInline(stage_text(step), """\
net_0_weight: f32[16, 8]  parameter
net_0_bias: f32[16]  parameter
x: f32[4, 8]  batch_input
net_2_weight: f32[2, 16]  parameter
net_2_bias: f32[2]  parameter
y: f32[4, 2]  batch_input
group0_hyperparameters: f64[4]  hyperparameter
momentum_buffer_net_0_weight: f32[16, 8]  optimizer_state  [momentum_buffer]
momentum_buffer_net_0_bias: f32[16]  optimizer_state  [momentum_buffer]
momentum_buffer_net_2_weight: f32[2, 16]  optimizer_state  [momentum_buffer]
momentum_buffer_net_2_bias: f32[2]  optimizer_state  [momentum_buffer]
input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
grad = torch.autograd.grad(loss, [net_0_weight, net_0_bias, net_2_weight, net_2_bias], allow_unused=True)  # (f32[16, 8], f32[16], f32[2, 16], f32[2])  backward
grad_net_0_weight = grad[0]  # f32[16, 8]  gradient
grad_net_0_bias = grad[1]  # f32[16]  gradient
grad_net_2_weight = grad[2]  # f32[2, 16]  gradient
grad_net_2_bias = grad[3]  # f32[2]  gradient
_set_grad_enabled = torch._C._set_grad_enabled(False)  # other
group0_lr = group0_hyperparameters[0]  # f64[]  hyperparameter
group0_momentum = group0_hyperparameters[1]  # f64[]  hyperparameter
group0_dampening = group0_hyperparameters[2]  # f64[]  hyperparameter
group0_weight_decay = group0_hyperparameters[3]  # f64[]  hyperparameter
sgd_momentum_net_0_weight = lordo.sgd_momentum(net_0_weight, grad_net_0_weight, momentum_buffer_net_0_weight, group0_lr, group0_momentum, group0_dampening, group0_weight_decay, nesterov=False, maximize=False)  # (f32[16, 8], f32[16, 8])  optimizer_update
new_param_net_0_weight = sgd_momentum_net_0_weight[0]  # f32[16, 8]  optimizer_update
new_momentum_buffer_net_0_weight = sgd_momentum_net_0_weight[1]  # f32[16, 8]  optimizer_update
write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 8]  writeback  [param]
write_momentum_buffer_net_0_weight = momentum_buffer_net_0_weight.copy_(new_momentum_buffer_net_0_weight)  # f32[16, 8]  writeback  [momentum_buffer]
sgd_momentum_net_0_bias = lordo.sgd_momentum(net_0_bias, grad_net_0_bias, momentum_buffer_net_0_bias, group0_lr, group0_momentum, group0_dampening, group0_weight_decay, nesterov=False, maximize=False)  # (f32[16], f32[16])  optimizer_update
new_param_net_0_bias = sgd_momentum_net_0_bias[0]  # f32[16]  optimizer_update
new_momentum_buffer_net_0_bias = sgd_momentum_net_0_bias[1]  # f32[16]  optimizer_update
write_param_net_0_bias = net_0_bias.copy_(new_param_net_0_bias)  # f32[16]  writeback  [param]
write_momentum_buffer_net_0_bias = momentum_buffer_net_0_bias.copy_(new_momentum_buffer_net_0_bias)  # f32[16]  writeback  [momentum_buffer]
sgd_momentum_net_2_weight = lordo.sgd_momentum(net_2_weight, grad_net_2_weight, momentum_buffer_net_2_weight, group0_lr, group0_momentum, group0_dampening, group0_weight_decay, nesterov=False, maximize=False)  # (f32[2, 16], f32[2, 16])  optimizer_update
new_param_net_2_weight = sgd_momentum_net_2_weight[0]  # f32[2, 16]  optimizer_update
new_momentum_buffer_net_2_weight = sgd_momentum_net_2_weight[1]  # f32[2, 16]  optimizer_update
write_param_net_2_weight = net_2_weight.copy_(new_param_net_2_weight)  # f32[2, 16]  writeback  [param]
write_momentum_buffer_net_2_weight = momentum_buffer_net_2_weight.copy_(new_momentum_buffer_net_2_weight)  # f32[2, 16]  writeback  [momentum_buffer]
sgd_momentum_net_2_bias = lordo.sgd_momentum(net_2_bias, grad_net_2_bias, momentum_buffer_net_2_bias, group0_lr, group0_momentum, group0_dampening, group0_weight_decay, nesterov=False, maximize=False)  # (f32[2], f32[2])  optimizer_update
new_param_net_2_bias = sgd_momentum_net_2_bias[0]  # f32[2]  optimizer_update
new_momentum_buffer_net_2_bias = sgd_momentum_net_2_bias[1]  # f32[2]  optimizer_update
write_param_net_2_bias = net_2_bias.copy_(new_param_net_2_bias)  # f32[2]  writeback  [param]
write_momentum_buffer_net_2_bias = momentum_buffer_net_2_bias.copy_(new_momentum_buffer_net_2_bias)  # f32[2]  writeback  [momentum_buffer]
_set_grad_enabled_3 = torch._C._set_grad_enabled(True)  # other
detach = loss.detach()  # f32[]  output
return (detach,)
""")

    def test_mlp_adamw(self):
        step = _mlp_step(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
        self.assertExpectedInline(stage_text(step), """\
net_0_weight: f32[16, 8]  parameter
net_0_bias: f32[16]  parameter
x: f32[4, 8]  batch_input
net_2_weight: f32[2, 16]  parameter
net_2_bias: f32[2]  parameter
y: f32[4, 2]  batch_input
group0_hyperparameters: f64[5]  hyperparameter
exp_avg_net_0_weight: f32[16, 8]  optimizer_state  [exp_avg]
exp_avg_sq_net_0_weight: f32[16, 8]  optimizer_state  [exp_avg_sq]
step_net_0_weight: f32[]  optimizer_state  [step]
exp_avg_net_0_bias: f32[16]  optimizer_state  [exp_avg]
exp_avg_sq_net_0_bias: f32[16]  optimizer_state  [exp_avg_sq]
step_net_0_bias: f32[]  optimizer_state  [step]
exp_avg_net_2_weight: f32[2, 16]  optimizer_state  [exp_avg]
exp_avg_sq_net_2_weight: f32[2, 16]  optimizer_state  [exp_avg_sq]
step_net_2_weight: f32[]  optimizer_state  [step]
exp_avg_net_2_bias: f32[2]  optimizer_state  [exp_avg]
exp_avg_sq_net_2_bias: f32[2]  optimizer_state  [exp_avg_sq]
step_net_2_bias: f32[]  optimizer_state  [step]
input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
grad = torch.autograd.grad(loss, [net_0_weight, net_0_bias, net_2_weight, net_2_bias], allow_unused=True)  # (f32[16, 8], f32[16], f32[2, 16], f32[2])  backward
grad_net_0_weight = grad[0]  # f32[16, 8]  gradient
grad_net_0_bias = grad[1]  # f32[16]  gradient
grad_net_2_weight = grad[2]  # f32[2, 16]  gradient
grad_net_2_bias = grad[3]  # f32[2]  gradient
_set_grad_enabled = torch._C._set_grad_enabled(False)  # other
group0_lr = group0_hyperparameters[0]  # f64[]  hyperparameter
group0_beta1 = group0_hyperparameters[1]  # f64[]  hyperparameter
group0_beta2 = group0_hyperparameters[2]  # f64[]  hyperparameter
group0_eps = group0_hyperparameters[3]  # f64[]  hyperparameter
group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
adamw_net_0_weight = lordo.adamw(net_0_weight, grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 8], f32[16, 8], f32[16, 8], f32[])  optimizer_update
new_param_net_0_weight = adamw_net_0_weight[0]  # f32[16, 8]  optimizer_update
new_exp_avg_net_0_weight = adamw_net_0_weight[1]  # f32[16, 8]  optimizer_update
new_exp_avg_sq_net_0_weight = adamw_net_0_weight[2]  # f32[16, 8]  optimizer_update
new_step_net_0_weight = adamw_net_0_weight[3]  # f32[]  optimizer_update
write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 8]  writeback  [param]
write_exp_avg_net_0_weight = exp_avg_net_0_weight.copy_(new_exp_avg_net_0_weight)  # f32[16, 8]  writeback  [exp_avg]
write_exp_avg_sq_net_0_weight = exp_avg_sq_net_0_weight.copy_(new_exp_avg_sq_net_0_weight)  # f32[16, 8]  writeback  [exp_avg_sq]
write_step_net_0_weight = step_net_0_weight.copy_(new_step_net_0_weight)  # f32[]  writeback  [step]
adamw_net_0_bias = lordo.adamw(net_0_bias, grad_net_0_bias, exp_avg_net_0_bias, exp_avg_sq_net_0_bias, step_net_0_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16], f32[16], f32[16], f32[])  optimizer_update
new_param_net_0_bias = adamw_net_0_bias[0]  # f32[16]  optimizer_update
new_exp_avg_net_0_bias = adamw_net_0_bias[1]  # f32[16]  optimizer_update
new_exp_avg_sq_net_0_bias = adamw_net_0_bias[2]  # f32[16]  optimizer_update
new_step_net_0_bias = adamw_net_0_bias[3]  # f32[]  optimizer_update
write_param_net_0_bias = net_0_bias.copy_(new_param_net_0_bias)  # f32[16]  writeback  [param]
write_exp_avg_net_0_bias = exp_avg_net_0_bias.copy_(new_exp_avg_net_0_bias)  # f32[16]  writeback  [exp_avg]
write_exp_avg_sq_net_0_bias = exp_avg_sq_net_0_bias.copy_(new_exp_avg_sq_net_0_bias)  # f32[16]  writeback  [exp_avg_sq]
write_step_net_0_bias = step_net_0_bias.copy_(new_step_net_0_bias)  # f32[]  writeback  [step]
adamw_net_2_weight = lordo.adamw(net_2_weight, grad_net_2_weight, exp_avg_net_2_weight, exp_avg_sq_net_2_weight, step_net_2_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2, 16], f32[2, 16], f32[2, 16], f32[])  optimizer_update
new_param_net_2_weight = adamw_net_2_weight[0]  # f32[2, 16]  optimizer_update
new_exp_avg_net_2_weight = adamw_net_2_weight[1]  # f32[2, 16]  optimizer_update
new_exp_avg_sq_net_2_weight = adamw_net_2_weight[2]  # f32[2, 16]  optimizer_update
new_step_net_2_weight = adamw_net_2_weight[3]  # f32[]  optimizer_update
write_param_net_2_weight = net_2_weight.copy_(new_param_net_2_weight)  # f32[2, 16]  writeback  [param]
write_exp_avg_net_2_weight = exp_avg_net_2_weight.copy_(new_exp_avg_net_2_weight)  # f32[2, 16]  writeback  [exp_avg]
write_exp_avg_sq_net_2_weight = exp_avg_sq_net_2_weight.copy_(new_exp_avg_sq_net_2_weight)  # f32[2, 16]  writeback  [exp_avg_sq]
write_step_net_2_weight = step_net_2_weight.copy_(new_step_net_2_weight)  # f32[]  writeback  [step]
adamw_net_2_bias = lordo.adamw(net_2_bias, grad_net_2_bias, exp_avg_net_2_bias, exp_avg_sq_net_2_bias, step_net_2_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[2], f32[2], f32[2], f32[])  optimizer_update
new_param_net_2_bias = adamw_net_2_bias[0]  # f32[2]  optimizer_update
new_exp_avg_net_2_bias = adamw_net_2_bias[1]  # f32[2]  optimizer_update
new_exp_avg_sq_net_2_bias = adamw_net_2_bias[2]  # f32[2]  optimizer_update
new_step_net_2_bias = adamw_net_2_bias[3]  # f32[]  optimizer_update
write_param_net_2_bias = net_2_bias.copy_(new_param_net_2_bias)  # f32[2]  writeback  [param]
write_exp_avg_net_2_bias = exp_avg_net_2_bias.copy_(new_exp_avg_net_2_bias)  # f32[2]  writeback  [exp_avg]
write_exp_avg_sq_net_2_bias = exp_avg_sq_net_2_bias.copy_(new_exp_avg_sq_net_2_bias)  # f32[2]  writeback  [exp_avg_sq]
write_step_net_2_bias = step_net_2_bias.copy_(new_step_net_2_bias)  # f32[]  writeback  [step]
_set_grad_enabled_3 = torch._C._set_grad_enabled(True)  # other
detach = loss.detach()  # f32[]  output
return (detach,)
""")

    def test_identity_pass_changes_nothing(self):
        # The identity pass runs when no other does: here, with the non-finite check off.
        step = _mlp_step(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), lc.Policy(on_nonfinite=None))
        self.assertEqual(stage_diff(step, "captured", "identity"), "")

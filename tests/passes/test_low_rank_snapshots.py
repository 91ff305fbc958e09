"""Snapshots of the low-rank pass on an MLP AdamW step (EXPECTTEST_ACCEPT=1 rewrites them)."""

import expecttest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.testing import capture, stage_diff, stage_text, training_step


def _step(**options):
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)
    return capture(train_step, torch.randn(4, 8), torch.randn(4, 2), policy=lc.Policy.galore(rank=4, **options))


class TestLowRankGraphs(expecttest.TestCase):
    def test_step_phase_before_and_after(self):
        self.assertExpectedInline(stage_diff(_step(), "captured", "low_rank"), """\
--- captured
+++ low_rank
@@ -19,2 +19,5 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
+low_rank_exp_avg_net_0_weight: f32[16, 4]  optimizer_state  [low_rank.exp_avg.net.0.weight]  <low_rank>
+low_rank_exp_avg_sq_net_0_weight: f32[16, 4]  optimizer_state  [low_rank.exp_avg_sq.net.0.weight]  <low_rank>
+low_rank_projection_net_0_weight: f32[8, 4]  optimizer_state  [low_rank.projection.net.0.weight]  <low_rank>
 input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
@@ -34,10 +37,11 @@
 group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
-adamw_net_0_weight = lordo.adamw(net_0_weight, grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 8], f32[0], f32[0], f32[])  optimizer_update
-new_param_net_0_weight = adamw_net_0_weight[0]  # f32[16, 8]  optimizer_update
-new_exp_avg_net_0_weight = adamw_net_0_weight[1]  # f32[0]  optimizer_update
-new_exp_avg_sq_net_0_weight = adamw_net_0_weight[2]  # f32[0]  optimizer_update
-new_step_net_0_weight = adamw_net_0_weight[3]  # f32[]  optimizer_update
+projected_grad_net_0_weight = torch._VariableFunctionsClass.matmul(grad_net_0_weight, low_rank_projection_net_0_weight)  # f32[16, 4]  gradient  <low_rank>
+galore_adamw_projected_net_0_weight = lordo.galore_adamw_projected(net_0_weight, projected_grad_net_0_weight, low_rank_exp_avg_net_0_weight, low_rank_exp_avg_sq_net_0_weight, step_net_0_weight, low_rank_projection_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, scale=0.25, tall=True, maximize=False, numerics='torch')  # (f32[16, 8], f32[16, 4], f32[16, 4], f32[])  optimizer_update  <low_rank>
+new_param_net_0_weight = galore_adamw_projected_net_0_weight[0]  # f32[16, 8]  optimizer_update
+new_exp_avg_net_0_weight = galore_adamw_projected_net_0_weight[1]  # f32[16, 4]  optimizer_update
+new_exp_avg_sq_net_0_weight = galore_adamw_projected_net_0_weight[2]  # f32[16, 4]  optimizer_update
+new_step_net_0_weight = galore_adamw_projected_net_0_weight[3]  # f32[]  optimizer_update
 write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 8]  writeback  [param]
-write_exp_avg_net_0_weight = exp_avg_net_0_weight.copy_(new_exp_avg_net_0_weight)  # f32[0]  writeback  [exp_avg]
-write_exp_avg_sq_net_0_weight = exp_avg_sq_net_0_weight.copy_(new_exp_avg_sq_net_0_weight)  # f32[0]  writeback  [exp_avg_sq]
+write_exp_avg_net_0_weight = low_rank_exp_avg_net_0_weight.copy_(new_exp_avg_net_0_weight)  # f32[16, 4]  writeback  [exp_avg]
+write_exp_avg_sq_net_0_weight = low_rank_exp_avg_sq_net_0_weight.copy_(new_exp_avg_sq_net_0_weight)  # f32[16, 4]  writeback  [exp_avg_sq]
 write_step_net_0_weight = step_net_0_weight.copy_(new_step_net_0_weight)  # f32[]  writeback  [step]
""")

    def test_refresh_phase(self):
        self.assertExpectedInline(stage_text(_step(on_refresh="reproject"), "low_rank", events="refresh"), """\
net_0_weight: f32[16, 8]  parameter
net_0_bias: f32[16]  parameter
x: f32[4, 8]  batch_input
net_2_weight: f32[2, 16]  parameter
net_2_bias: f32[2]  parameter
y: f32[4, 2]  batch_input
group0_hyperparameters: f64[5]  hyperparameter
exp_avg_net_0_weight: f32[0]  optimizer_state  [exp_avg]
exp_avg_sq_net_0_weight: f32[0]  optimizer_state  [exp_avg_sq]
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
low_rank_exp_avg_net_0_weight: f32[16, 4]  optimizer_state  [low_rank.exp_avg.net.0.weight]  <low_rank>
low_rank_exp_avg_sq_net_0_weight: f32[16, 4]  optimizer_state  [low_rank.exp_avg_sq.net.0.weight]  <low_rank>
low_rank_projection_net_0_weight: f32[8, 4]  optimizer_state  [low_rank.projection.net.0.weight]  <low_rank>
low_rank_projection_failures: i64[]  optimizer_state  [low_rank.projection_failures]  <low_rank>
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
refresh_net_0_weight = lordo.low_rank_projection(grad_net_0_weight, low_rank_projection_net_0_weight, low_rank_projection_net_0_weight, rank=4, tall=True, method='svd', power_iterations=1)  # (f32[8, 4], b8[])  optimizer_update  <low_rank>
new_projection_net_0_weight = refresh_net_0_weight[0]  # f32[8, 4]  optimizer_update  <low_rank>
projection_finite_net_0_weight = refresh_net_0_weight[1]  # b8[]  optimizer_update  <low_rank>
projection_failed_net_0_weight = aten.logical_not(projection_finite_net_0_weight)  # b8[]  optimizer_update  <low_rank>
projections_failed = aten.stack([projection_failed_net_0_weight])  # b8[1]  optimizer_update  <low_rank>
projection_failures_now = aten.sum(projections_failed)  # i64[]  optimizer_update  <low_rank>
projection_failures_counted = aten.add.Tensor(low_rank_projection_failures, projection_failures_now)  # i64[]  optimizer_update  <low_rank>
count_projection_failures = low_rank_projection_failures.copy_(projection_failures_counted)  # i64[]  writeback  [low_rank.projection_failures]  <low_rank>
projected_grad_net_0_weight = torch._VariableFunctionsClass.matmul(grad_net_0_weight, new_projection_net_0_weight)  # f32[16, 4]  gradient  <low_rank>
carried_exp_avg_net_0_weight = lordo.low_rank_carry(low_rank_exp_avg_net_0_weight, low_rank_projection_net_0_weight, new_projection_net_0_weight, tall=True, squared=False, mode='reproject')  # f32[16, 4]  optimizer_update  <low_rank>
carried_exp_avg_sq_net_0_weight = lordo.low_rank_carry(low_rank_exp_avg_sq_net_0_weight, low_rank_projection_net_0_weight, new_projection_net_0_weight, tall=True, squared=True, mode='reproject')  # f32[16, 4]  optimizer_update  <low_rank>
galore_adamw_projected_net_0_weight = lordo.galore_adamw_projected(net_0_weight, projected_grad_net_0_weight, carried_exp_avg_net_0_weight, carried_exp_avg_sq_net_0_weight, step_net_0_weight, new_projection_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, scale=0.25, tall=True, maximize=False, numerics='torch')  # (f32[16, 8], f32[16, 4], f32[16, 4], f32[])  optimizer_update  <low_rank>
write_projection_net_0_weight = low_rank_projection_net_0_weight.copy_(new_projection_net_0_weight)  # f32[8, 4]  writeback  [projection]  <low_rank>
new_param_net_0_weight = galore_adamw_projected_net_0_weight[0]  # f32[16, 8]  optimizer_update
new_exp_avg_net_0_weight = galore_adamw_projected_net_0_weight[1]  # f32[16, 4]  optimizer_update
new_exp_avg_sq_net_0_weight = galore_adamw_projected_net_0_weight[2]  # f32[16, 4]  optimizer_update
new_step_net_0_weight = galore_adamw_projected_net_0_weight[3]  # f32[]  optimizer_update
write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 8]  writeback  [param]
write_exp_avg_net_0_weight = low_rank_exp_avg_net_0_weight.copy_(new_exp_avg_net_0_weight)  # f32[16, 4]  writeback  [exp_avg]
write_exp_avg_sq_net_0_weight = low_rank_exp_avg_sq_net_0_weight.copy_(new_exp_avg_sq_net_0_weight)  # f32[16, 4]  writeback  [exp_avg_sq]
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

"""Snapshots of the ECO pass on an MLP AdamW step: the stored weight and the update."""

import expecttest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.testing import capture, stage_diff, training_step


def _step(policy):
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)
    return capture(train_step, torch.randn(4, 8), torch.randn(4, 2), policy=policy)


class TestEcoGraphs(expecttest.TestCase):
    def test_step_phase_rebuilds_weights_from_codes_and_writes_new_codes(self):
        step = _step(lc.Policy.eco(format="int8", params=r"net\.0\.weight"))
        self.assertExpectedInline(stage_diff(step, "captured", "eco"), """\
--- captured
+++ eco
@@ -19,2 +19,10 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
+eco_step: i64[]  optimizer_state  [eco.step]  <eco>
+eco_codes_net_0_weight: i8[16, 8]  optimizer_state  [eco.codes.net.0.weight]  <eco>
+eco_scales_net_0_weight: f32[16, 1]  optimizer_state  [eco.scales.net.0.weight]  <eco>
+weights_from_codes = torch._C._set_grad_enabled(False)  # other  <eco>
+decoded_net_0_weight = lordo.eco_decode(eco_codes_net_0_weight, eco_scales_net_0_weight, format='int8', group_size=32)  # f32[16, 8]  forward  <eco>
+rebuild_net_0_weight = net_0_weight.copy_(decoded_net_0_weight)  # f32[16, 8]  forward  <eco>
+forward_with_grad = torch._C._set_grad_enabled(True)  # other  <eco>
+next_eco_step = aten.add.Scalar(eco_step, 1)  # i64[]  optimizer_update  <eco>
 input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
@@ -39,4 +47,12 @@
 new_step_net_0_weight = adamw_net_0_weight[3]  # f32[]  optimizer_update
-write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 8]  writeback  [param]
-write_exp_avg_net_0_weight = exp_avg_net_0_weight.copy_(new_exp_avg_net_0_weight)  # f32[16, 8]  writeback  [exp_avg]
+requantized_param_net_0_weight = lordo.eco_requantize(new_param_net_0_weight, eco_step, format='int8', scale='per_row', group_size=32, rounding='nearest', seed=0, salt=0)  # (f32[16, 8], i8[16, 8], f32[16, 1])  optimizer_update  <eco>
+stored_param_value_net_0_weight = requantized_param_net_0_weight[0]  # f32[16, 8]  optimizer_update  <eco>
+stored_param_codes_net_0_weight = requantized_param_net_0_weight[1]  # i8[16, 8]  optimizer_update  <eco>
+stored_param_scales_net_0_weight = requantized_param_net_0_weight[2]  # f32[16, 1]  optimizer_update  <eco>
+write_param_codes_net_0_weight = eco_codes_net_0_weight.copy_(stored_param_codes_net_0_weight)  # i8[16, 8]  writeback  [codes]  <eco>
+write_param_scales_net_0_weight = eco_scales_net_0_weight.copy_(stored_param_scales_net_0_weight)  # f32[16, 1]  writeback  [scales]  <eco>
+rounding_error_net_0_weight = aten.sub.Tensor(new_param_net_0_weight, stored_param_value_net_0_weight)  # f32[16, 8]  optimizer_update  <eco>
+exp_avg_with_error_net_0_weight = lordo.eco_inject_adamw(new_exp_avg_net_0_weight, new_exp_avg_sq_net_0_weight, new_step_net_0_weight, rounding_error_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps)  # f32[16, 8]  optimizer_update  <eco>
+write_param_net_0_weight = net_0_weight.copy_(stored_param_value_net_0_weight)  # f32[16, 8]  writeback  [param]
+write_exp_avg_net_0_weight = exp_avg_net_0_weight.copy_(exp_avg_with_error_net_0_weight)  # f32[16, 8]  writeback  [exp_avg]
 write_exp_avg_sq_net_0_weight = exp_avg_sq_net_0_weight.copy_(new_exp_avg_sq_net_0_weight)  # f32[16, 8]  writeback  [exp_avg_sq]
@@ -72,2 +88,3 @@
 detach = loss.detach()  # f32[]  output
+write_eco_step = eco_step.copy_(next_eco_step)  # i64[]  writeback  [eco.step]  <eco>
 return (detach,)
""")

    def test_master_baseline_quantizes_the_forward_copy_only(self):
        step = _step(lc.Policy.eco(format="fp8_e4m3", mode="master", params=r"net\.0\.weight"))
        self.assertExpectedInline(stage_diff(step, "captured", "eco"), """\
--- captured
+++ eco
@@ -19,3 +19,4 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
-input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
+quantized_copy_net_0_weight = lordo.eco_forward_quantize(net_0_weight, format='fp8_e4m3', scale='per_row', group_size=32)  # f32[16, 8]  forward  <eco>
+input_1 = torch._C._nn.linear(x, quantized_copy_net_0_weight, net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
""")

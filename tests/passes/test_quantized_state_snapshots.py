"""Snapshot of the quantized-state pass on an MLP: every read of a moment decodes, its write encodes."""

import expecttest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.testing import capture, stage_diff, training_step


class TestQuantizedStateGraphs(expecttest.TestCase):
    def test_the_first_layers_moments_are_read_and_stored_in_8_bits(self):
        torch.manual_seed(0)
        model = MLP((16, 16, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)
        # Only the 16x16 weight is as large as min_size and a whole number of blocks.
        policy = lc.Policy(quantized_state=lc.QuantizedState(block_size=64, min_size=256), on_nonfinite=None)
        step = capture(train_step, torch.randn(4, 16), torch.randn(4, 2), policy=policy)
        self.assertExpectedInline(stage_diff(step, "captured", "quantized_state"), """\
--- captured
+++ quantized_state
@@ -19,2 +19,8 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
+quantized_state_signed_map: f32[256]  optimizer_state  [quantized_state.signed_map]  <quantized_state>
+quantized_state_codes_exp_avg_net_0_weight: u8[256]  optimizer_state  [quantized_state.codes.exp_avg.net.0.weight]  <quantized_state>
+quantized_state_scales_exp_avg_net_0_weight: f32[4]  optimizer_state  [quantized_state.scales.exp_avg.net.0.weight]  <quantized_state>
+quantized_state_unsigned_map: f32[256]  optimizer_state  [quantized_state.unsigned_map]  <quantized_state>
+quantized_state_codes_exp_avg_sq_net_0_weight: u8[256]  optimizer_state  [quantized_state.codes.exp_avg_sq.net.0.weight]  <quantized_state>
+quantized_state_scales_exp_avg_sq_net_0_weight: f32[4]  optimizer_state  [quantized_state.scales.exp_avg_sq.net.0.weight]  <quantized_state>
 input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
@@ -34,10 +40,22 @@
 group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
-adamw_net_0_weight = lordo.adamw(net_0_weight, grad_net_0_weight, exp_avg_net_0_weight, exp_avg_sq_net_0_weight, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 16], f32[0], f32[0], f32[])  optimizer_update
+read_exp_avg_net_0_weight = lordo.dequantize_moment(quantized_state_codes_exp_avg_net_0_weight, quantized_state_scales_exp_avg_net_0_weight, quantized_state_signed_map, bits=8)  # f32[256]  optimizer_update  <quantized_state>
+read_exp_avg_net_0_weight_shaped = aten.view(read_exp_avg_net_0_weight, [16, 16])  # f32[16, 16]  optimizer_update  <quantized_state>
+read_exp_avg_sq_net_0_weight = lordo.dequantize_moment(quantized_state_codes_exp_avg_sq_net_0_weight, quantized_state_scales_exp_avg_sq_net_0_weight, quantized_state_unsigned_map, bits=8)  # f32[256]  optimizer_update  <quantized_state>
+read_exp_avg_sq_net_0_weight_shaped = aten.view(read_exp_avg_sq_net_0_weight, [16, 16])  # f32[16, 16]  optimizer_update  <quantized_state>
+adamw_net_0_weight = lordo.adamw(net_0_weight, grad_net_0_weight, read_exp_avg_net_0_weight_shaped, read_exp_avg_sq_net_0_weight_shaped, step_net_0_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[16, 16], f32[16, 16], f32[16, 16], f32[])  optimizer_update
 new_param_net_0_weight = adamw_net_0_weight[0]  # f32[16, 16]  optimizer_update
-new_exp_avg_net_0_weight = adamw_net_0_weight[1]  # f32[0]  optimizer_update
-new_exp_avg_sq_net_0_weight = adamw_net_0_weight[2]  # f32[0]  optimizer_update
+new_exp_avg_net_0_weight = adamw_net_0_weight[1]  # f32[16, 16]  optimizer_update
+new_exp_avg_sq_net_0_weight = adamw_net_0_weight[2]  # f32[16, 16]  optimizer_update
 new_step_net_0_weight = adamw_net_0_weight[3]  # f32[]  optimizer_update
 write_param_net_0_weight = net_0_weight.copy_(new_param_net_0_weight)  # f32[16, 16]  writeback  [param]
-write_exp_avg_net_0_weight = exp_avg_net_0_weight.copy_(new_exp_avg_net_0_weight)  # f32[0]  writeback  [exp_avg]
-write_exp_avg_sq_net_0_weight = exp_avg_sq_net_0_weight.copy_(new_exp_avg_sq_net_0_weight)  # f32[0]  writeback  [exp_avg_sq]
+hold_exp_avg_net_0_weight = lordo.quantize_moment(new_exp_avg_net_0_weight, quantized_state_signed_map, bits=8, block_size=64)  # (u8[256], f32[4])  optimizer_update  <quantized_state>
+new_codes_exp_avg_net_0_weight = hold_exp_avg_net_0_weight[0]  # u8[256]  optimizer_update  <quantized_state>
+write_codes_exp_avg_net_0_weight = quantized_state_codes_exp_avg_net_0_weight.copy_(new_codes_exp_avg_net_0_weight)  # u8[256]  writeback  [quantized_state.codes.exp_avg.net.0.weight]  <quantized_state>
+new_scales_exp_avg_net_0_weight = hold_exp_avg_net_0_weight[1]  # f32[4]  optimizer_update  <quantized_state>
+write_scales_exp_avg_net_0_weight = quantized_state_scales_exp_avg_net_0_weight.copy_(new_scales_exp_avg_net_0_weight)  # f32[4]  writeback  [quantized_state.scales.exp_avg.net.0.weight]  <quantized_state>
+hold_exp_avg_sq_net_0_weight = lordo.quantize_moment(new_exp_avg_sq_net_0_weight, quantized_state_unsigned_map, bits=8, block_size=64)  # (u8[256], f32[4])  optimizer_update  <quantized_state>
+new_codes_exp_avg_sq_net_0_weight = hold_exp_avg_sq_net_0_weight[0]  # u8[256]  optimizer_update  <quantized_state>
+write_codes_exp_avg_sq_net_0_weight = quantized_state_codes_exp_avg_sq_net_0_weight.copy_(new_codes_exp_avg_sq_net_0_weight)  # u8[256]  writeback  [quantized_state.codes.exp_avg_sq.net.0.weight]  <quantized_state>
+new_scales_exp_avg_sq_net_0_weight = hold_exp_avg_sq_net_0_weight[1]  # f32[4]  optimizer_update  <quantized_state>
+write_scales_exp_avg_sq_net_0_weight = quantized_state_scales_exp_avg_sq_net_0_weight.copy_(new_scales_exp_avg_sq_net_0_weight)  # f32[4]  writeback  [quantized_state.scales.exp_avg_sq.net.0.weight]  <quantized_state>
 write_step_net_0_weight = step_net_0_weight.copy_(new_step_net_0_weight)  # f32[]  writeback  [step]
""")


if __name__ == "__main__":
    expecttest.run_tests()

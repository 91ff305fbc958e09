"""The four-way stack as one policy: LoRDO + CAGE + ECO + EMA-Nesterov.

The snapshots show the graph of a sync step after each rewrite, in stage order: CAGE's
quantized forward (FORWARD), LoRDO dropping the step's averaging (COMBINE) and taking the
update (OPTIMIZER_STATE), CAGE's correction of it (UPDATE), the lookahead (LOOKAHEAD),
ECO's requantization with its error fed into LoRDO's projected moment (WEIGHT_STORAGE),
LoRDO's sync with the anchor in ECO's format (SYNC), and the non-finite guard (GUARD).
Then a short tiny-GPT run on 4 gloo workers whose loss falls.
"""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt
from lordo_compile.launch import run_workers
from lordo_compile.testing import capture, stage_diff, training_step


def _policy(total_steps: int) -> lc.Policy:
    return lc.Policy(
        lordo=lc.LoRDO(rank=2, sync_every=2, payload="full"),
        fake_quant=lc.FakeQuant(bits=4, correction=lc.CAGE(total_steps=total_steps, silence_ratio=0.5)),
        eco=lc.ECO(format="fp8_e4m3"),
        ema_nesterov=lc.EMANesterov(beta=0.5, warmup_steps=1),
    )


def _sync_step():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return capture(training_step(lambda x, y: F.mse_loss(model(x), y), opt), torch.randn(2, 8), torch.randn(2, 4),
                   policy=_policy(total_steps=10))


class TestFourWayGraphs(expecttest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.step = _sync_step()

    def _diff(self, before, after):
        return stage_diff(self.step, before, after, events="sync")

    def test_stages_in_order(self):
        self.assertEqual(list(self.step.graphs["sync"])[:-1], [
            "captured", "fake_quant", "lordo:combine", "lordo", "fake_quant:update", "ema_nesterov", "eco",
            "lordo:sync", "on_nonfinite"])

    def test_fake_quant(self):
        self.assertExpectedInline(self._diff("captured", "fake_quant"), """\
--- captured
+++ fake_quant
@@ -11,3 +11,4 @@
 step_bias: f32[]  optimizer_state  [step]
-linear = torch._C._nn.linear(x, weight, bias)  # f32[2, 4]  forward
+fake_quantize_weight = lordo.fake_quantize(weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[4, 8]  forward  <fake_quant>
+linear = torch._C._nn.linear(x, fake_quantize_weight, bias)  # f32[2, 4]  forward
 loss = torch.nn.functional.mse_loss(linear, y)  # f32[]  loss
""")

    def test_lordo_inner_step(self):
        self.assertExpectedInline(self._diff("lordo:combine", "lordo"), """\
--- lordo:combine
+++ lordo
@@ -11,2 +11,6 @@
 step_bias: f32[]  optimizer_state  [step]
+lordo_u_weight: f32[2, 8]  optimizer_state  [lordo.u.weight]  <lordo>
+lordo_v_weight: f32[2, 8]  optimizer_state  [lordo.v.weight]  <lordo>
+lordo_error_weight: f32[4, 8]  optimizer_state  [lordo.error.weight]  <lordo>
+lordo_projection_weight: f32[4, 2]  optimizer_state  [lordo.projection.weight]  <lordo>
 fake_quantize_weight = lordo.fake_quantize(weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[4, 8]  forward  <fake_quant>
@@ -23,11 +27,13 @@
 group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
-adamw_weight = lordo.adamw(weight, grad_weight, exp_avg_weight, exp_avg_sq_weight, step_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[4, 8], f32[0], f32[0], f32[])  optimizer_update
-new_param_weight = adamw_weight[0]  # f32[4, 8]  optimizer_update
-new_exp_avg_weight = adamw_weight[1]  # f32[0]  optimizer_update
-new_exp_avg_sq_weight = adamw_weight[2]  # f32[0]  optimizer_update
-new_step_weight = adamw_weight[3]  # f32[]  optimizer_update
-write_param_weight = weight.copy_(new_param_weight)  # f32[4, 8]  writeback  [param]
-write_exp_avg_weight = exp_avg_weight.copy_(new_exp_avg_weight)  # f32[0]  writeback  [exp_avg]
-write_exp_avg_sq_weight = exp_avg_sq_weight.copy_(new_exp_avg_sq_weight)  # f32[0]  writeback  [exp_avg_sq]
-write_step_weight = step_weight.copy_(new_step_weight)  # f32[]  writeback  [step]
+lordo_adamw_weight = lordo.lordo_adamw(weight, grad_weight, lordo_u_weight, lordo_v_weight, lordo_error_weight, step_weight, lordo_projection_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, omega=0.7, mu=1.0, normalizer='column', full_rank_input='gradient', clip=0.0, weight_decay_at='before', tall=False, maximize=False)  # (f32[4, 8], f32[2, 8], f32[2, 8], f32[4, 8], f32[])  optimizer_update  <lordo>
+new_param_weight_1 = lordo_adamw_weight[0]  # f32[4, 8]  optimizer_update  <lordo>
+new_u_weight = lordo_adamw_weight[1]  # f32[2, 8]  optimizer_update  <lordo>
+new_v_weight = lordo_adamw_weight[2]  # f32[2, 8]  optimizer_update  <lordo>
+new_error_weight = lordo_adamw_weight[3]  # f32[4, 8]  optimizer_update  <lordo>
+new_step_weight_1 = lordo_adamw_weight[4]  # f32[]  optimizer_update  <lordo>
+write_u_weight = lordo_u_weight.copy_(new_u_weight)  # f32[2, 8]  writeback  [u]  <lordo>
+write_v_weight = lordo_v_weight.copy_(new_v_weight)  # f32[2, 8]  writeback  [v]  <lordo>
+write_error_weight = lordo_error_weight.copy_(new_error_weight)  # f32[4, 8]  writeback  [error]  <lordo>
+write_param_weight = weight.copy_(new_param_weight_1)  # f32[4, 8]  writeback  [param]
+write_step_weight = step_weight.copy_(new_step_weight_1)  # f32[]  writeback  [step]
 adamw_bias = lordo.adamw(bias, grad_bias, exp_avg_bias, exp_avg_sq_bias, step_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[4], f32[4], f32[4], f32[])  optimizer_update
""")

    def test_cage_correction(self):
        self.assertExpectedInline(self._diff("lordo", "fake_quant:update"), """\
--- lordo
+++ fake_quant:update
@@ -15,2 +15,5 @@
 lordo_projection_weight: f32[4, 2]  optimizer_state  [lordo.projection.weight]  <lordo>
+fake_quant_step: i64[]  optimizer_state  [fake_quant.step]  <fake_quant>
+cage_lambda = lordo.cage_lambda(fake_quant_step, lam=10.0, silence_steps=5, ramp_steps=5, constant=False)  # f64[]  optimizer_update  <fake_quant>
+next_fake_quant_step = aten.add.Scalar(fake_quant_step, 1)  # i64[]  optimizer_update  <fake_quant>
 fake_quantize_weight = lordo.fake_quantize(weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[4, 8]  forward  <fake_quant>
@@ -29,2 +32,3 @@
 new_param_weight_1 = lordo_adamw_weight[0]  # f32[4, 8]  optimizer_update  <lordo>
+cage_param_weight = lordo.cage_decoupled(new_param_weight_1, weight, fake_quantize_weight, cage_lambda, group0_lr)  # f32[4, 8]  optimizer_update  <fake_quant>
 new_u_weight = lordo_adamw_weight[1]  # f32[2, 8]  optimizer_update  <lordo>
@@ -36,3 +40,3 @@
 write_error_weight = lordo_error_weight.copy_(new_error_weight)  # f32[4, 8]  writeback  [error]  <lordo>
-write_param_weight = weight.copy_(new_param_weight_1)  # f32[4, 8]  writeback  [param]
+write_param_weight = weight.copy_(cage_param_weight)  # f32[4, 8]  writeback  [param]
 write_step_weight = step_weight.copy_(new_step_weight_1)  # f32[]  writeback  [step]
@@ -49,2 +53,3 @@
 detach = loss.detach()  # f32[]  output
+write_fake_quant_step = fake_quant_step.copy_(next_fake_quant_step)  # i64[]  writeback  [fake_quant.step]  <fake_quant>
 return (detach,)
""")

    def test_ema_nesterov(self):
        self.assertExpectedInline(self._diff("fake_quant:update", "ema_nesterov"), """\
--- fake_quant:update
+++ ema_nesterov
@@ -16,6 +16,13 @@
 fake_quant_step: i64[]  optimizer_state  [fake_quant.step]  <fake_quant>
+ema_nesterov_step: i64[]  optimizer_state  [ema_nesterov.step]  <ema_nesterov>
+ema_nesterov_direction_weight: f32[4, 8]  optimizer_state  [ema_nesterov.direction.weight]  <ema_nesterov>
+ema_nesterov_direction_bias: f32[4]  optimizer_state  [ema_nesterov.direction.bias]  <ema_nesterov>
+ema_nesterov_beta = lordo.ema_nesterov_beta(ema_nesterov_step, beta=0.5, warmup_steps=1, decay_start=-1)  # f32[]  optimizer_update  <ema_nesterov>
+next_ema_nesterov_step = aten.add.Scalar(ema_nesterov_step, 1)  # i64[]  optimizer_update  <ema_nesterov>
 cage_lambda = lordo.cage_lambda(fake_quant_step, lam=10.0, silence_steps=5, ramp_steps=5, constant=False)  # f64[]  optimizer_update  <fake_quant>
 next_fake_quant_step = aten.add.Scalar(fake_quant_step, 1)  # i64[]  optimizer_update  <fake_quant>
-fake_quantize_weight = lordo.fake_quantize(weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[4, 8]  forward  <fake_quant>
-linear = torch._C._nn.linear(x, fake_quantize_weight, bias)  # f32[2, 4]  forward
+lookahead_weight = aten.addcmul(weight, ema_nesterov_direction_weight, ema_nesterov_beta)  # f32[4, 8]  forward  <ema_nesterov>
+fake_quantize_weight = lordo.fake_quantize(lookahead_weight, bits=4, quantizer='rms_gaussian', group_size=0, hadamard=False, ste='identity')  # f32[4, 8]  forward  <fake_quant>
+lookahead_bias = aten.addcmul(bias, ema_nesterov_direction_bias, ema_nesterov_beta)  # f32[4]  forward  <ema_nesterov>
+linear = torch._C._nn.linear(x, fake_quantize_weight, lookahead_bias)  # f32[2, 4]  forward
 loss = torch.nn.functional.mse_loss(linear, y)  # f32[]  loss
@@ -30,5 +37,5 @@
 group0_weight_decay = group0_hyperparameters[4]  # f64[]  hyperparameter
-lordo_adamw_weight = lordo.lordo_adamw(weight, grad_weight, lordo_u_weight, lordo_v_weight, lordo_error_weight, step_weight, lordo_projection_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, omega=0.7, mu=1.0, normalizer='column', full_rank_input='gradient', clip=0.0, weight_decay_at='before', tall=False, maximize=False)  # (f32[4, 8], f32[2, 8], f32[2, 8], f32[4, 8], f32[])  optimizer_update  <lordo>
+lordo_adamw_weight = lordo.lordo_adamw(lookahead_weight, grad_weight, lordo_u_weight, lordo_v_weight, lordo_error_weight, step_weight, lordo_projection_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, omega=0.7, mu=1.0, normalizer='column', full_rank_input='gradient', clip=0.0, weight_decay_at='before', tall=False, maximize=False)  # (f32[4, 8], f32[2, 8], f32[2, 8], f32[4, 8], f32[])  optimizer_update  <lordo>
 new_param_weight_1 = lordo_adamw_weight[0]  # f32[4, 8]  optimizer_update  <lordo>
-cage_param_weight = lordo.cage_decoupled(new_param_weight_1, weight, fake_quantize_weight, cage_lambda, group0_lr)  # f32[4, 8]  optimizer_update  <fake_quant>
+cage_param_weight = lordo.cage_decoupled(new_param_weight_1, lookahead_weight, fake_quantize_weight, cage_lambda, group0_lr)  # f32[4, 8]  optimizer_update  <fake_quant>
 new_u_weight = lordo_adamw_weight[1]  # f32[2, 8]  optimizer_update  <lordo>
@@ -40,5 +47,7 @@
 write_error_weight = lordo_error_weight.copy_(new_error_weight)  # f32[4, 8]  writeback  [error]  <lordo>
+new_direction_weight = lordo.ema_nesterov_direction(ema_nesterov_direction_weight, cage_param_weight, weight, gamma=0.9)  # f32[4, 8]  optimizer_update  <ema_nesterov>
+write_direction_weight = ema_nesterov_direction_weight.copy_(new_direction_weight)  # f32[4, 8]  writeback  [ema_nesterov.direction.weight]  <ema_nesterov>
 write_param_weight = weight.copy_(cage_param_weight)  # f32[4, 8]  writeback  [param]
 write_step_weight = step_weight.copy_(new_step_weight_1)  # f32[]  writeback  [step]
-adamw_bias = lordo.adamw(bias, grad_bias, exp_avg_bias, exp_avg_sq_bias, step_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[4], f32[4], f32[4], f32[])  optimizer_update
+adamw_bias = lordo.adamw(lookahead_bias, grad_bias, exp_avg_bias, exp_avg_sq_bias, step_bias, group0_lr, group0_beta1, group0_beta2, group0_eps, group0_weight_decay, maximize=False)  # (f32[4], f32[4], f32[4], f32[])  optimizer_update
 new_param_bias = adamw_bias[0]  # f32[4]  optimizer_update
@@ -47,2 +56,4 @@
 new_step_bias = adamw_bias[3]  # f32[]  optimizer_update
+new_direction_bias = lordo.ema_nesterov_direction(ema_nesterov_direction_bias, new_param_bias, bias, gamma=0.9)  # f32[4]  optimizer_update  <ema_nesterov>
+write_direction_bias = ema_nesterov_direction_bias.copy_(new_direction_bias)  # f32[4]  writeback  [ema_nesterov.direction.bias]  <ema_nesterov>
 write_param_bias = bias.copy_(new_param_bias)  # f32[4]  writeback  [param]
@@ -54,2 +65,3 @@
 write_fake_quant_step = fake_quant_step.copy_(next_fake_quant_step)  # i64[]  writeback  [fake_quant.step]  <fake_quant>
+write_ema_nesterov_step = ema_nesterov_step.copy_(next_ema_nesterov_step)  # i64[]  writeback  [ema_nesterov.step]  <ema_nesterov>
 return (detach,)
""")

    def test_eco(self):
        self.assertExpectedInline(self._diff("ema_nesterov", "eco"), """\
--- ema_nesterov
+++ eco
@@ -19,2 +19,11 @@
 ema_nesterov_direction_bias: f32[4]  optimizer_state  [ema_nesterov.direction.bias]  <ema_nesterov>
+eco_step: i64[]  optimizer_state  [eco.step]  <eco>
+eco_codes_weight: f8e4m3[4, 8]  optimizer_state  [eco.codes.weight]  <eco>
+eco_scales_weight: f32[4, 1]  optimizer_state  [eco.scales.weight]  <eco>
+eco_lost_error_weight: f32[]  optimizer_state  [eco.lost_error.weight]  <eco>
+weights_from_codes = torch._C._set_grad_enabled(False)  # other  <eco>
+decoded_weight = lordo.eco_decode(eco_codes_weight, eco_scales_weight, format='fp8_e4m3', group_size=32)  # f32[4, 8]  forward  <eco>
+rebuild_weight = weight.copy_(decoded_weight)  # f32[4, 8]  forward  <eco>
+forward_with_grad = torch._C._set_grad_enabled(True)  # other  <eco>
+next_eco_step = aten.add.Scalar(eco_step, 1)  # i64[]  optimizer_update  <eco>
 ema_nesterov_beta = lordo.ema_nesterov_beta(ema_nesterov_step, beta=0.5, warmup_steps=1, decay_start=-1)  # f32[]  optimizer_update  <ema_nesterov>
@@ -44,3 +53,2 @@
 new_step_weight_1 = lordo_adamw_weight[4]  # f32[]  optimizer_update  <lordo>
-write_u_weight = lordo_u_weight.copy_(new_u_weight)  # f32[2, 8]  writeback  [u]  <lordo>
 write_v_weight = lordo_v_weight.copy_(new_v_weight)  # f32[2, 8]  writeback  [v]  <lordo>
@@ -49,3 +57,14 @@
 write_direction_weight = ema_nesterov_direction_weight.copy_(new_direction_weight)  # f32[4, 8]  writeback  [ema_nesterov.direction.weight]  <ema_nesterov>
-write_param_weight = weight.copy_(cage_param_weight)  # f32[4, 8]  writeback  [param]
+requantized_param_weight = lordo.eco_requantize(cage_param_weight, eco_step, format='fp8_e4m3', scale='per_row', group_size=32, rounding='nearest', seed=0, salt=0)  # (f32[4, 8], f8e4m3[4, 8], f32[4, 1])  optimizer_update  <eco>
+stored_param_value_weight = requantized_param_weight[0]  # f32[4, 8]  optimizer_update  <eco>
+stored_param_codes_weight = requantized_param_weight[1]  # f8e4m3[4, 8]  optimizer_update  <eco>
+stored_param_scales_weight = requantized_param_weight[2]  # f32[4, 1]  optimizer_update  <eco>
+write_param_codes_weight = eco_codes_weight.copy_(stored_param_codes_weight)  # f8e4m3[4, 8]  writeback  [codes]  <eco>
+write_param_scales_weight = eco_scales_weight.copy_(stored_param_scales_weight)  # f32[4, 1]  writeback  [scales]  <eco>
+rounding_error_weight = aten.sub.Tensor(cage_param_weight, stored_param_value_weight)  # f32[4, 8]  optimizer_update  <eco>
+u_with_error_weight = lordo.eco_inject_projected_adam(new_u_weight, new_v_weight, new_step_weight_1, rounding_error_weight, lordo_projection_weight, group0_lr, group0_beta1, group0_beta2, group0_eps, scale=0.7, tall=False)  # f32[2, 8]  optimizer_update  <eco>
+write_u_weight = lordo_u_weight.copy_(u_with_error_weight)  # f32[2, 8]  writeback  [u]  <lordo>
+lost_error_weight = lordo.eco_lost_fraction(rounding_error_weight, lordo_projection_weight, tall=False)  # f32[]  optimizer_update  <eco>
+write_lost_error_weight = eco_lost_error_weight.copy_(lost_error_weight)  # f32[]  writeback  [lost_error]  <eco>
+write_param_weight = weight.copy_(stored_param_value_weight)  # f32[4, 8]  writeback  [param]
 write_step_weight = step_weight.copy_(new_step_weight_1)  # f32[]  writeback  [step]
@@ -66,2 +85,3 @@
 write_ema_nesterov_step = ema_nesterov_step.copy_(next_ema_nesterov_step)  # i64[]  writeback  [ema_nesterov.step]  <ema_nesterov>
+write_eco_step = eco_step.copy_(next_eco_step)  # i64[]  writeback  [eco.step]  <eco>
 return (detach,)
""")

    def test_lordo_sync(self):
        self.assertExpectedInline(self._diff("eco", "lordo:sync"), """\
--- eco
+++ lordo:sync
@@ -23,2 +23,5 @@
 eco_lost_error_weight: f32[]  optimizer_state  [eco.lost_error.weight]  <eco>
+lordo_anchor_codes_weight: f8e4m3[4, 8]  optimizer_state  [lordo.anchor.codes.weight]  <lordo>
+lordo_anchor_scales_weight: f32[4, 1]  optimizer_state  [lordo.anchor.scales.weight]  <lordo>
+lordo_anchor_bias: f32[4]  optimizer_state  [lordo.anchor.bias]  <lordo>
 weights_from_codes = torch._C._set_grad_enabled(False)  # other  <eco>
@@ -81,2 +84,26 @@
 write_step_bias = step_bias.copy_(new_step_bias)  # f32[]  writeback  [step]
+decoded_weight_1 = lordo.eco_decode(lordo_anchor_codes_weight, lordo_anchor_scales_weight, format='fp8_e4m3', group_size=32)  # f32[4, 8]  optimizer_update  <lordo>
+pseudo_gradient_weight = aten.sub.Tensor(decoded_weight_1, stored_param_value_weight)  # f32[4, 8]  gradient  <lordo>
+pseudo_gradient_bias = aten.sub.Tensor(lordo_anchor_bias, new_param_bias)  # f32[4]  gradient  <lordo>
+refresh_weight = lordo.low_rank_projection(pseudo_gradient_weight, lordo_projection_weight, lordo_projection_weight, rank=2, tall=False, method='svd', power_iterations=1)  # (f32[4, 2], b8[])  optimizer_update  <lordo>
+new_projection_weight = refresh_weight[0]  # f32[4, 2]  optimizer_update  <lordo>
+projection_finite_weight = refresh_weight[1]  # b8[]  optimizer_update  <lordo>
+outer_sgd_weight = lordo.outer_sgd(decoded_weight_1, pseudo_gradient_weight, lr=1.0)  # f32[4, 8]  optimizer_update  <lordo>
+requantized_anchor_weight = lordo.eco_requantize(outer_sgd_weight, eco_step, format='fp8_e4m3', scale='per_row', group_size=32, rounding='nearest', seed=0, salt=1000000)  # (f32[4, 8], f8e4m3[4, 8], f32[4, 1])  optimizer_update  <lordo>
+stored_anchor_value_weight = requantized_anchor_weight[0]  # f32[4, 8]  optimizer_update  <lordo>
+stored_anchor_codes_weight = requantized_anchor_weight[1]  # f8e4m3[4, 8]  optimizer_update  <lordo>
+stored_anchor_scales_weight = requantized_anchor_weight[2]  # f32[4, 1]  optimizer_update  <lordo>
+write_anchor_codes_weight = lordo_anchor_codes_weight.copy_(stored_anchor_codes_weight)  # f8e4m3[4, 8]  writeback  [codes]  <lordo>
+write_anchor_scales_weight = lordo_anchor_scales_weight.copy_(stored_anchor_scales_weight)  # f32[4, 1]  writeback  [scales]  <lordo>
+write_param_codes_weight_1 = eco_codes_weight.copy_(stored_anchor_codes_weight)  # f8e4m3[4, 8]  writeback  [codes]  <lordo>
+write_param_scales_weight_1 = eco_scales_weight.copy_(stored_anchor_scales_weight)  # f32[4, 1]  writeback  [scales]  <lordo>
+assign_weight = weight.copy_(stored_anchor_value_weight)  # f32[4, 8]  writeback  [param]  <lordo>
+outer_sgd_bias = lordo.outer_sgd(lordo_anchor_bias, pseudo_gradient_bias, lr=1.0)  # f32[4]  optimizer_update  <lordo>
+write_anchor_bias = lordo_anchor_bias.copy_(outer_sgd_bias)  # f32[4]  writeback  [anchor]  <lordo>
+assign_bias = bias.copy_(outer_sgd_bias)  # f32[4]  writeback  [param]  <lordo>
+carried_u_weight = lordo.low_rank_carry(u_with_error_weight, lordo_projection_weight, new_projection_weight, tall=False, squared=False, mode='reproject')  # f32[2, 8]  optimizer_update  <lordo>
+write_carried_u_weight = lordo_u_weight.copy_(carried_u_weight)  # f32[2, 8]  writeback  [u]  <lordo>
+carried_v_weight = lordo.low_rank_carry(new_v_weight, lordo_projection_weight, new_projection_weight, tall=False, squared=True, mode='reproject')  # f32[2, 8]  optimizer_update  <lordo>
+write_carried_v_weight = lordo_v_weight.copy_(carried_v_weight)  # f32[2, 8]  writeback  [v]  <lordo>
+write_projection_weight = lordo_projection_weight.copy_(new_projection_weight)  # f32[4, 2]  writeback  [projection]  <lordo>
 _set_grad_enabled_3 = torch._C._set_grad_enabled(True)  # other
""")


STEPS = 24


def four_workers(rank, world):
    config = RunConfig(steps=STEPS, batch_size=4, seq_len=32, layers=1, width=32, heads=2, lr=1e-2, warmup=4,
                       val_batches=2, compiler="eager")
    losses = []
    result = train_tiny_gpt(_policy(STEPS), config, on_step=lambda i, loss, step: losses.append(loss))
    return losses, result.step.comm_report().bytes_sent, sorted(result.step.graphs)


@pytest.mark.distributed
def test_the_stack_trains_a_tiny_gpt_on_four_workers():
    results = run_workers(four_workers, 4, timeout=600)
    for losses, sent, graphs in results:
        assert graphs == ["init", "step", "sync"]
        assert sent > 0
        first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
        assert last < first - 0.2, losses

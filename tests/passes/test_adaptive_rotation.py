"""Adaptive rotation (RoSTE) in fake_quant against eager math written here (ALGORITHMS.md section 6).

Per layer, weight and input are quantized in the Hadamard basis when that has the smaller
relative quantization error, ||Q(y) - y||^2 / ||y||^2 summed over weight and input,
decided at step 0 and every K steps, before that step's forward.
"""

import copy
import math

import expecttest
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import ADAM_ATOL, assert_close, named_parameters
from lordo_compile.models import MLP
from lordo_compile.ops.quant import rotate as rotate_under_test
from lordo_compile.ops.rotation import choose_rotation, fake_quantize_rotated
from lordo_compile.testing import capture, stage_diff, training_step

STEPS, EVERY, LR, WD, LAM = 20, 5, 1e-2, 0.1, 5.0
CLIP_4BIT = 2.5139


def hadamard(n: int) -> torch.Tensor:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return torch.from_numpy(h).float() / math.sqrt(n)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x times the block-diagonal Hadamard matrix (blocks of 128, or the whole row)."""
    block = min(128, x.shape[-1])
    return (x.reshape(*x.shape[:-1], -1, block) @ hadamard(block)).reshape(x.shape)


def quantize(y: torch.Tensor) -> torch.Tensor:
    """4-bit per-row RMS-Gaussian quantizer: the nearest of the 16 points (j - 7.5) * step."""
    step = 2 * CLIP_4BIT * y.pow(2).mean(-1, keepdim=True).sqrt() / 15
    grid = torch.arange(16, dtype=y.dtype) - 7.5
    return grid[(y.unsqueeze(-1) / step.unsqueeze(-1) - grid).abs().argmin(-1)] * step


def effective(y: torch.Tensor, rotated: bool) -> torch.Tensor:
    """What the layer multiplies by: Q(y H) H^T (H symmetric) or Q(y)."""
    return rotate(quantize(rotate(y))) if rotated else quantize(y)


def relative_error(y: torch.Tensor) -> float:
    return float((quantize(y) - y).pow(2).sum() / y.pow(2).sum())


def rotation_helps(w: torch.Tensor, x: torch.Tensor | None) -> bool:
    plain, rotated = relative_error(w), relative_error(rotate(w))
    if x is not None:
        plain, rotated = plain + relative_error(x), rotated + relative_error(rotate(x))
    return rotated < plain


def straight_through(y: torch.Tensor, rotated: bool) -> torch.Tensor:
    return effective(y.detach(), rotated) + (y - y.detach())


def outlier_weight(rows=16, cols=64, seed=0) -> torch.Tensor:
    """Gaussian rows, each with one entry 40x larger: clipping it costs most of the row's
    error unless the rotation spreads it over the block."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[torch.arange(rows), torch.arange(rows) % cols] *= 40
    return w


def grid_weight(rows=16, cols=64, seed=0) -> torch.Tensor:
    """Rows of +-2.5 and +-3.5 (28 of 64 at 3.5): their RMS puts them on the unrotated 4-bit
    grid to 0.2 %, while the rotated row is spread like a Gaussian."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.full((rows, cols), 2.5)
    for row in magnitude:
        row[torch.randperm(cols, generator=generator)[:28]] = 3.5
    signs = torch.randint(0, 2, (rows, cols), generator=generator) * 2 - 1
    return 0.1 * magnitude * signs


def test_rotation_keeps_the_unquantized_layer_output():
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 256, generator=generator), torch.randn(32, 256, generator=generator)
    torch.testing.assert_close(rotate_under_test(x, 128), rotate(x), rtol=0, atol=1e-6)
    x64, w64 = x.double(), w.double()
    torch.testing.assert_close(F.linear(rotate_under_test(x64, 128), rotate_under_test(w64, 128)), F.linear(x64, w64),
                               rtol=1e-12, atol=1e-12)
    for rotated in (False, True):
        flag = torch.tensor(rotated)
        qw = fake_quantize_rotated(w, flag, bits=4, quantizer="rms_gaussian", group_size=0, ste="identity")
        qx = fake_quantize_rotated(x, flag, bits=4, quantizer="rms_gaussian", group_size=0, ste="identity")
        torch.testing.assert_close(qw, effective(w, rotated), rtol=0, atol=1e-6)
        # Rotated, the layer computes Q(x H) Q(W H)^T: the rotations cancel in the product.
        expected = quantize(rotate(x)) @ quantize(rotate(w)).T if rotated else quantize(x) @ quantize(w).T
        torch.testing.assert_close(F.linear(qx, qw), expected, rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_is_the_identity_either_way():
    for rotated in (False, True):
        w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        upstream = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
        q = fake_quantize_rotated(w, torch.tensor(rotated), bits=4, quantizer="rms_gaussian", group_size=0,
                                  ste="identity")
        (grad,) = torch.autograd.grad((q * upstream).sum(), w)
        torch.testing.assert_close(grad, upstream, rtol=0, atol=1e-6)


def test_choice_follows_the_error_comparison():
    helps, hurts = outlier_weight(), grid_weight()
    assert relative_error(rotate(helps)) < 0.2 * relative_error(helps)
    assert relative_error(hurts) < 0.1 * relative_error(rotate(hurts))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    outlier_x = x.clone()
    outlier_x[:, 7] *= 60
    kwargs = dict(bits=4, input_bits=4, quantizer="rms_gaussian", group_size=0)
    for w, inp in [(helps, None), (hurts, None), (helps, x), (hurts, x), (hurts, outlier_x)]:
        assert bool(choose_rotation(w, inp, **kwargs)) == rotation_helps(w, inp)
    assert bool(choose_rotation(helps, None, **kwargs)) and not bool(choose_rotation(hurts, None, **kwargs))
    # An input whose outlier feature dominates its error outvotes a weight that prefers no rotation.
    assert bool(choose_rotation(hurts, outlier_x, **kwargs))


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_compiled_choice_flips_on_schedule(compiler):
    """Weights only, lr 0: the weight is swapped between steps. The choice follows it at
    steps 0, 3, 6 and holds in between, whatever the weight is then; each loss is that of
    the weight quantized as the current choice says."""
    layer = nn.Linear(64, 16, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    policy = lc.Policy(fake_quant=lc.FakeQuant(bits=4, params=r"weight",
                                               adaptive_rotation=lc.AdaptiveRotation(every=3)))
    step = lc.compile(training_step(lambda x, y: F.mse_loss(layer(x), y), opt), policy, compiler=compiler)
    weights = [grid_weight(), outlier_weight(), outlier_weight(), outlier_weight(), grid_weight(), grid_weight(),
               grid_weight(), outlier_weight()]
    expected = [False, False, False, True, True, True, False, False]
    generator = torch.Generator().manual_seed(4)
    for t, (w, rotated) in enumerate(zip(weights, expected)):
        with torch.no_grad():
            layer.weight.copy_(w)
        x, y = torch.randn(8, 64, generator=generator), torch.randn(8, 16, generator=generator)
        loss = step(x, y)
        assert bool(step.state_dict()["runtime"]["tensors"]["fake_quant.rotate.weight"]) == rotated, t
        torch.testing.assert_close(loss, F.mse_loss(F.linear(x, effective(w, rotated)), y), rtol=1e-5, atol=0)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches():
    """From step 10 on, input feature 3 is an outlier, so the first layer's choice flips at step 10."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for t in range(STEPS):
        x, y = torch.randn(16, 64, generator=generator), torch.randn(16, 4, generator=generator)
        if t >= 10:
            x[:, 3] *= 50
        batches.append((x, y))
    return batches


class EagerRoSTE:
    """W4A4 with a per-layer rotation choice, plain STE or CAGE's decoupled correction
    (lambda 0 for the first quarter, then LAM), around torch.optim.AdamW."""

    def __init__(self, model, cage):
        self.model, self.cage = model, cage
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        self.linears = [m for m in model if isinstance(m, nn.Linear)]
        self.rotated = {layer: False for layer in self.linears}
        self.history = []

    def forward(self, x, choose):
        for layer in self.model:
            if not isinstance(layer, nn.Linear):
                x = layer(x)
                continue
            if choose:
                self.rotated[layer] = rotation_helps(layer.weight.detach(), x.detach())
            rotated = self.rotated[layer]
            x = F.linear(straight_through(x, rotated), straight_through(layer.weight, rotated), layer.bias)
        return x

    def step(self, t, x, y):
        loss = F.mse_loss(self.forward(x, t % EVERY == 0), y)
        loss.backward()
        self.history.append(tuple(self.rotated[layer] for layer in self.linears))
        lam = LAM if self.cage and t >= STEPS // 4 else 0.0
        errors = {layer: layer.weight.detach() - effective(layer.weight.detach(), self.rotated[layer])
                  for layer in self.linears}
        self.opt.step()
        with torch.no_grad():
            for layer in self.linears:
                layer.weight -= LR * lam * errors[layer]
        self.opt.zero_grad()
        return loss.detach()


def _policy(cage, every=EVERY):
    correction = lc.CAGE(lam=LAM, total_steps=STEPS, silence_ratio=0.25, ramp="constant") if cage else None
    return lc.Policy(fake_quant=lc.FakeQuant(bits=4, activation_bits=4, correction=correction,
                                             adaptive_rotation=lc.AdaptiveRotation(every=every)))


def _compiled(model, cage, compiler="aot_eager"):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    return opt, lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), _policy(cage), compiler=compiler)


def _flags(step):
    tensors = step.state_dict()["runtime"]["tensors"]
    return tuple(bool(tensors[f"fake_quant.rotate.{i}.weight"]) for i in (0, 2, 4))


@pytest.mark.parametrize("cage", [False, True], ids=["ste", "cage"])
def test_matches_eager_rotation_choice(cage):
    model = _model()
    _, step = _compiled(model, cage)
    losses, history = [], []
    for x, y in _batches():
        losses.append(float(step(x, y)))
        history.append(_flags(step))
    reference = _model()
    eager = EagerRoSTE(reference, cage)
    expected = [float(eager.step(t, x, y)) for t, (x, y) in enumerate(_batches())]
    assert history == eager.history
    # The run exercises both branches and a flip: layer 0 turns to the rotation when the outlier arrives.
    assert {flags[0] for flags in history} == {False, True} and history[9][0] != history[10][0]
    assert any(flags[1] != flags[2] for flags in history)
    assert_close(named_parameters(model), named_parameters(reference), atol=ADAM_ATOL)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert step.backend.runtime.calls == {"choose_rotation": STEPS // EVERY, "step": STEPS - STEPS // EVERY}
    exported = step.export_quantized()
    for index, rotated in zip((0, 2, 4), history[-1]):
        assert exported[f"{index}.weight"].hadamard == rotated
        torch.testing.assert_close(exported.dequantize()[f"{index}.weight"],
                                   effective(model[index].weight.detach(), rotated), rtol=0, atol=1e-6)


def test_checkpoint_resume_keeps_the_choice():
    batches = _batches()
    model = _model()
    opt, step = _compiled(model, cage=True)
    for x, y in batches[:7]:
        step(x, y)
    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "step": step.state_dict()}
    assert any(_flags(step)) and not all(_flags(step)), "a choice that zeros would not restore"
    for x, y in batches[7:13]:
        step(x, y)

    resumed_model = _model()
    resumed_opt, resumed = _compiled(resumed_model, cage=True)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["step"])
    for x, y in batches[7:13]:
        resumed(x, y)
    assert _flags(resumed) == _flags(step)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lc.AdaptiveRotation(every=0), r"AdaptiveRotation.every must be an int >= 1"),
        (lambda: lc.AdaptiveRotation(every=2.5), r"AdaptiveRotation.every must be an int >= 1"),
        (lambda: lc.FakeQuant(adaptive_rotation=10),
         r"FakeQuant.adaptive_rotation must be a lordo_compile.AdaptiveRotation"),
        (lambda: lc.FakeQuant(hadamard=True, adaptive_rotation=lc.AdaptiveRotation()),
         r"FakeQuant.adaptive_rotation .* cannot be combined with hadamard=True"),
    ],
)
def test_bad_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _run_once(model, policy, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="aot_eager")
    step(x, y)


def test_rows_it_cannot_rotate_are_refused():
    policy = lc.Policy(fake_quant=lc.FakeQuant(adaptive_rotation=lc.AdaptiveRotation(every=2)))
    with pytest.raises(ValueError, match=r"FakeQuant.adaptive_rotation: 0.weight has rows of 48 values"):
        _run_once(nn.Sequential(nn.Linear(48, 8)), policy, torch.randn(4, 48), torch.randn(4, 8))


class TestAdaptiveRotationGraphs(expecttest.TestCase):
    def test_step_reads_the_choice_and_the_choice_phase_makes_it(self):
        torch.manual_seed(0)
        model = MLP((8, 16, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        policy = lc.Policy(fake_quant=lc.FakeQuant(bits=4, activation_bits=4,
                                                   adaptive_rotation=lc.AdaptiveRotation(every=10)))
        step = capture(training_step(lambda x, y: F.mse_loss(model(x), y), opt), torch.randn(4, 8),
                       torch.randn(4, 2), policy=policy)
        self.assertExpectedInline(stage_diff(step, "captured", "fake_quant"), """\
--- captured
+++ fake_quant
@@ -19,5 +19,11 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
-input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
+fake_quant_rotate_net_0_weight: b8[]  optimizer_state  [fake_quant.rotate.net.0.weight]  <fake_quant>
+fake_quant_rotate_net_2_weight: b8[]  optimizer_state  [fake_quant.rotate.net.2.weight]  <fake_quant>
+fake_quantize_net_0_weight = lordo.fake_quantize_rotated(net_0_weight, fake_quant_rotate_net_0_weight, bits=4, quantizer='rms_gaussian', group_size=0, ste='identity')  # f32[16, 8]  forward  <fake_quant>
+fake_quantize_input_net_0_weight = lordo.fake_quantize_rotated(x, fake_quant_rotate_net_0_weight, bits=4, quantizer='rms_gaussian', group_size=0, ste='identity')  # f32[4, 8]  forward  <fake_quant>
+input_1 = torch._C._nn.linear(fake_quantize_input_net_0_weight, fake_quantize_net_0_weight, net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
-input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
+fake_quantize_net_2_weight = lordo.fake_quantize_rotated(net_2_weight, fake_quant_rotate_net_2_weight, bits=4, quantizer='rms_gaussian', group_size=0, ste='identity')  # f32[2, 16]  forward  <fake_quant>
+fake_quantize_input_net_2_weight = lordo.fake_quantize_rotated(input_2, fake_quant_rotate_net_2_weight, bits=4, quantizer='rms_gaussian', group_size=0, ste='identity')  # f32[4, 16]  forward  <fake_quant>
+input_3 = torch._C._nn.linear(fake_quantize_input_net_2_weight, fake_quantize_net_2_weight, net_2_bias)  # f32[4, 2]  forward
 loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
""")
        self.assertExpectedInline(stage_diff(step, "captured", "fake_quant", events="choose_rotation"), """\
--- captured
+++ fake_quant
@@ -19,5 +19,13 @@
 step_net_2_bias: f32[]  optimizer_state  [step]
-input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[4, 16]  forward
+fake_quant_rotate_net_0_weight: b8[]  optimizer_state  [fake_quant.rotate.net.0.weight]  <fake_quant>
+fake_quant_rotate_net_2_weight: b8[]  optimizer_state  [fake_quant.rotate.net.2.weight]  <fake_quant>
+choose_rotation_net_0_weight = lordo.choose_rotation(net_0_weight, x, bits=4, input_bits=4, quantizer='rms_gaussian', group_size=0)  # b8[]  forward  <fake_quant>
+fake_quantize_net_0_weight = lordo.fake_quantize_rotated(net_0_weight, choose_rotation_net_0_weight, bits=4, quantizer='rms_gaussian', group_size=0, ste='identity')  # f32[16, 8]  forward  <fake_quant>
+fake_quantize_input_net_0_weight = lordo.fake_quantize_rotated(x, choose_rotation_net_0_weight, bits=4, quantizer='rms_gaussian', group_size=0, ste='identity')  # f32[4, 8]  forward  <fake_quant>
+input_1 = torch._C._nn.linear(fake_quantize_input_net_0_weight, fake_quantize_net_0_weight, net_0_bias)  # f32[4, 16]  forward
 input_2 = torch.nn.functional.relu(input_1, inplace=False)  # f32[4, 16]  forward
-input_3 = torch._C._nn.linear(input_2, net_2_weight, net_2_bias)  # f32[4, 2]  forward
+choose_rotation_net_2_weight = lordo.choose_rotation(net_2_weight, input_2, bits=4, input_bits=4, quantizer='rms_gaussian', group_size=0)  # b8[]  forward  <fake_quant>
+fake_quantize_net_2_weight = lordo.fake_quantize_rotated(net_2_weight, choose_rotation_net_2_weight, bits=4, quantizer='rms_gaussian', group_size=0, ste='identity')  # f32[2, 16]  forward  <fake_quant>
+fake_quantize_input_net_2_weight = lordo.fake_quantize_rotated(input_2, choose_rotation_net_2_weight, bits=4, quantizer='rms_gaussian', group_size=0, ste='identity')  # f32[4, 16]  forward  <fake_quant>
+input_3 = torch._C._nn.linear(fake_quantize_input_net_2_weight, fake_quantize_net_2_weight, net_2_bias)  # f32[4, 2]  forward
 loss = torch.nn.functional.mse_loss(input_3, y)  # f32[]  loss
@@ -72,2 +80,4 @@
 detach = loss.detach()  # f32[]  output
+write_rotate_net_0_weight = fake_quant_rotate_net_0_weight.copy_(choose_rotation_net_0_weight)  # b8[]  writeback  [fake_quant.rotate.net.0.weight]  <fake_quant>
+write_rotate_net_2_weight = fake_quant_rotate_net_2_weight.copy_(choose_rotation_net_2_weight)  # b8[]  writeback  [fake_quant.rotate.net.2.weight]  <fake_quant>
 return (detach,)
""")

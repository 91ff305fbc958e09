"""Fake quantization and CAGE against an eager implementation of ALGORITHMS.md section 4."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import assert_close, named_parameters
from lordo_compile.ops.optim import adamw as adamw_math
from lordo_compile.ops.quant import fake_quantize_math
from lordo_compile.testing import training_step

STEPS, LR, WD = 20, 1e-2, 0.1  # LR and WD as in test_low_rank, whose eager GaLore is reused
# The paper's Gaussian-MSE clipping constants for 3 and 4 bits; 2 and 8 are checked below.
CLIP = {2: 1.4935, 3: 2.0511, 4: 2.5139, 8: 3.9222}


def reference_rms(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest point of the per-row grid {(j - (2^b - 1)/2) step : j = 0 .. 2^b - 1}."""
    rms = w.pow(2).mean(-1, keepdim=True).sqrt()
    step = 2 * (CLIP[bits] * rms) / (2**bits - 1)
    grid = torch.arange(2**bits, dtype=w.dtype) - (2**bits - 1) / 2
    levels = grid[(w.unsqueeze(-1) / step.unsqueeze(-1) - grid).abs().argmin(-1)]
    return levels * step


def reference_absmax(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """torchao's symmetric per-group convention, in numpy float32."""
    x = w.detach().numpy().astype(np.float32).reshape(w.shape[0], -1, group)
    amax = np.abs(x).max(-1, keepdims=True)
    scale = np.maximum(amax / np.float32((2**bits - 1) / 2), np.finfo(np.float32).tiny)
    q = np.clip(np.rint(x * (np.float32(1.0) / scale)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return torch.from_numpy((q * scale).reshape(w.shape))


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's construction; normalised in float32 (divided by sqrt(n)), as the pass does."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return torch.from_numpy(h).float() / math.sqrt(n)


def rotate(x, block, inverse=False):
    h = hadamard(block)
    return (x.reshape(*x.shape[:-1], -1, block) @ (h.T if inverse else h)).reshape(x.shape)


def reference_quantize(w, bits, quantizer, group, rotated):
    """Q(W) as the forward uses it: rotated by H in blocks, quantized, rotated back."""
    block = min(128, w.shape[-1])
    if rotated:
        w = rotate(w, block)
    q = reference_rms(w, bits) if quantizer == "rms_gaussian" else reference_absmax(w, bits, group or w.shape[-1])
    return rotate(q, block, inverse=True) if rotated else q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rms_gaussian_is_the_nearest_grid_point(bits):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 3, 16)[:, None]
    got = fake_quantize_math(w, bits=bits, quantizer="rms_gaussian", group_size=0, hadamard=False, ste="identity")
    torch.testing.assert_close(got, reference_rms(w, bits), rtol=0, atol=0)
    step = 2 * CLIP[bits] * w.pow(2).mean(-1, keepdim=True).sqrt() / (2**bits - 1)
    levels = got / step + 0.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and len(torch.unique(got[0])) <= 2**bits
    assert (got != 0).all(), "the grid has no zero level"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gaussian_clipping_constants_minimise_gaussian_mse(bits):
    x = torch.linspace(-10, 10, 400_001, dtype=torch.float64)
    density = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi) * (x[1] - x[0])

    def mse(c):
        step = 2 * c / (2**bits - 1)
        k = torch.clamp(torch.round(x / step + 0.5), 1 - 2 ** (bits - 1), 2 ** (bits - 1))
        return float((((k - 0.5) * step - x) ** 2 * density).sum())

    best = mse(CLIP[bits])
    assert best <= mse(CLIP[bits] * 1.01) and best <= mse(CLIP[bits] * 0.99)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_absmax_matches_the_torchao_convention(bits, group):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(group + bits))
    got = fake_quantize_math(w, bits=bits, quantizer="absmax", group_size=group, hadamard=False, ste="identity")
    torch.testing.assert_close(got, reference_absmax(w, bits, group), rtol=0, atol=0)


@pytest.mark.parametrize("group", [32, 128])
def test_absmax_int4_equals_torchaos_fake_quantizer(group):
    qat = pytest.importorskip("torchao.quantization.qat")
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(group))
    config = qat.IntxFakeQuantizeConfig(torch.int4, group_size=group, is_symmetric=True)
    expected = qat.IntxFakeQuantizer(config)(w)
    got = fake_quantize_math(w, bits=4, quantizer="absmax", group_size=group, hadamard=False, ste="identity")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_hadamard_rotation_is_undone_and_pairs_with_rotated_activations():
    generator = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 256, generator=generator), torch.randn(5, 256, generator=generator)
    qw = fake_quantize_math(w, bits=4, quantizer="rms_gaussian", group_size=0, hadamard=True, ste="identity")
    torch.testing.assert_close(qw, reference_quantize(w, 4, "rms_gaussian", None, True), rtol=1e-6, atol=1e-6)
    qx = fake_quantize_math(x, bits=4, quantizer="rms_gaussian", group_size=0, hadamard=True, ste="identity")
    h = torch.block_diag(hadamard(128), hadamard(128))
    rotated_product = reference_rms(x @ h, 4) @ reference_rms(w @ h, 4).T
    torch.testing.assert_close(F.linear(qx, qw), rotated_product, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ste", ["identity", "masked"])
def test_straight_through_gradient(ste):
    w = (torch.randn(8, 32, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    upstream = torch.randn(8, 32)
    q = lc.ops.quant.fake_quantize(w, bits=3, quantizer="rms_gaussian", group_size=0, hadamard=False, ste=ste)
    (grad,) = torch.autograd.grad((q * upstream).sum(), w)
    clip = CLIP[3] * w.detach().pow(2).mean(-1, keepdim=True).sqrt()
    inside = w.detach().abs() <= clip
    assert (~inside).any() and inside.any()
    torch.testing.assert_close(grad, upstream * inside if ste == "masked" else upstream)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=generator), torch.randn(16, 4, generator=generator)) for _ in range(STEPS)]


class CanonicalAdamW:
    """AdamW as the compiled step computes it (`lordo.adamw`'s math, checked against
    torch.optim.AdamW in test_parity), run eagerly. The absmax grid puts every group's
    negative extreme on a rounding tie (-(2^b - 1)/2 scales), so the last-bit differences
    between two AdamW implementations would move it a whole level: the base update must be
    the same arithmetic for a test of what section 4 adds."""

    def __init__(self, params):
        self.params = list(params)
        self.state = {p: [torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())] for p in self.params}
        self.hyper = [torch.tensor(v, dtype=torch.float64) for v in (LR, 0.9, 0.999, 1e-8, WD)]

    @torch.no_grad()
    def step(self):
        for p in self.params:
            new = adamw_math(p, p.grad, *self.state[p], *self.hyper, maximize=False)
            p.copy_(new[0])
            self.state[p] = list(new[1:])

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def _optimizer(kind, params):
    if kind == "canonical_adamw":
        return CanonicalAdamW(params)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=WD)


def _lam(t, lam, silence_ratio, total, ramp):
    start = int(silence_ratio * total)
    if t < start:
        return 0.0
    return lam if ramp == "constant" else lam * min(1.0, (t - start + 1) / (total - start))


CONFIGS = {
    "rms4 decoupled": dict(bits=4, quantizer="rms_gaussian", form="decoupled"),
    "rms3 coupled": dict(bits=3, quantizer="rms_gaussian", form="coupled"),
    "absmax4 g32 decoupled": dict(bits=4, quantizer="absmax", group_size=32, form="decoupled",
                                  optimizer="canonical_adamw"),
    "absmax4 g32 coupled": dict(bits=4, quantizer="absmax", group_size=32, form="coupled",
                                optimizer="canonical_adamw"),
    "rms4 coupled sgd": dict(bits=4, quantizer="rms_gaussian", form="coupled", optimizer="sgd"),
    "rms4 hadamard masked constant": dict(bits=4, quantizer="rms_gaussian", hadamard=True, ste="masked",
                                          form="decoupled", ramp="constant", optimizer="sgd"),
    "w4a4 hadamard": dict(bits=4, quantizer="rms_gaussian", hadamard=True, activation_bits=4, form="decoupled"),
    "ste only": dict(bits=4, quantizer="absmax", group_size=32, form=None, optimizer="canonical_adamw"),
}


class EagerQAT:
    """Section 4 written out around a torch.optim base optimizer."""

    def __init__(self, model, config, silence_ratio=0.25):
        self.model, self.c = model, config
        self.opt = _optimizer(config.get("optimizer", "adamw"), model.parameters())
        self.lam, self.silence_ratio = config.get("lam", 5.0), silence_ratio
        self.linears = [m for m in model if isinstance(m, nn.Linear)]

    def quantize(self, w, bits=None):
        c = self.c
        return reference_quantize(w, bits or c["bits"], c["quantizer"], c.get("group_size"), c.get("hadamard", False))

    def straight_through(self, x, bits, masked):
        """Q(x) forward; backward the identity, or the clipping mask, in the rotated basis."""
        c = self.c
        q = self.quantize(x.detach(), bits)
        block = min(128, x.shape[-1])
        if not c.get("hadamard"):
            inside = x.detach().abs() <= CLIP[bits] * x.detach().pow(2).mean(-1, keepdim=True).sqrt()
            return q + (x - x.detach()) * (inside if masked else 1)
        y = rotate(x, block)
        through = y - y.detach()
        if masked:
            inside = y.detach().abs() <= CLIP[bits] * y.detach().pow(2).mean(-1, keepdim=True).sqrt()
            through = through * inside
        return q + rotate(through, block, inverse=True)

    def forward(self, x):
        c = self.c
        for layer in self.model:
            if not isinstance(layer, nn.Linear):
                x = layer(x)
                continue
            w = self.straight_through(layer.weight, c["bits"], c.get("ste") == "masked")
            if c.get("activation_bits"):
                x = self.straight_through(x, c["activation_bits"], False)
            x = F.linear(x, w, layer.bias)
        return x

    def step(self, t, x, y):
        c = self.c
        loss = F.mse_loss(self.forward(x), y)
        loss.backward()
        lam = _lam(t, self.lam, self.silence_ratio, STEPS, c.get("ramp", "linear"))
        errors = {layer: layer.weight.detach() - self.quantize(layer.weight.detach()) for layer in self.linears}
        with torch.no_grad():
            if c["form"] == "coupled":
                for layer in self.linears:
                    layer.weight.grad += lam * errors[layer]
            self.opt.step(t) if hasattr(self.opt, "low_rank") else self.opt.step()
            if c["form"] == "decoupled":
                for layer in self.linears:
                    layer.weight -= LR * lam * errors[layer]
        self.opt.zero_grad()
        return loss.detach()


def _policy(config, silence_ratio=0.25):
    correction = None
    if config["form"] is not None:
        correction = lc.CAGE(lam=config.get("lam", 5.0), total_steps=STEPS, silence_ratio=silence_ratio,
                             ramp=config.get("ramp", "linear"), form=config["form"])
    options = {k: v for k, v in config.items() if k not in ("form", "ramp", "optimizer", "lam")}
    return lc.Policy(fake_quant=lc.FakeQuant(correction=correction, **options))


def _compiled_run(config, compiler="aot_eager", low_rank=None, make_model=_model, batches=_batches,
                  quantized_state=None):
    model = make_model()
    kind = config.get("optimizer", "adamw")
    opt = _optimizer("adamw" if kind == "canonical_adamw" else kind, model.parameters())
    policy = _policy(config)
    if low_rank is not None:
        policy = lc.Policy(fake_quant=policy.fake_quant, low_rank=low_rank)
    policy = dataclasses.replace(policy, quantized_state=quantized_state)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler=compiler)
    losses = [float(step(x, y)) for x, y in batches()]
    return model, step, losses


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_eager_cage(name):
    config = CONFIGS[name]
    model, step, losses = _compiled_run(config)
    reference = _model()
    eager = EagerQAT(reference, config)
    expected = [float(eager.step(t, x, y)) for t, (x, y) in enumerate(_batches())]
    assert_close(named_parameters(model), named_parameters(reference))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    tensors = step.state_dict()["runtime"]["tensors"]
    # The step counter exists for lambda_t's schedule: with a correction, and only then.
    if config["form"] is None:
        assert "fake_quant.step" not in tensors
    else:
        assert int(tensors["fake_quant.step"]) == STEPS


def test_correction_moves_weights_toward_the_grid():
    config = dict(bits=3, quantizer="rms_gaussian", form="decoupled")
    plain, _, _ = _compiled_run(dict(config, form=None))
    corrected, _, _ = _compiled_run(config)

    def error(model):
        return sum(float((m.weight - reference_rms(m.weight.detach(), 3)).norm()) for m in model
                   if isinstance(m, nn.Linear))

    assert error(corrected) < error(plain)


@pytest.mark.parametrize("form", ["coupled", "decoupled"])
def test_composes_with_galore(form):
    """GaLore's projected AdamW as the base update: coupled, the correction is projected with
    the gradient (the refresh at step 12 sees it too); decoupled, it is added full rank after
    the projected step. lam is small here: a large coupled correction, whose spectrum is as
    flat as the quantization error's, leaves the refresh's top singular vectors nearly
    degenerate, so two SVDs of last-bit-different inputs part ways."""
    import test_low_rank as galore

    config = dict(bits=4, quantizer="rms_gaussian", form=form, lam=0.5)
    low_rank = lc.LowRank(rank=galore.RANK, update_proj_gap=galore.GAP, scale=galore.SCALE)
    model, step, _ = _compiled_run(config, low_rank=low_rank, make_model=galore._model, batches=galore._batches)
    reference = galore._model()
    eager = EagerQAT(reference, config)
    eager.opt = galore.EagerGaLore(reference, "svd", "keep", [None, None])
    for t, (x, y) in enumerate(galore._batches()):
        eager.step(t, x, y)
    assert_close(named_parameters(model), named_parameters(reference))


@pytest.mark.parametrize("name", ["rms4 decoupled", "absmax4 g32 coupled", "w4a4 hadamard",
                                  "rms4 decoupled, 8-bit moments"])
def test_export_gives_codes_and_exactly_the_forward_weights(name):
    held = name.endswith("8-bit moments")
    config = CONFIGS[name.removesuffix(", 8-bit moments")]
    # Blocks of 32 from 256 entries: the model's larger weights' Adam moments are held.
    model, step, _ = _compiled_run(config, quantized_state=lc.QuantizedState(block_size=32, min_size=256)
                                   if held else None)
    assert held == any(key.startswith("quantized_state.codes.") for key in step.state_dict()["runtime"]["tensors"])
    exported = step.export_quantized()
    assert sorted(exported.tensors) == ["0.weight", "2.weight", "4.weight"]
    for key, values in exported.dequantize().items():
        layer = model[int(key.split(".")[0])]
        expected = reference_quantize(layer.weight.detach(), config["bits"], config["quantizer"],
                                      config.get("group_size"), config.get("hadamard", False))
        assert torch.equal(values, expected), key
        codes = exported[key].codes
        assert codes.shape == layer.weight.shape and not codes.is_floating_point()
        assert int(codes.max()) - int(codes.min()) < 2 ** config["bits"]


def test_export_needs_a_fake_quant_policy():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy(), compiler="aot_eager")
    step(*_batches()[0])
    with pytest.raises(ValueError, match="needs a policy whose forward reads quantized weights"):
        step.export_quantized()


def test_decoupled_correction_under_lordo_is_minus_lr_lambda_error():
    """One LoRDO step with and without the correction, from the same state and the same
    quantized forward: they differ by exactly -lr lambda (W - Q(W)), added full rank."""
    results = []
    for correction in (None, lc.CAGE(lam=3.0, total_steps=10, silence_ratio=0.0, ramp="constant")):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        policy = lc.Policy(fake_quant=lc.FakeQuant(bits=4, correction=correction),
                           lordo=lc.LoRDO(rank=4, sync_every=4))
        step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="aot_eager")
        step(*_batches()[0])
        results.append(model)
    start = _model()
    for plain, corrected, initial in zip(results[0], results[1], start):
        if isinstance(initial, nn.Linear):
            error = initial.weight - reference_rms(initial.weight.detach(), 4)
            torch.testing.assert_close(corrected.weight - plain.weight, -LR * 3.0 * error, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5), r"FakeQuant.bits must be one of \(2, 3, 4, 8\), got 5"),
        (dict(quantizer="nf4"), r"FakeQuant.quantizer must be one of"),
        (dict(group_size=32), r"group_size applies to quantizer='absmax'"),
        (dict(quantizer="absmax", group_size=1), r"FakeQuant.group_size must be an int >= 2"),
        (dict(ste="clipped"), r"FakeQuant.ste must be one of"),
        (dict(activation_bits=6), r"FakeQuant.activation_bits must be one of"),
        (dict(correction=10.0), r"FakeQuant.correction must be a lordo_compile.CAGE"),
    ],
)
def test_bad_fake_quant_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.FakeQuant(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_steps=0), r"CAGE.total_steps must be an int >= 1"),
        (dict(total_steps=10, silence_ratio=1.0), r"CAGE.silence_ratio must be in \[0, 1\)"),
        (dict(total_steps=10, lam=-1), r"CAGE.lam must be a number >= 0"),
        (dict(total_steps=10, form="both"), r"CAGE.form must be one of"),
        (dict(total_steps=10, ramp="cosine"), r"CAGE.ramp must be one of"),
    ],
)
def test_bad_cage_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.CAGE(**kwargs)


def test_cage_preset_needs_the_run_length():
    with pytest.raises(ValueError, match="Policy.cage needs total_steps"):
        lc.Policy.cage(bits=4)


def test_hadamard_on_rows_it_cannot_rotate_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 8))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    policy = lc.Policy(fake_quant=lc.FakeQuant(hadamard=True))
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="aot_eager")
    with pytest.raises(ValueError, match="Hadamard rotation needs rows whose length is a multiple of 128"):
        step(torch.randn(4, 48), torch.randn(4, 8))


@pytest.mark.inductor
def test_inductor_matches_eager_cage():
    """SGD and weights only: Inductor reorders the quantizer's float ops, and Adam or 4-bit
    activations would turn a last-bit difference at a rounding boundary into a whole grid step."""
    config = CONFIGS["rms4 hadamard masked constant"]
    model, step, losses = _compiled_run(config, compiler="inductor")
    reference = _model()
    eager = EagerQAT(reference, config)
    expected = [float(eager.step(t, x, y)) for t, (x, y) in enumerate(_batches())]
    assert_close(named_parameters(model), named_parameters(reference))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)

"""ECO against an eager implementation of ALGORITHMS.md section 5 written here."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import assert_close, named_parameters
from lordo_compile.ops.eco import quantize, uniform_noise
from lordo_compile.testing import training_step

STEPS, LR, WD, BETAS, EPS, MOMENTUM = 20, 1e-2, 0.1, (0.9, 0.999), 1e-8, 0.9
# Every finite float8_e4m3fn value, ascending: the grid stochastic rounding chooses on.
E4M3 = torch.unique(torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float())
E4M3 = E4M3[torch.isfinite(E4M3)]


def reference_quantize(x, fmt, scale="per_row", rounding="nearest", noise=None, group=32):
    """Grid values of x: scale from max|x|, then the nearest grid point, or the one above
    (toward +inf) when noise < the distance from the one below, in grid spacings."""
    shape = x.shape
    if fmt == "int4":
        x = x.reshape(shape[0], -1, group)
        noise = None if noise is None else noise.reshape(x.shape)
    amax = x.abs().amax() if scale == "per_tensor" and fmt != "int4" else x.abs().amax(-1, keepdim=True)
    top = {"fp8_e4m3": 448.0, "int8": 127.0, "int4": 7.0}[fmt]
    step = (amax / top).clamp_min(torch.finfo(torch.float32).smallest_normal)
    y = x / step
    if fmt == "fp8_e4m3":
        grid = E4M3
    else:
        grid = torch.arange(-top, top + 1)
    index = torch.searchsorted(grid, y.clamp(-top, top).contiguous()).clamp(1, len(grid) - 1)
    lower, upper = grid[index - 1], grid[index]
    exact = grid[index.clamp(max=len(grid) - 1)] == y
    if rounding == "nearest":
        if fmt == "fp8_e4m3":
            chosen = y.clamp(-top, top).to(torch.float8_e4m3fn).float()
        else:
            chosen = torch.from_numpy(np.rint(y.numpy()))
    else:
        fraction = (y - lower) / (upper - lower)
        chosen = torch.where(exact, y, torch.where(noise < fraction, upper, lower))
    return (chosen * step).reshape(shape)


@pytest.mark.parametrize("fmt, scale", [("fp8_e4m3", "per_row"), ("fp8_e4m3", "per_tensor"), ("int8", "per_row"),
                                        ("int8", "per_tensor"), ("int4", "per_row")])
def test_nearest_quantizers(fmt, scale):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 16)[:, None]
    got = quantize(x, format=fmt, scale=scale, group_size=32, rounding="nearest")
    torch.testing.assert_close(got, reference_quantize(x, fmt, scale), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4"])
def test_stochastic_rounding_is_on_the_grid_and_unbiased(fmt):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    draws = []
    for step in range(400):
        noise = uniform_noise(x, torch.tensor(step), seed=3)
        got = quantize(x, format=fmt, scale="per_row", group_size=32, rounding="stochastic", noise=noise)
        torch.testing.assert_close(got, reference_quantize(x, fmt, rounding="stochastic", noise=noise),
                                   rtol=0, atol=0)
        draws.append(got)
    nearest = quantize(x, format=fmt, scale="per_row", group_size=32, rounding="nearest")
    mean = torch.stack(draws).mean(0)
    assert (mean - x).abs().mean() < 0.2 * (nearest - x).abs().mean()


def test_noise_is_uniform_reproducible_and_fresh_each_step():
    like = torch.empty(256, 256)
    a, b = uniform_noise(like, torch.tensor(5), seed=0), uniform_noise(like, torch.tensor(5), seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, uniform_noise(like, torch.tensor(6), seed=0))
    assert not torch.equal(a, uniform_noise(like, torch.tensor(5), seed=1))
    assert 0 <= float(a.min()) and float(a.max()) < 1
    counts = torch.histc(a, bins=10, min=0, max=1)
    assert float((counts / a.numel() - 0.1).abs().max()) < 0.005


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 32, generator=generator), torch.randn(16, 4, generator=generator)) for _ in range(STEPS)]


def _optimizer(kind, params, lr=LR, wd=WD, betas=BETAS, eps=EPS, momentum=MOMENTUM):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas, eps=eps)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)


class EagerECO:
    """Section 5 for the linear weights; biases through torch.optim as usual. The
    hyperparameters default to this file's; the fuzz test (test_fuzz.py) draws them."""

    def __init__(self, model, kind, fmt, scale, rounding, mode, seed=0, *, lr=LR, wd=WD, betas=BETAS, eps=EPS,
                 momentum=MOMENTUM, group=32, weights=None):
        self.model, self.kind, self.mode = model, kind, mode
        self.q = dict(fmt=fmt, scale=scale, rounding=rounding, group=group)
        self.seed = seed
        self.lr, self.wd, self.betas, self.eps, self.momentum = lr, wd, betas, eps, momentum
        params = list(model.parameters())
        self.salt = {p: i for i, p in enumerate(params)}
        self.weights = weights if weights is not None else [m.weight for m in model if isinstance(m, nn.Linear)]
        self.dense = _optimizer(kind, [p for p in params if all(p is not w for w in self.weights)], lr, wd, betas,
                                eps, momentum)
        self.state = {w: dict(m=torch.zeros_like(w), v=torch.zeros_like(w), t=0) for w in self.weights}

    def quantize(self, w, step, rounding=None, param=None):
        """Q(w); stochastic noise is drawn for `param` (default: w itself) at `step`."""
        rounding = rounding or self.q["rounding"]
        salt = self.salt[param if param is not None else w]
        noise = uniform_noise(w, torch.tensor(step), self.seed * 1_000_003 + salt) if rounding == "stochastic" else None
        return reference_quantize(w.detach(), self.q["fmt"], self.q["scale"], rounding, noise, self.q["group"])

    def forward(self, x, k):
        for layer in self.model:
            if isinstance(layer, nn.Linear) and self.mode == "master":
                w = layer.weight
                x = F.linear(x, self.quantize(w, k, "nearest") + (w - w.detach()), layer.bias)
            else:
                x = layer(x)
        return x

    @torch.no_grad()
    def step(self, k, x, y):
        if k == 0 and self.mode != "master":
            for w in self.weights:
                w.copy_(self.quantize(w, k, "nearest"))
        with torch.enable_grad():
            loss = F.mse_loss(self.forward(x, k), y)
            loss.backward()
        self.dense.step()
        self.dense.zero_grad()
        lr, wd, (beta1, beta2), eps, momentum = self.lr, self.wd, self.betas, self.eps, self.momentum
        for w in self.weights:
            s, g = self.state[w], w.grad
            if self.kind == "sgd":
                s["m"] = momentum * s["m"] + (g + wd * w)
                tentative = w - lr * s["m"]
                scale_error = (1 - 1 / momentum) / lr
            else:
                s["t"] += 1
                decayed = w * (1 - lr * wd)
                s["m"] = s["m"] + (1 - beta1) * (g - s["m"])
                s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
                bc1, bc2 = 1 - beta1 ** s["t"], 1 - beta2 ** s["t"]
                denom = s["v"].sqrt() / bc2**0.5 + eps
                tentative = decayed - (lr / bc1) * s["m"] / denom
                scale_error = bc1 / lr * (1 - 1 / beta1) * denom
            if self.mode == "master":
                w.copy_(tentative)
            else:
                quantized = self.quantize(tentative, k, param=w)
                if self.mode == "eco":
                    s["m"] = s["m"] + scale_error * (tentative - quantized)
                w.copy_(quantized)
            w.grad = None
        return loss.detach()


def _compiled(kind, policy, compiler="aot_eager"):
    model = _model()
    opt = _optimizer(kind, model.parameters())
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler=compiler)
    losses = [float(step(x, y)) for x, y in _batches()]
    with step.materialized():
        trained = _model()
        trained.load_state_dict(model.state_dict())
    return trained, step, losses


CASES = [(kind, fmt, rounding) for kind in ("sgd", "adamw") for fmt in ("fp8_e4m3", "int8", "int4")
         for rounding in ("nearest", "stochastic")]


@pytest.mark.parametrize("kind, fmt, rounding", CASES)
def test_matches_eager_eco(kind, fmt, rounding):
    model, step, losses = _compiled(kind, lc.Policy.eco(format=fmt, rounding=rounding, seed=7))
    reference = _model()
    eager = EagerECO(reference, kind, fmt, "per_row", rounding, "eco", seed=7)
    expected = [float(eager.step(k, x, y)) for k, (x, y) in enumerate(_batches())]
    assert_close(named_parameters(model), named_parameters(reference))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    for w in (model[0].weight, model[2].weight):
        torch.testing.assert_close(w, reference_quantize(w.detach(), fmt), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["naive", "master"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_baselines_match_eager(kind, mode):
    model, step, losses = _compiled(kind, lc.Policy.eco(format="int8", mode=mode))
    reference = _model()
    eager = EagerECO(reference, kind, "int8", "per_row", "nearest", mode)
    expected = [float(eager.step(k, x, y)) for k, (x, y) in enumerate(_batches())]
    assert_close(named_parameters(model), named_parameters(reference))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)



def test_sgd_without_momentum_is_refused():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy.eco(), compiler="aot_eager")
    with pytest.raises(NotImplementedError, match=r"ECO has an update for SGD with momentum and for AdamW; 0.weight"):
        step(*_batches()[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(format="fp4"), r"ECO.format must be one of"),
        (dict(rounding="up"), r"ECO.rounding must be one of"),
        (dict(mode="lossless"), r"ECO.mode must be one of"),
        (dict(scale="per_block"), r"ECO.scale must be one of"),
        (dict(group_size=1), r"ECO.group_size must be an int >= 2"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.ECO(**kwargs)


def test_no_full_precision_copy_persists_between_steps():
    model = _model()
    opt = _optimizer("adamw", model.parameters())
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy.eco(format="int4"),
                      compiler="aot_eager")
    for x, y in _batches()[:3]:
        step(x, y)
    report = step.memory_report()
    runtime = step.backend.runtime
    for layer, name in ((model[0], "0.weight"), (model[2], "2.weight"), (model[4], "4.weight")):
        w = layer.weight
        assert w.untyped_storage().nbytes() == 0, name
        held = {k: t for k, t in runtime.tensors.items() if runtime.specs[k].param == name}
        assert sorted(held) == [f"eco.codes.{name}", f"eco.scales.{name}"]
        codes, scales = held[f"eco.codes.{name}"], held[f"eco.scales.{name}"]
        assert codes.dtype == torch.uint8 and codes.numel() == w.numel() // 2
        assert scales.numel() == w.numel() // 32
        assert sorted(opt.state[w]) == ["exp_avg", "exp_avg_sq", "step"]  # Adam's moments, no master weight
        assert report.row(name).weight_bytes == codes.numel() + 4 * scales.numel()
    with step.materialized():
        torch.testing.assert_close(model[0].weight, reference_quantize(model[0].weight.detach(), "int4"),
                                   rtol=0, atol=0)
    assert model[0].weight.untyped_storage().nbytes() == 0


def test_checkpoint_round_trip_continues_exactly():
    def fresh():
        model = _model()
        opt = _optimizer("adamw", model.parameters())
        step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                          lc.Policy.eco(format="fp8_e4m3", rounding="stochastic", seed=3), compiler="aot_eager")
        return model, opt, step

    batches = _batches()
    model, opt, step = fresh()
    for x, y in batches:
        step(x, y)
    with step.materialized():
        expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, step = fresh()
    for x, y in batches[:7]:
        step(x, y)
    with step.materialized():
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
                 "step": step.state_dict()}
    resumed_model, resumed_opt, resumed = fresh()
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["step"])
    for x, y in batches[7:]:
        resumed(x, y)
    with resumed.materialized():
        for key, value in resumed_model.state_dict().items():
            assert torch.equal(value, expected[key]), key


@pytest.mark.inductor
@pytest.mark.parametrize("fmt, rounding", [("int4", "stochastic"), ("fp8_e4m3", "nearest")])
def test_inductor_rebuilds_freed_weights_and_matches_eager(fmt, rounding):
    # fp8: the non-finite guard's select of fp8 codes failed in Inductor's C++ codegen at these
    # shapes ("Promotion for Float8 Types is not supported"); it now selects their bytes.
    model, step, losses = _compiled("adamw", lc.Policy.eco(format=fmt, rounding=rounding), compiler="inductor")
    reference = _model()
    eager = EagerECO(reference, "adamw", fmt, "per_row", rounding, "eco")
    expected = [float(eager.step(k, x, y)) for k, (x, y) in enumerate(_batches())]
    assert_close(named_parameters(model), named_parameters(reference))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


@pytest.mark.inductor
def test_inductor_lends_stored_weights_no_storage_during_a_call(monkeypatch):
    # The graph holds the decoded weights as its own buffers; what it would write into the
    # weights is freed right after each call, so under Inductor those writes are dropped and
    # the weights get no storage: one weight's worth of fp32 less during the step.
    model = _model()
    opt = _optimizer("adamw", model.parameters())
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy.eco(format="int8", rounding="nearest"), compiler="inductor")
    batches = _batches()[:4]
    losses = [float(step(*batches[0]))]
    stored = [name for name, p in model.named_parameters() if p.untyped_storage().nbytes() == 0]
    assert stored == ["0.weight", "2.weight", "4.weight"]
    lent = []
    resize = torch.UntypedStorage.resize_
    monkeypatch.setattr(torch.UntypedStorage, "resize_", lambda storage, size: (lent.append(size), resize(storage, size))[1])
    losses += [float(step(x, y)) for x, y in batches[1:]]
    assert [size for size in lent if size] == []
    monkeypatch.undo()
    reference = _model()
    eager = EagerECO(reference, "adamw", "int8", "per_row", "nearest", "eco")
    expected = [float(eager.step(k, x, y)) for k, (x, y) in enumerate(batches)]
    with step.materialized():
        assert_close(named_parameters(model), named_parameters(reference))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)

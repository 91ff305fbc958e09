"""Moments in 8 and 4 bits against torchao's own 8- and 4-bit optimizers and eager math written here."""

import math

import pytest
import torch

import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import assert_close, named_parameters, stored_in_8_bits
from eager_compose import EagerComposed
from lordo_compile.models import TinyGPT
from lordo_compile.testing import training_step

torchao_optim = pytest.importorskip("torchao.optim")
from torchao.optim import adam as torchao_adam  # noqa: E402
from torchao.optim.quant_utils import (  # noqa: E402
    create_dynamic_map,
    dequant_with_qmap,
    quantize_4bit_with_qmap,
    quantize_8bit_with_qmap,
    scale_tensor,
)

STEPS = 20


def torchao_step(optimizer):
    """torchao compiles its update per parameter with torch.compile; its math run eagerly is
    the same function, and the suite does not pay a compile per shape."""
    compile_ = torchao_adam.torch.compile
    torchao_adam.torch.compile = lambda fn, **kwargs: fn
    try:
        optimizer.step()
    finally:
        torchao_adam.torch.compile = compile_


def gradients(model, steps=STEPS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=generator) * (0.1 + i % 3) for p in model.parameters()]
            for i in range(steps)]


def open_loop_step(model, optimizer):
    """A step whose gradients are the ones given: both sides update from the same gradients,
    so a difference is the optimizers' own, not one fed back through the model."""

    def step(*grads):
        loss = sum((p * g).sum() for p, g in zip(model.parameters(), grads))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


@pytest.mark.parametrize("signed, bits, args", [(True, 8, ()), (False, 8, ()), (True, 4, (3, 4))])
def test_the_maps_are_torchaos(signed, bits, args):
    from lordo_compile.ops.moments import quantization_map

    assert torch.equal(torch.tensor(quantization_map(signed, bits)), torch.tensor(create_dynamic_map(signed, *args)))


def test_the_4_bit_unsigned_map_is_linear_without_zero():
    from lordo_compile.ops.moments import quantization_map

    assert quantization_map(False, 4) == tuple(torch.linspace(0, 1, 17)[1:].tolist())


@pytest.mark.parametrize("bits, block", [(8, 256), (4, 128)])
@pytest.mark.parametrize("signed", [True, False])
def test_codes_and_values_are_torchaos(signed, bits, block):
    from lordo_compile.ops.moments import dequantize_math, quantization_map, quantize_math

    x = torch.randn(64, 128) * torch.logspace(-6, 0, 128)
    x = x if signed else x * x
    levels = torch.tensor(quantization_map(signed, bits))
    scaled, scale = scale_tensor(x.reshape(-1), block)
    expected = (quantize_8bit_with_qmap if bits == 8 else quantize_4bit_with_qmap)(scaled, levels)
    codes, scales = quantize_math(x, levels, bits=bits, block_size=block)
    packed = expected if bits == 8 else (expected[0::2] << 4) | expected[1::2]
    assert torch.equal(codes, packed) and torch.equal(scales, scale)
    values = dequant_with_qmap(expected, levels, scale)
    assert torch.equal(dequantize_math(codes, scales, levels, bits=bits), values)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


# The check is AdamW8bit on the tiny GPT; the other two run on a model with the same
# mix of held (16384 and 8192 entries) and fp32 (biases) tensors at a tenth of the cost.
@pytest.mark.parametrize("name, bits, model", [("AdamW8bit", 8, TinyGPT), ("Adam8bit", 8, mlp), ("AdamW4bit", 4, mlp)])
def test_twenty_steps_equal_torchaos_optimizer(name, bits, model):
    """torchao's AdamW8bit (Adam8bit, AdamW4bit) and ours, from the same weights and gradients.

    Both hold every parameter of at least 4096 entries (a multiple of the block) in `bits`
    bits and the rest in fp32. Their fp32 arithmetic differs in order (torchao: p - lr*wd*p
    and lerp; ours, torch.optim's: p * (1 - lr*wd) and m + (1 - b1)(g - m)), by about an
    ulp. A moment within an ulp of the midpoint between two codes then rounds to the other
    code, and that entry's later updates differ by up to a code's width. Measured on the tiny
    GPT after 20 steps: 30 of 1,671,168 codes differ, and 40 of 840,960 weights are more
    than 1e-5 of their tensor's largest value apart (the worst, 2.8e-3); all others are
    within 1e-5. The test bounds both counts at 1e-4 of the total."""
    reference, ours = model(), model()
    ours.load_state_dict(reference.state_dict())
    theirs = getattr(torchao_optim, name)(reference.parameters(), lr=1e-3, weight_decay=0.1)
    kind = torch.optim.AdamW if name.startswith("AdamW") else torch.optim.Adam
    optimizer = kind(ours.parameters(), lr=1e-3, weight_decay=0.1)
    step = lc.compile(open_loop_step(ours, optimizer), lc.Policy.quantized_state(bits=bits), compiler="eager")
    for grads in gradients(ours):
        for p, g in zip(reference.parameters(), grads):
            p.grad = g.clone()
        torchao_step(theirs)
        step(*grads)
    ours_state = step.state_dict()["runtime"]["tensors"]
    codes = differ = 0
    for (n, mine), theirs_p in zip(ours.named_parameters(), reference.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            held = theirs.state[theirs_p][key]
            if hasattr(held, "codes"):
                codes += held.codes.numel()
                differ += (held.codes.reshape(-1) != ours_state[f"quantized_state.codes.{key}.{n}"]).sum().item()
    far = sum(((mine - t).abs() > 1e-5 * t.abs().max()).sum().item()
              for mine, t in zip(ours.parameters(), reference.parameters()))
    print(f"{name}: {differ} of {codes:,} codes differ; {far} weights further than 1e-5 of their tensor's largest")
    params = list(ours.parameters())
    assert codes == 2 * sum(p.numel() for p in params if p.numel() >= 4096) // (2 if bits == 4 else 1)
    assert differ <= 1e-4 * codes and far <= 1e-4 * sum(p.numel() for p in params)


def eager_quantized_sgd(params, grads, lr, momentum, block):
    """SGD with momentum whose buffer is read back from 8 bits each step (ALGORITHMS.md section 8),
    written here with torchao's quantizer."""
    weights = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(w) for w in weights]
    for step_grads in grads:
        for i, (w, g) in enumerate(zip(weights, step_grads)):
            buf = buffers[i] * momentum + g
            w -= lr * buf
            if w.numel() >= 4096 and w.numel() % block == 0:
                buf = stored_in_8_bits(buf, signed=True, block=block)
            buffers[i] = buf
    return weights


def test_sgd_momentum_buffer_in_8_bits_equals_eager_math():
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 8))
    expected = eager_quantized_sgd(list(model.parameters()), gradients(model), lr=0.01, momentum=0.9, block=256)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = lc.compile(open_loop_step(model, optimizer), lc.Policy.quantized_state(), compiler="eager")
    for grads in gradients(model):
        step(*grads)
    assert_close(list(model.parameters()), expected, rtol=1e-6, atol=1e-6)


def test_state_bytes_per_parameter_are_the_codes_and_scales():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = lc.compile(open_loop_step(model, optimizer), lc.Policy.quantized_state(), compiler="eager")
    step(*gradients(model, steps=1)[0])
    report = step.memory_report()
    for name, p in model.named_parameters():
        row = report.row(name)
        n = p.numel()
        # AdamW's step counter (4 bytes) is held as before.
        held = 2 * (n + 4 * n // 256) if n >= 4096 else 8 * n
        assert (row.state_bytes_before, row.state_bytes_after) == (8 * n + 4, held + 4), name
    total = sum(p.numel() for p in model.parameters())
    assert report.state_bytes_after / total < 2.4  # AdamW: 8 bytes of moments per parameter


def test_galores_projected_moments_are_held_in_8_bits_when_large_enough():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256, bias=False), torch.nn.Linear(256, 64, bias=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    policy = lc.Policy(low_rank=lc.LowRank(rank=32, update_proj_gap=5, params=lambda name, info: True),
                       quantized_state=lc.QuantizedState())
    step = lc.compile(open_loop_step(model, optimizer), policy, compiler="eager")
    step(*gradients(model, steps=1)[0])
    lines = "\n".join(step.explain().splitlines())
    # Rank 32 of a 256x128 and a 64x256 matrix: moments of 256x32 and 32x256 entries, both held.
    held = sorted(name for name in step.state_dict()["runtime"]["tensors"] if name.startswith("quantized_state.codes"))
    assert held == ["quantized_state.codes.low_rank.exp_avg.0.weight", "quantized_state.codes.low_rank.exp_avg.1.weight",
                    "quantized_state.codes.low_rank.exp_avg_sq.0.weight",
                    "quantized_state.codes.low_rank.exp_avg_sq.1.weight"], (held, lines)


def test_bad_options_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"QuantizedState.bits must be one of \(8, 4\), got 3"):
        lc.QuantizedState(bits=3)
    with pytest.raises(ValueError, match="QuantizedState.block_size"):
        lc.QuantizedState(bits=4, block_size=127)
    with pytest.raises(ValueError, match="QuantizedState.min_size"):
        lc.QuantizedState(min_size=-1)
    with pytest.raises(ValueError, match="Policy.quantized_state must be a lordo_compile.QuantizedState"):
        lc.Policy(quantized_state=8)


def test_a_checkpoint_resumes_bit_for_bit_and_loads_with_weights_only(tmp_path):
    def run(stop=None, resume=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 8))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        step = lc.compile(open_loop_step(model, optimizer), lc.Policy.quantized_state(), compiler="eager")
        all_grads = gradients(model, steps=8)
        start = 0
        if resume is not None:
            saved = torch.load(resume, weights_only=True)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            step.load_state_dict(saved["step"])
            start = stop
        for i, grads in enumerate(all_grads[start:], start):
            if resume is None and i == stop:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step.state_dict()}, tmp_path / "checkpoint.pt")
            step(*grads)
        return [p.detach().clone() for p in model.parameters()]

    straight = run(stop=4)
    resumed = run(stop=4, resume=tmp_path / "checkpoint.pt")
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    codes = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]["runtime"]["tensors"]
    assert codes["quantized_state.codes.exp_avg.0.weight"].dtype == torch.uint8
    assert math.prod(codes["quantized_state.scales.exp_avg.0.weight"].shape) == 128 * 64 // 256


@pytest.mark.inductor
def test_inductor_fuses_the_quantized_updates_and_matches_the_graph_run_eagerly():
    import re

    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    from lordo_compile.models import MLP
    from lordo_compile.testing import fresh_inductor_cache, training_step

    def run(compiler):
        torch.manual_seed(0)
        model = MLP((64, 64, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), optimizer),
                          lc.Policy.quantized_state(min_size=0, block_size=64), compiler=compiler)
        batches = [(torch.randn(8, 64), torch.randn(8, 4)) for _ in range(5)]
        with fresh_inductor_cache():
            _, sources = run_and_get_code(step, *batches[0])
        for batch in batches[1:]:
            step(*batch)
        return list(model.parameters()), "\n".join(sources)

    params, code = run("inductor")
    assert "lordo" not in code
    assert set(re.findall(r"extern_kernels\.(\w+)\(", code)) <= {"mm", "addmm"}
    assert not re.findall(r"torch\.ops\.aten\.(\w+)\(", code)  # no library call: the lookups are fused
    # The four updates (the only sqrt) with their reads and stores of codes and scales: two
    # C++ functions (`lowering.CPU_KERNEL_GROUP_ARGS` ends one near 64 arguments), not one
    # per parameter.
    assert len(re.findall(r"^(cpp_fused_\w*sqrt\w*) = ", code, flags=re.M)) == 2
    expected, _ = run("eager")
    assert_close(params, expected, rtol=1e-5, atol=1e-6)


# Blocks of 32 from 256 entries: a small model's weights and GaLore's projected moments are held.
SMALL_HELD = lc.QuantizedState(bits=8, block_size=32, min_size=256)
COMPOSED = {
    "GaLore, AdamW": dict(optimizer="adamw", low_rank=dict(rank=8, gap=3, scale=0.25, method="svd", on_refresh="keep")),
    "ECO int8, AdamW": dict(optimizer="adamw", eco=dict(format="int8", scale="per_row", group_size=32,
                                                        rounding="nearest", seed=0)),
    "ECO int8, SGD momentum": dict(optimizer="sgd", eco=dict(format="int8", scale="per_row", group_size=32,
                                                             rounding="nearest", seed=0)),
    "GaLore and ECO fp8, AdamW": dict(optimizer="adamw",
                                      low_rank=dict(rank=8, gap=3, scale=0.25, method="svd", on_refresh="reproject"),
                                      eco=dict(format="fp8_e4m3", scale="per_row", group_size=32,
                                               rounding="nearest", seed=0)),
}


@pytest.mark.parametrize("name", list(COMPOSED))
def test_composed_moments_held_in_8_bits_equal_eager_math(name):
    """GaLore's projected moments and the moments ECO feeds its rounding error into, held in 8
    bits, against tests/eager_compose.py storing them with torchao's quantizer after each step."""
    case = COMPOSED[name]
    lr, weight_decay = 1e-2, 0.05
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 32, generator=generator), torch.randn(16, 16, generator=generator)) for _ in range(6)]

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))

    ours = model()
    if case["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(ours.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(ours.parameters(), lr=lr, weight_decay=weight_decay, momentum=0.9)
    options = {}
    if "low_rank" in case:
        o = case["low_rank"]
        options["low_rank"] = lc.LowRank(rank=o["rank"], update_proj_gap=o["gap"], scale=o["scale"], method=o["method"],
                                         on_refresh=o["on_refresh"], params=r"^\d+\.weight$")
    if "eco" in case:
        options["eco"] = lc.ECO(**case["eco"], params=r"^\d+\.weight$")
    step = lc.compile(training_step(lambda x, y: F.mse_loss(ours(x), y), optimizer),
                      lc.Policy(**options, quantized_state=SMALL_HELD), compiler="aot_eager")
    for x, y in batches:
        step(x, y)
    held = [key for key in step.state_dict()["runtime"]["tensors"] if key.startswith("quantized_state.codes.")]
    reference_model = model()
    reference = EagerComposed(reference_model, optimizer=case["optimizer"], lr=lr, weight_decay=weight_decay,
                              low_rank=case.get("low_rank"), eco=case.get("eco"), held=SMALL_HELD)
    for k, (x, y) in enumerate(batches):
        reference.step(k, x, y)
    assert min(reference.spectral_gaps, default=1.0) > 1e-3, "GaLore's subspace is not determined on this seed"
    assert len(held) == (4 if case["optimizer"] == "adamw" else 2), held
    with step.materialized():
        assert_close(named_parameters(ours), named_parameters(reference_model))

"""Shared test problems: a model, an optimizer, data, and an eager reference run."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP, GPTConfig, TinyGPT
from lordo_compile.testing import training_step

SMALL_GPT = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)
# For tests whose cost is the capture or code generation and whose check does not depend on
# depth (state kept across a resume, run-to-run determinism): half the graph to build.
ONE_LAYER_GPT = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=32)
# Where the `gpu`-marked tests put their models and data (conftest.py checks it is usable).
# Data is drawn on the CPU and moved, so every device trains on the same numbers.
DEVICE = torch.device(os.environ.get("LORDO_TEST_DEVICE", "cpu"))


Tensors = Union[torch.Tensor, Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Comparison:
    """The element of all compared tensors that is furthest outside its tolerance."""

    ratio: float  # |actual - expected| / allowed there; the tensors are close when it is <= 1
    name: str
    index: tuple[int, ...]
    actual: float
    expected: float
    allowed: float
    scale: float
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.ratio <= 1

    def __str__(self) -> str:
        where = f"{self.name}{list(self.index)}"
        return (f"worst element {where}: {self.actual:.8g} vs {self.expected:.8g} expected, "
                f"|difference| {abs(self.actual - self.expected):.3g} is {self.ratio:.3g}x the {self.allowed:.3g} "
                f"allowed ({self.rtol:g}*|expected| + {self.atol:g}*rms {self.scale:.3g} of {self.name})")


# Adam divides each gradient by its own running RMS: an element whose gradient is small next to
# its history (attention's query and key weights at initialisation, a lookahead point) takes
# lr-sized steps whose size carries its gradient's relative rounding error, and two evaluation
# orders part by up to 9.4e-6 of the tensor's RMS in 20 steps (measured: test_parity's GPT qkv,
# EMA-Nesterov's lookahead, RoSTE's rotated weights). Tests of Adam-based runs allow that.
ADAM_ATOL = 2e-5


def _named(tensors: Tensors, side: str) -> dict[str, torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return {"tensor": tensors}
    if isinstance(tensors, Mapping):
        return dict(tensors)
    if isinstance(tensors, Sequence):
        return {f"#{i}": t for i, t in enumerate(tensors)}
    raise TypeError(f"{side}: expected a tensor, a dict of tensors or a list of tensors, got {type(tensors)}")


def compare(actual: Tensors, expected: Tensors, *, rtol: float = 1e-5, atol: float = 1e-6) -> Comparison:
    """Element by element, |actual - expected| <= rtol*|expected| + atol*scale, where scale is
    the root mean square of the expected tensor the element belongs to.

    rtol bounds the error of each value relative to itself, so a small bias or buffer is
    held to its own size and not to the largest value around. atol*scale is the floor
    for elements near zero, whose errors come from sums of terms the size of their
    tensor's typical element: float32 rounds those at about 6e-8 of that size, so the
    default 1e-6 leaves room for the ~10 roundings a compiled graph may reorder, while a
    wrong value in a small element still shows. A tensor that is exactly zero must stay
    exactly zero.

    Names must match exactly (dict keys; a list's length), and so must shapes and dtypes:
    nothing is dropped or broadcast. Raises AssertionError on a structural mismatch;
    returns the worst element (`.ok`, `str()` names the tensor and the element).
    """
    actual, expected = _named(actual, "actual"), _named(expected, "expected")
    if actual.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
        raise AssertionError(f"{len(actual)} tensors compared with {len(expected)}: missing {missing}, extra {extra}")
    if not expected:
        raise AssertionError("nothing to compare")
    worst = None
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise AssertionError(f"{name}: {got.dtype}{list(got.shape)} compared with {want.dtype}{list(want.shape)}")
        a, b = got.detach().cpu().double(), want.detach().cpu().double()
        scale = float(b.pow(2).mean().sqrt())
        allowed = rtol * b.abs() + atol * scale
        difference = torch.where(a == b, 0.0, (a - b).abs().nan_to_num(nan=math.inf))
        # x/0 = inf: a difference where none is allowed; a NaN anywhere is as far off as can be.
        ratio = torch.where(difference == 0, 0.0, difference / allowed).nan_to_num(nan=math.inf)
        flat = int(ratio.argmax())
        if worst is None or ratio.view(-1)[flat] > worst.ratio:
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape))
            worst = Comparison(float(ratio.view(-1)[flat]), name, index, float(a.view(-1)[flat]),
                               float(b.view(-1)[flat]), float(allowed.view(-1)[flat]), scale, rtol, atol)
    return worst


def assert_close(actual: Tensors, expected: Tensors, *, rtol: float = 1e-5, atol: float = 1e-6, msg: str = "") -> None:
    """`compare` (see there), failing with the worst tensor and element."""
    comparison = compare(actual, expected, rtol=rtol, atol=atol)
    assert comparison.ok, f"{msg}: {comparison}" if msg else str(comparison)


def average_gradients(model: torch.nn.Module, group=None) -> None:
    """Each parameter's gradient replaced by its mean over `group` (None: every worker), with
    torch.distributed's own all-reduce: what DDP computes, written out."""
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
        p.grad /= dist.get_world_size(group)


def named_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def checkpoint_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, step) -> bytes:
    """Model, optimizer and compiled step saved with torch.save, as a user would."""
    buffer = io.BytesIO()
    with step.materialized():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step.state_dict()}, buffer)
    return buffer.getvalue()


def load_checkpoint_bytes(saved: bytes, model: torch.nn.Module, opt: torch.optim.Optimizer, step) -> None:
    """What `checkpoint_bytes` saved, loaded with weights_only=True into a rebuilt run."""
    checkpoint = torch.load(io.BytesIO(saved), weights_only=True)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    step.load_state_dict(checkpoint["step"])


def mlp_problem(seed: int = 0, device: torch.device = DEVICE):
    torch.manual_seed(seed)
    model = MLP((16, 32, 32, 4)).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(8, 16, generator=generator).to(device), torch.randn(8, 4, generator=generator).to(device))
               for _ in range(20)]

    def loss_fn(x, y):
        return F.mse_loss(model(x), y)

    return model, loss_fn, batches


def gpt_problem(seed: int = 0, cfg: GPTConfig = SMALL_GPT, device: torch.device = DEVICE):
    torch.manual_seed(seed)
    model = TinyGPT(cfg).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(20):
        idx = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=generator).to(device)
        batches.append((idx[:, :-1], idx[:, 1:]))
    return model, model.loss, batches


def train(
    problem: Callable,
    make_optimizer: Callable,
    *,
    policy: lc.Policy | None = None,
    compiler: str | None = None,
    steps: int = 20,
    make_scheduler: Callable | None = None,
):
    """Train with eager torch.optim (compiler=None) or a compiled step; returns the parameters by
    name, the optimizer, the step and the losses."""
    model, loss_fn, batches = problem()
    opt = make_optimizer(model)
    scheduler = make_scheduler(opt) if make_scheduler else None

    train_step = training_step(loss_fn, opt)

    step = train_step if compiler is None else lc.compile(train_step, policy or lc.Policy(), compiler=compiler)
    losses = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        losses.append(float(step(x, y).detach()))
        if scheduler is not None:
            scheduler.step()
    return named_parameters(model), opt, step, losses


def _orthonormal(y):
    return torch.linalg.qr(y).Q


def singular_vectors(matrix, rank, right):
    """The r leading right (or left) singular vectors of `matrix` as columns, with the signs
    torch.linalg.svd(matrix) gives: galore-torch's projector takes Vh[:r] of a tall
    gradient and U[:, :r] of a wide one."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh[:rank].T if right else u[:, :rank]


def _leading(grad, basis, rank, tall):
    return basis @ singular_vectors(grad @ basis if tall else basis.T @ grad, rank, right=tall)


def new_projection(grad, previous, sketch, method, rank, power_iterations=1):
    """ALGORITHMS.md section 1's projections, written out: r leading singular vectors of the
    smaller side of `grad` by exact SVD, a sketched range finder, or subspace iteration (the
    last two end with the exact SVD of `grad` restricted to the basis they found)."""
    tall = grad.shape[0] >= grad.shape[1]
    a = grad.T if tall else grad
    if method == "svd":
        return singular_vectors(grad, rank, right=tall)
    if method == "randomized":
        q = _orthonormal(a @ sketch)
        for _ in range(power_iterations):
            q = _orthonormal(a @ _orthonormal(a.T @ q))
        return _leading(grad, q, rank, tall)
    basis = previous
    for _ in range(max(1, power_iterations)):
        basis = _orthonormal(a @ (a.T @ basis))
    return _leading(grad, basis, rank, tall)


def stored_in_8_bits(x: torch.Tensor, signed: bool, block: int) -> torch.Tensor:
    """`x` as torchao's 8-bit optimizers store a moment and read it back: per-block absmax
    scales, codes of the dynamic map (signed or unsigned). torchao's own functions, so that a
    test of our quantized state does not check our quantizer against itself."""
    from torchao.optim.quant_utils import create_dynamic_map, dequant_with_qmap, quantize_8bit_with_qmap, scale_tensor

    levels = torch.tensor(create_dynamic_map(signed))
    scaled, scale = scale_tensor(x.reshape(-1), block)
    return dequant_with_qmap(quantize_8bit_with_qmap(scaled, levels), levels, scale).reshape(x.shape)


class EagerOuterStep:
    """DiLoCo's outer step written out with torch.optim.SGD (lr 0.7, momentum 0.9, Nesterov) on
    anchors: `step(averages)` moves each named anchor along its averaged pseudo-gradient and sets
    the parameter to it (or, with `local_weight` a, to a W + (1 - a) anchor)."""

    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters())
        self.anchor = {name: p.detach().clone().requires_grad_(True) for name, p in self.params.items()}
        self.optimizer = torch.optim.SGD(self.anchor.values(), lr=0.7, momentum=0.9, nesterov=True)

    @torch.no_grad()
    def pseudo_gradient(self, name: str) -> torch.Tensor:
        """anchor - W: positive along descent."""
        return self.anchor[name] - self.params[name]

    @torch.no_grad()
    def step(self, averages: dict[str, torch.Tensor], local_weight: float = 0.0) -> None:
        for name, average in averages.items():
            self.anchor[name].grad = average
        self.optimizer.step()  # only the anchors given an average have a gradient
        self.optimizer.zero_grad()
        for name in averages:
            self.params[name].copy_((1 - local_weight) * self.anchor[name] + local_weight * self.params[name])


def int8_sent(y: torch.Tensor) -> torch.Tensor:
    """What an int8 payload says of y: symmetric codes with one absmax scale per row (the
    first dimension; a vector is one row)."""
    rows = y.reshape(y.shape[0] if y.dim() >= 2 else 1, -1)
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    codes = torch.clamp(torch.round(rows / torch.where(scale > 0, scale, 1.0)), -127, 127)
    return (codes * scale).reshape(y.shape)

"""Shared test problems: a model, an optimizer, data, and an eager reference run."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP, GPTConfig, TinyGPT
from lordo_compile.testing import training_step

SMALL_GPT = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|a|."""
    return max(((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def mlp_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP((16, 32, 32, 4))
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)) for _ in range(20)]

    def loss_fn(x, y):
        return F.mse_loss(model(x), y)

    return model, loss_fn, batches


def gpt_problem(seed: int = 0, cfg: GPTConfig = SMALL_GPT):
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(20):
        idx = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=generator)
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
    """Train with eager torch.optim (compiler=None) or a compiled step; returns what is left."""
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
    params = [p.detach().clone() for p in model.parameters()]
    return params, opt, step, losses


def _orthonormal(y):
    return torch.linalg.qr(y).Q


def _leading(a, basis, rank):
    u, _, _ = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ u)[:, :rank]


def new_projection(grad, previous, sketch, method, rank, power_iterations=1):
    """ALGORITHMS.md section 1's projections, written out: r leading singular vectors of the
    smaller side of `grad` by exact SVD, a sketched range finder, or subspace iteration."""
    tall = grad.shape[0] >= grad.shape[1]
    a = grad.T if tall else grad
    if method == "svd":
        return torch.linalg.svd(a, full_matrices=False)[0][:, :rank]
    if method == "randomized":
        q = _orthonormal(a @ sketch)
        for _ in range(power_iterations):
            q = _orthonormal(a @ _orthonormal(a.T @ q))
        return _leading(a, q, rank)
    basis = previous
    for _ in range(max(1, power_iterations)):
        basis = _orthonormal(a @ (a.T @ basis))
    return _leading(a, basis, rank)

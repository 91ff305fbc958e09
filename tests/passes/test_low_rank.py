"""Low-rank optimizer state (GaLore) against an eager implementation of ALGORITHMS.md section 1."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import max_rel_diff
from lordo_compile.testing import training_step

RANK, GAP, STEPS = 8, 12, 30
LR, WD, BETAS, EPS, SCALE = 1e-2, 0.1, (0.9, 0.999), 1e-8, 0.25


def _model():
    torch.manual_seed(0)
    # 0.weight is 32x64 (wide), 2.weight is 48x32 (tall), 4.weight is 4x48 (smaller side < rank).
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=generator), torch.randn(16, 4, generator=generator)) for _ in range(STEPS)]


def _orthonormal(y):
    return torch.linalg.qr(y).Q


def _leading(a, basis, rank):
    u, _, _ = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ u)[:, :rank]


def _new_projection(grad, previous, sketch, method, first):
    tall = grad.shape[0] >= grad.shape[1]
    a = grad.T if tall else grad
    if method == "svd" or (method == "subspace" and first):
        return torch.linalg.svd(a, full_matrices=False)[0][:, :RANK]
    if method == "randomized":
        q = _orthonormal(a @ sketch)
        q = _orthonormal(a @ _orthonormal(a.T @ q))
        return _leading(a, q, RANK)
    return _leading(a, _orthonormal(a @ (a.T @ previous)), RANK)


class EagerGaLore:
    """Section 1 written out: projected Adam moments for the two eligible weights."""

    def __init__(self, model, method, on_refresh, sketches):
        self.low_rank = [model[0].weight, model[2].weight]
        dense = [p for p in model.parameters() if all(p is not w for w in self.low_rank)]
        self.dense = torch.optim.AdamW(dense, lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
        self.method, self.on_refresh, self.sketches = method, on_refresh, sketches
        self.state = {}
        for w in self.low_rank:
            m, n = w.shape
            side = n if m >= n else m
            shape = (m, RANK) if m >= n else (RANK, n)
            self.state[w] = dict(P=torch.eye(side, RANK), m=torch.zeros(shape), v=torch.zeros(shape), t=0)

    @torch.no_grad()
    def step(self, k):
        self.dense.step()
        for w, sketch in zip(self.low_rank, self.sketches):
            s, g = self.state[w], w.grad
            tall = w.shape[0] >= w.shape[1]
            if k % GAP == 0:
                new = _new_projection(g, s["P"], sketch, self.method, first=k == 0)
                change = new.T @ s["P"]
                if self.on_refresh == "reproject" and k > 0:
                    s["m"] = s["m"] @ change.T if tall else change @ s["m"]
                    s["v"] = s["v"] @ (change * change).T if tall else (change * change) @ s["v"]
                elif self.on_refresh == "reset" and k > 0:
                    s["m"], s["v"], s["t"] = torch.zeros_like(s["m"]), torch.zeros_like(s["v"]), 0
                s["P"] = new
            r = g @ s["P"] if tall else s["P"].T @ g
            s["t"] += 1
            s["m"] = BETAS[0] * s["m"] + (1 - BETAS[0]) * r
            s["v"] = BETAS[1] * s["v"] + (1 - BETAS[1]) * r * r
            m_hat = s["m"] / (1 - BETAS[0] ** s["t"])
            v_hat = s["v"] / (1 - BETAS[1] ** s["t"])
            n = m_hat / (v_hat.sqrt() + EPS)
            w -= LR * SCALE * (n @ s["P"].T if tall else s["P"] @ n)
            w *= 1 - LR * WD

    def zero_grad(self):
        self.dense.zero_grad()
        for w in self.low_rank:
            w.grad = None


def _compiled_run(method, on_refresh, compiler="aot_eager"):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    policy = lc.Policy.galore(rank=RANK, update_proj_gap=GAP, scale=SCALE, method=method, on_refresh=on_refresh,
                              power_iterations=1)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler=compiler)
    for x, y in _batches():
        step(x, y)
    return model, opt, step


def _eager_run(method, on_refresh, sketches):
    model = _model()
    opt = EagerGaLore(model, method, on_refresh, sketches)
    for k, (x, y) in enumerate(_batches()):
        F.mse_loss(model(x), y).backward()
        opt.step(k)
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("on_refresh", ["keep", "reproject", "reset"])
@pytest.mark.parametrize("method", ["svd", "randomized", "subspace"])
def test_matches_eager_galore(method, on_refresh):
    model, opt, step = _compiled_run(method, on_refresh)
    state = step.state_dict()["runtime"]["tensors"]
    sketches = [state.get(f"low_rank.sketch.{name}") for name in ("0.weight", "2.weight")]
    reference, ref_opt = _eager_run(method, on_refresh, sketches)
    assert max_rel_diff(list(reference.parameters()), list(model.parameters())) <= 1e-5
    for w, name in zip(ref_opt.low_rank, ("0.weight", "2.weight")):
        torch.testing.assert_close(state[f"low_rank.projection.{name}"].abs(), ref_opt.state[w]["P"].abs(),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state[f"low_rank.exp_avg.{name}"], ref_opt.state[w]["m"], rtol=1e-4, atol=1e-6)

"""One process's training step with any subset of GaLore, CAGE, EMA-Nesterov and ECO around
AdamW or SGD with momentum, written out eagerly in plain torch (ALGORITHMS.md sections 1,
4, 5, 6 and 7), for tests that compare a compiled composition with it (test_fuzz.py).

Stage order of one step k (0-based), theta the stored parameters:

    0. (before step 0) ECO's weights go on their grid: W0 <- q(W0), nearest rounding.
    1. lookahead   L = theta + beta_k d                       (EMA-Nesterov; else L = theta)
    2. forward     CAGE's weights are read as Q(L_W), straight-through gradient; the loss;
                   g = dloss/dL (= dloss/dtheta).
    3. coupled     g_W += lambda_k (L_W - Q(L_W))             (CAGE, form "coupled")
    4. update      from L: GaLore's matrices (2-D, smaller side > rank) by GaLore's update,
                   P refreshed from this g when the refresh falls on k; the others by the
                   base rule. W~ is its result.
    5. decoupled   W~_W -= lr lambda_k (L_W - Q(L_W))         (CAGE, form "decoupled")
    6. EMA         d <- gamma d + (1 - gamma)(W~ - theta)
    7. ECO         W^ = q(W~), e = W~ - W^, e fed into the momentum of the rule of step 4;
                   theta_W = W^. Every other parameter: theta = W~.

With `held` (a QuantizedState), every moment it holds (m, v, buf; GaLore's projected ones
too) is stored as torchao stores an 8-bit moment once the step is done (after ECO's
injection): the next step reads it back rounded, this step used it unrounded.

A parameter frozen at step k (`step(..., frozen=...)`: requires_grad False during that call)
takes no part in stages 1 and 3-7: it is read at theta (no lookahead), has no gradient, is
not updated, corrected or requantized, and its state (moments, Adam's step count, GaLore's
P, EMA's d) stays as it was, as torch.optim leaves a parameter whose grad is None. CAGE's
forward still reads it as Q(theta): the forward quantizes every selected weight, trained
or not. What runs by step (lambda_k, beta_k, GaLore's refresh when k % gap == 0, ECO's
noise) counts every step, frozen or not: a refresh that falls while a matrix is frozen
is skipped for it, and it goes on with its earlier P once unfrozen.

ECO's injections (section 5; under GaLore, section 7, into the projected momentum, proj the
gradient's projection: e P for a tall matrix, P^T e for a wide one):

    AdamW             m   += ((1 - b1^t) / lr) (1 - 1/b1) D e,            D = sqrt(v / (1 - b2^t)) + eps
    GaLore AdamW      m_r += ((1 - b1^t) / (lr a)) (1 - 1/b1) D_r proj(e)   D_r from the projected v
    SGD (heavy ball)  buf += (1 / lr) (1 - 1/mu) e
    GaLore SGD        buf_r += (1 / (lr a)) (1 - 1/mu) proj(e)

with t the update's step count after this step's increment and a GaLore's scale. Each
sums, over the later steps, to a move of +e (of P proj(e) under GaLore; the rest of e is
lost). ECO's stochastic rounding draws uniform_noise(W~, k, seed * 1_000_003 + salt), salt
the parameter's index among the model's parameters.

The arithmetic follows torch.optim's single-tensor path term for term (m + (1 - b1)(g - m),
v b2 + (1 - b2) g g, ...), so that a compiled step doing the same rounds the same way: a
last-bit difference would move a weight next to a rounding boundary to another grid level.
The quantizers are lordo_compile's own (`ops.eco.quantize`, `ops.eco.uniform_noise`,
`ops.quant.fake_quantize_math`), which test_eco.py and test_fake_quant.py check against
independent references; everything else is written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common import new_projection, stored_in_8_bits
from lordo_compile.ops.eco import quantize, uniform_noise
from lordo_compile.ops.quant import fake_quantize_math


def cage_lambda(k: int, lam: float, total_steps: int, silence_ratio: float, ramp: str) -> float:
    """lambda_k: 0 for the first floor(s T) steps, then `lam` (constant) or a linear ramp
    that reaches it at the last step."""
    start = int(silence_ratio * total_steps)
    if k < start:
        return 0.0
    return lam if ramp == "constant" else lam * min(1.0, (k - start + 1) / (total_steps - start))


def ema_beta(k: int, beta: float, warmup_steps: int, decay_start: int | None) -> float:
    """beta_k: beta for warmup_steps <= k (< decay_start), else 0."""
    return beta if k >= warmup_steps and (decay_start is None or k < decay_start) else 0.0


class EagerComposed:
    """The composed step on an nn.Sequential of nn.Linear and activations.

    Args:
      model: its parameters are theta, updated in place by `step`.
      optimizer: "adamw", or "sgd" (with `momentum` > 0, dampening 0, `nesterov` allowed
        without ECO).
      low_rank: GaLore's options as a dict (rank, gap, scale, method, on_refresh,
        power_iterations) with `sketches`: {name: sketch} for the randomized method.
      cage: CAGE's (bits, form, lam, total_steps, silence_ratio, ramp), rms_gaussian per row;
        with `weights`, only those weights are quantized.
      ema: EMA-Nesterov's (beta, gamma, warmup_steps, decay_start).
      eco: ECO's (format, scale, group_size, rounding, seed).
    Each rewrite is off when None. After a step, `spectral_gaps` holds, for each GaLore
    refresh so far, min over i <= r of (sigma_i - sigma_i+1) / sigma_1 of the gradient the
    refresh read: near 0, the r leading singular vectors are not determined.
    """

    def __init__(self, model: nn.Sequential, *, optimizer="adamw", lr, weight_decay, betas=(0.9, 0.999), eps=1e-8,
                 momentum=0.9, nesterov=False, low_rank=None, sketches=None, cage=None, ema=None, eco=None,
                 held=None):
        self.model = model
        self.held = held
        self.params = dict(model.named_parameters())
        self.optimizer, self.lr, self.wd, self.betas, self.eps = optimizer, lr, weight_decay, betas, eps
        self.momentum, self.nesterov = momentum, nesterov
        self.low_rank, self.cage, self.ema, self.eco = low_rank, cage, ema, eco
        weights = [f"{i}.weight" for i, layer in enumerate(model) if isinstance(layer, nn.Linear)]
        # GaLore: 2-D with smaller side > rank. CAGE: every nn.Linear weight (no output head by
        # name in a Sequential). ECO: every nn.Linear weight; at int4, whose input size is a
        # multiple of the group size.
        self.galore = [n for n in weights if low_rank and min(self.params[n].shape) > low_rank["rank"]]
        self.quantized = [n for n in weights if n in cage.get("weights", weights)] if cage else []
        self.stored = [n for n in weights if eco and (eco["format"] != "int4"
                                                        or self.params[n].shape[1] % eco["group_size"] == 0)]
        self.salt = {name: i for i, name in enumerate(self.params)}
        self.sketches = sketches or {}
        self.spectral_gaps = []
        self.state = {}
        for name, p in self.params.items():
            if name in self.galore:
                m, n = p.shape
                tall = m >= n
                shape = (m, low_rank["rank"]) if tall else (low_rank["rank"], n)
                s = dict(tall=tall, P=torch.eye(n if tall else m, low_rank["rank"], device=p.device))
            else:
                shape, s = p.shape, {}
            if optimizer == "adamw":
                s.update(m=torch.zeros(shape, device=p.device), v=torch.zeros(shape, device=p.device), t=0)
            else:
                s.update(buf=torch.zeros(shape, device=p.device))
            self.state[name] = s
        self.d = {name: torch.zeros_like(p) for name, p in self.params.items()}
        with torch.no_grad():
            for name in self.stored:
                self.params[name].copy_(self.eco_quantize(self.params[name], 0, "nearest", 0))

    # The quantizers.

    def eco_quantize(self, x, k, rounding, salt):
        eco = self.eco
        step = torch.tensor(k, device=x.device)
        noise = uniform_noise(x, step, eco["seed"] * 1_000_003 + salt) if rounding == "stochastic" else None
        return quantize(x.detach(), format=eco["format"], scale=eco["scale"], group_size=eco["group_size"],
                        rounding=rounding, noise=noise)

    def cage_quantize(self, w):
        """Q(w) in the forward, the identity in the backward."""
        return fake_quantize_math(w, bits=self.cage["bits"], quantizer="rms_gaussian", group_size=0, hadamard=False,
                                  ste="identity")

    # One step.

    def forward(self, x, point):
        for i, layer in enumerate(self.model):
            if not isinstance(layer, nn.Linear):
                x = layer(x)
                continue
            w = point[f"{i}.weight"]
            x = F.linear(x, self.cage_quantize(w) if f"{i}.weight" in self.quantized else w, point[f"{i}.bias"])
        return x

    def step(self, k, x, y, frozen=frozenset()):
        theta = {name: p.detach().clone() for name, p in self.params.items()}
        point = dict(theta)
        if self.ema:
            beta = torch.tensor(ema_beta(k, self.ema["beta"], self.ema["warmup_steps"], self.ema["decay_start"]),
                                device=x.device)
            point = {name: theta[name] if name in frozen else torch.addcmul(theta[name], self.d[name], beta)
                     for name in theta}
        leaves = {name: t.clone().requires_grad_(name not in frozen) for name, t in point.items()}
        loss = F.mse_loss(self.forward(x, leaves), y)
        trained = [name for name in leaves if name not in frozen]
        grads = dict(zip(trained, torch.autograd.grad(loss, [leaves[name] for name in trained])))
        lam = cage_lambda(k, self.cage["lam"], self.cage["total_steps"], self.cage["silence_ratio"],
                          self.cage["ramp"]) if self.cage else 0.0
        with torch.no_grad():
            for name, p in self.params.items():
                if name in frozen:
                    continue
                start, g = point[name], grads[name]
                cage_error = None
                if name in self.quantized:
                    cage_error = start - self.cage_quantize(start)
                    if self.cage["form"] == "coupled":
                        g = g + lam * cage_error
                if name in self.galore:
                    tentative = self._galore(name, start, g, k)
                else:
                    tentative = self._dense(name, start, g)
                if cage_error is not None and self.cage["form"] == "decoupled":
                    tentative = tentative - self.lr * lam * cage_error
                if self.ema:
                    gamma = self.ema["gamma"]
                    self.d[name] = gamma * self.d[name] + (1 - gamma) * (tentative - theta[name])
                if name in self.stored:
                    stored = self.eco_quantize(tentative, k, self.eco["rounding"], self.salt[name])
                    self._inject(name, tentative - stored)
                    tentative = stored
                p.copy_(tentative)
                if self.held:
                    self._store(self.state[name])
        return loss.detach()

    def _store(self, s):
        for key, signed in (("m", True), ("v", False), ("buf", True)):
            if key in s and self.held.holds(s[key].numel()):
                s[key] = stored_in_8_bits(s[key], signed, self.held.block)

    # The update rules, from the point `w` with gradient `g`; they return W~.

    def _dense(self, name, w, g):
        s, lr, wd = self.state[name], self.lr, self.wd
        if self.optimizer == "sgd":
            g = g + wd * w
            s["buf"] = s["buf"] * self.momentum + g
            return w - lr * (g + self.momentum * s["buf"] if self.nesterov else s["buf"])
        (beta1, beta2), eps = self.betas, self.eps
        s["t"] += 1
        w = w * (1 - lr * wd)
        s["m"] = s["m"] + (1 - beta1) * (g - s["m"])
        s["v"] = s["v"] * beta2 + (1 - beta2) * g * g
        s["denom"] = s["v"].sqrt() / math.sqrt(1 - beta2 ** s["t"]) + eps
        return w - (lr / (1 - beta1 ** s["t"])) * s["m"] / s["denom"]

    def _galore(self, name, w, g, k):
        s, o, lr, wd = self.state[name], self.low_rank, self.lr, self.wd
        tall, rank = s["tall"], o["rank"]
        moments = ("m", "v") if self.optimizer == "adamw" else ("buf",)
        first = k == 0 and o["method"] == "subspace"
        if first or (k % o["gap"] == 0 and (o["method"] != "subspace" or k > 0)):
            # The refresh: P from this step's gradient (for "subspace", an exact SVD at step 0,
            # then warm-started iterations), the moments carried to it unless kept.
            sigma = torch.cat([torch.linalg.svdvals(g), torch.zeros(1, device=g.device)])[: rank + 1]
            self.spectral_gaps.append(float((sigma[:-1] - sigma[1:]).min() / sigma[0]))
            new = new_projection(g, s["P"], self.sketches.get(name), "svd" if first else o["method"], rank,
                                 o.get("power_iterations", 1))
            if o["on_refresh"] == "reproject" and not first:
                change = new.T @ s["P"]
                for key in moments:
                    c = change * change if key == "v" else change
                    s[key] = s[key] @ c.T if tall else c @ s[key]
            elif o["on_refresh"] == "reset" and not first:
                for key in moments:
                    s[key] = torch.zeros_like(s[key])
                s["t"] = 0
            s["P"] = new
        projection = s["P"]
        if self.optimizer == "sgd":
            g = g + wd * w
            r = g @ projection if tall else projection.T @ g
            s["buf"] = s["buf"] * self.momentum + r
            direction = r + self.momentum * s["buf"] if self.nesterov else s["buf"]
            return w - lr * o["scale"] * (direction @ projection.T if tall else projection @ direction)
        (beta1, beta2), eps = self.betas, self.eps
        r = g @ projection if tall else projection.T @ g
        s["t"] += 1
        s["m"] = s["m"] + (1 - beta1) * (r - s["m"])
        s["v"] = s["v"] * beta2 + (1 - beta2) * r * r
        s["denom"] = s["v"].sqrt() / math.sqrt(1 - beta2 ** s["t"]) + eps
        direction = (s["m"] / (1 - beta1 ** s["t"])) / s["denom"]
        w = w - lr * o["scale"] * (direction @ projection.T if tall else projection @ direction)
        return w * (1 - lr * wd)  # GaLore decays after the projected step

    def _inject(self, name, error):
        """ECO: the rounding error into the momentum of the rule that made W~ (module doc)."""
        s, lr = self.state[name], self.lr
        if name in self.galore:
            lr = lr * self.low_rank["scale"]
            error = error @ s["P"] if s["tall"] else s["P"].T @ error
        if self.optimizer == "sgd":
            s["buf"] = s["buf"] + (1 - 1 / self.momentum) / lr * error
        else:
            beta1 = self.betas[0]
            s["m"] = s["m"] + (1 - beta1 ** s["t"]) / lr * (1 - 1 / beta1) * s["denom"] * error

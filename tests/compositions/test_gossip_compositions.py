"""Gossip (DoCoM-SGT) with the optimizer-side rewrites, against the recursion written out eagerly.

ALGORITHMS.md section 7, "Gossip + X": gossip replaces the all-reduce, and GaLore, CAGE, ECO,
EMA-Nesterov and adaptive rotation act on each worker's local update as in one process. The
reference is the recursion of tests/passes/test_gossip.py (docs/passes/gossip.md) for two
workers on a ring, in one process, with `opt(theta, g')` replaced by each rewrite's local
update:

    x  = the evaluation point (theta; theta + beta_t d under EMA-Nesterov)
    v' = grad f(x; xi) + (1 - beta)(v - grad f(x_prev; xi))     (x_prev: the previous x)
    g' = g + gamma (g_mix - g_hat) + v' - v
    theta' = local_update(x, g') + gamma (theta_mix - theta_hat)
    g_hat += Q(g' - g_hat);  theta_hat += Q(theta' - theta_hat)   (theta' as stored)

with, per rewrite:
    GaLore        local_update = GaLore's AdamW, its projection refreshed from g'
    CAGE coupled  both forwards read Q(W); local_update = opt(W, g' + lambda_t (W - Q(W)))
    CAGE decoupl. both forwards read Q(W); local_update = opt(W, g') - lr lambda_t (W - Q(W))
    ECO           theta' = q(opt(W, g') + consensus); e = that tentative - q(tentative) goes
                  into opt's momentum (section 5's injection)
    EMA-Nesterov  every read of theta reads x = theta + beta_t d (forward, opt, the stored
                  previous point); d <- gamma d + (1 - gamma)(theta' - theta)
    rotation      both forwards read weights and inputs 4-bit fake-quantized, each layer in
                  the basis its choice says (test_rotation's EagerRotation); the choice is
                  remade every step from the first forward's weight and input, and the
                  second forward reads it

Every policy is `Policy.docom(...)` plus the rewrite, so the non-finite check is on (the
default). The compiled steps run one worker per gloo process, all cases in one
`run_workers` call; the references run here, in the test process.

Top-k, ECO's rounding and CAGE's quantizer are discontinuous: where the reference meets a
near tie, the last-bit differences between it and the compiled step may choose the other
side, and the runs part by a whole grid step or message entry (about 1e-3 here, where the
arithmetic agrees to 1e-6). The reference records how close each kind of choice came to a
tie, relative to its operands (`_note`), and a failed comparison prints it. Margins of
1e-7 and below can go either way (this data's ECO cases sit at 7e-8 and 1.5e-7 and agree;
with a 32-wide MLP, ECO with AdamW rounded one entry the other way at 6e-8): then change
the data, not the tolerance.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import lordo_compile as lc
from common import assert_close, compare
from lordo_compile.launch import run_workers
from lordo_compile.models import MLP
from lordo_compile.ops.rotation import choose_rotation
from lordo_compile.testing import training_step
from test_eco import reference_quantize
from test_ema_nesterov import beta_at
from test_fake_quant import CLIP, reference_rms
from test_low_rank import EagerGaLore
from test_rotation import EagerRotation

SIZES = (8, 16, 16, 4)
STEPS, WORLD = 12, 2
LR, WD, MOMENTUM, BETAS, EPS = 1e-2, 0.1, 0.9, (0.9, 0.999), 1e-8
GOSSIP = dict(ratio=0.2, gamma=0.5, beta=0.5, compressor="top_k")
# net.0.weight (16x8, tall) and net.2.weight (16x16) go low rank; net.4.weight (4x16) stays dense.
RANK, GAP, SCALE = 4, 2, 0.25
BITS = 4
EMA = dict(beta=0.6, gamma=0.8, warmup_steps=2, decay_start=10)
ROTATED = ("net.0.weight", "net.2.weight", "net.4.weight")

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WD, betas=BETAS, eps=EPS),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD),
}
CASES = {
    "galore": dict(optimizer="adamw", low_rank=dict(rank=RANK, update_proj_gap=GAP, scale=SCALE)),
    "cage decoupled": dict(optimizer="adamw", cage=dict(lam=2.0, form="decoupled")),
    "cage coupled": dict(optimizer="sgd_momentum", cage=dict(lam=2.0, form="coupled")),
    "eco sgd_momentum": dict(optimizer="sgd_momentum", eco="int8"),
    "eco adamw": dict(optimizer="adamw", eco="int8"),
    "ema_nesterov": dict(optimizer="adamw", ema=EMA),
    # A choice every step: every second forward follows a choice of its own step. Not AdamW: a
    # rotated-back 4-bit value is a signed sum of grid points and can cancel to float noise,
    # so a unit active for one or two tokens gets gradient entries of 1e-10 that two correct
    # runs compute differently, and Adam's first steps, g / (|g| + eps), make steps of
    # 0.01-0.1 lr of them.
    "rotation": dict(optimizer="sgd_momentum", rotation=1),
}


def _model():
    torch.manual_seed(0)
    return MLP(SIZES)


def _batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, SIZES[0], generator=generator), torch.randn(8, SIZES[-1], generator=generator))
            for _ in range(STEPS)]


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _pieces(model, flat):
    sizes = [p.numel() for p in model.parameters()]
    return [piece.view(p.shape) for p, piece in zip(model.parameters(), torch.split(flat, sizes))]


def _policy(case, **fields):
    options = {}
    if "low_rank" in case:
        options["low_rank"] = lc.LowRank(**case["low_rank"])
    if "cage" in case:
        options["fake_quant"] = lc.FakeQuant(bits=BITS, correction=lc.CAGE(
            **case["cage"], total_steps=STEPS, silence_ratio=0.0))
    if "eco" in case:
        options["eco"] = lc.ECO(format=case["eco"])
    if "ema" in case:
        options["ema_nesterov"] = lc.EMANesterov(**case["ema"])
    if "rotation" in case:
        options["fake_quant"] = lc.FakeQuant(bits=BITS, activation_bits=BITS,
                                             adaptive_rotation=lc.AdaptiveRotation(every=case["rotation"]))
    return dataclasses.replace(lc.Policy.docom(**GOSSIP), **options, **fields)


def _compiled(case, policy):
    torch._dynamo.reset()
    model = _model()
    opt = OPTIMIZERS[case["optimizer"]](model.parameters())
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")
    return model, step


def composition_worker(rank, world):
    results = {}
    for name, case in CASES.items():
        model, step = _compiled(case, _policy(case))
        history = []
        for x, y in _batches(rank):
            step(x, y)
            if "rotation" in case:
                tensors = step.state_dict()["runtime"]["tensors"]
                history.append(tuple(bool(tensors[f"fake_quant.rotate.{n}"]) for n in ROTATED))
        with step.materialized():
            params = _flat(model.parameters())
        tensors = step.state_dict()["runtime"]["tensors"]
        directions = [f"ema_nesterov.direction.{n}" for n, _ in model.named_parameters()]
        schedule = [step.backend.schedule.name_at(k) for k in range(STEPS)]
        results[name] = {
            "params": params, "param_hat": tensors["gossip.param_hat"].clone(),
            "directions": _flat(tensors[key] for key in directions) if directions[0] in tensors else None,
            "schedule": schedule,
            "passes": list(step.graphs[schedule[-1]]),
            "history": history,
            "choices": (sum(node.target is choose_rotation
                            for node in step.graphs["choose_rotation"]["gossip"].train_graph.graph.nodes)
                        if "rotation" in case else None),
        }
    case = CASES["ema_nesterov"]
    _, step = _compiled(case, _policy(case, on_nonfinite="skip"))
    try:
        step(*_batches(rank)[0])
        results["skip"] = None
    except ValueError as error:
        results["skip"] = str(error)
    return results


@pytest.fixture(scope="module")
def runs():
    return run_workers(composition_worker, WORLD, timeout=600)


# The eager recursion: each worker's local update, and the gossip around it.

_margins: dict[str, float] = {}


def _note(kind, margin):
    """Keep the closest approach to a tie of each kind of discrete choice."""
    _margins[kind] = min(_margins.get(kind, float("inf")), float(margin))


def _rounding_margin(y):
    """Distance of grid coordinates y from the nearest rounding boundary (a half-integer),
    relative to each entry's own grid coordinate: its last-bit error scales with it."""
    return ((y - y.floor() - 0.5).abs() / y.abs().clamp_min(1)).min()


def _quantize_rms(w):
    """CAGE's forward quantizer; its boundaries lie at integer multiples of the step."""
    step = 2 * CLIP[BITS] * w.pow(2).mean(-1, keepdim=True).sqrt() / (2**BITS - 1)
    y = w / step + 0.5
    inside = y.abs() < 2 ** (BITS - 1)
    _note("CAGE quantizer", _rounding_margin(y[inside]))
    return reference_rms(w, BITS)


def _gradient(model, flat, x, y, quantized):
    """grad f at the flat parameters; `quantized`: the forward reads Q(W) for every weight
    (straight-through: the gradient with respect to W is the one at Q(W))."""
    names = [n for n, _ in model.named_parameters()]
    values = dict(zip(names, _pieces(model, flat)))
    if quantized:
        fake = {n: _quantize_rms(p) for n, p in values.items() if n.endswith("weight")}

    def loss(params):
        if quantized:
            params = {n: fake[n] + (p - p.detach()) if n in fake else p for n, p in params.items()}
        return F.mse_loss(functional_call(model, params, (x,)), y)

    grads = grad(loss)(values)
    return _flat(grads[n] for n in names)


class Local:
    """One worker's parameters, the gradient at a point, and its update opt(x, g') + consensus,
    with torch.optim."""

    quantized_forward = False

    def __init__(self, case):
        self.case = case
        self.model = _model()
        self.weights = [p for n, p in self.model.named_parameters() if n.endswith("weight")]
        self.opt = self.make_optimizer()

    def make_optimizer(self):
        return OPTIMIZERS[self.case["optimizer"]](self.model.parameters())

    def theta(self):
        return _flat(self.model.parameters())

    def point(self, t):
        """Where the step reads theta: the forward, the update, the stored previous point."""
        return self.theta()

    def gradient(self, t, flat, x, y, first):
        """grad f(flat; x, y) at step t; first=False for the second forward, at the previous point."""
        return _gradient(self.model, flat, x, y, self.quantized_forward)

    @torch.no_grad()
    def set(self, flat):
        for p, piece in zip(self.model.parameters(), _pieces(self.model, flat)):
            p.copy_(piece)

    def base_step(self, t):
        self.opt.step()

    @torch.no_grad()
    def update(self, t, point, tracked, consensus):
        self.set(point)
        for p, piece in zip(self.model.parameters(), _pieces(self.model, tracked)):
            p.grad = piece.clone()
        self.base_step(t)
        for p in self.model.parameters():
            p.grad = None
        self.set(self.theta() + consensus)


class GaLore(Local):
    """GaLore's AdamW (test_low_rank.EagerGaLore): its refresh reads w.grad, the tracked g'."""

    def make_optimizer(self):
        low_rank = [w for w in self.weights if min(w.shape) > RANK]
        return EagerGaLore(self.model, "svd", "keep", [None] * len(low_rank), low_rank=low_rank, lr=LR, wd=WD,
                           betas=BETAS, eps=EPS, rank=RANK, gap=GAP, scale=SCALE)

    def base_step(self, t):
        self.opt.step(t)


class CAGE(Local):
    quantized_forward = True

    def base_step(self, t):
        # lambda_t: no silence, a linear ramp to lam at step STEPS (0-based t).
        lam = self.case["cage"]["lam"] * min(1.0, (t + 1) / STEPS)
        errors = [w - _quantize_rms(w) for w in self.weights]
        if self.case["cage"]["form"] == "coupled":
            for w, e in zip(self.weights, errors):
                w.grad += lam * e
        self.opt.step()
        if self.case["cage"]["form"] == "decoupled":
            for w, e in zip(self.weights, errors):
                w -= LR * lam * e


class ECO(Local):
    """Section 5 on every weight (int8 per row, nearest), the consensus term added to the
    tentative weight before it is rounded; biases through torch.optim."""

    def __init__(self, case):
        super().__init__(case)
        with torch.no_grad():
            for w in self.weights:
                w.copy_(self.quantize(w))
        self.state = {w: dict(m=torch.zeros_like(w), v=torch.zeros_like(w), t=0) for w in self.weights}

    def make_optimizer(self):
        return OPTIMIZERS[self.case["optimizer"]]([p for n, p in self.model.named_parameters()
                                                   if not n.endswith("weight")])

    def quantize(self, w):
        step = (w.abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).smallest_normal)
        _note("ECO rounding", _rounding_margin(w / step))
        return reference_quantize(w.detach(), self.case["eco"], "per_row", "nearest")

    @torch.no_grad()
    def update(self, t, point, tracked, consensus):
        self.set(point)
        tracked, consensus = _pieces(self.model, tracked), _pieces(self.model, consensus)
        weights = {id(w) for w in self.weights}
        for p, g in zip(self.model.parameters(), tracked):
            p.grad = None if id(p) in weights else g.clone()
        self.opt.step()
        (beta1, beta2), adamw = BETAS, self.case["optimizer"] == "adamw"
        for p, g, c in zip(self.model.parameters(), tracked, consensus):
            p.grad = None
            if id(p) not in weights:
                p += c
                continue
            s = self.state[p]
            if adamw:
                s["t"] += 1
                s["m"] = s["m"] + (1 - beta1) * (g - s["m"])
                s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
                bc1, bc2 = 1 - beta1 ** s["t"], 1 - beta2 ** s["t"]
                denom = s["v"].sqrt() / bc2**0.5 + EPS
                tentative = p * (1 - LR * WD) - (LR / bc1) * s["m"] / denom + c
                scale_error = bc1 / LR * (1 - 1 / beta1) * denom
            else:
                s["m"] = MOMENTUM * s["m"] + (g + WD * p)
                tentative = p - LR * s["m"] + c
                scale_error = (1 - 1 / MOMENTUM) / LR
            stored = self.quantize(tentative)
            s["m"] = s["m"] + scale_error * (tentative - stored)
            p.copy_(stored)


class Lookahead(Local):
    def __init__(self, case):
        super().__init__(case)
        self.d = torch.zeros_like(self.theta())

    def point(self, t):
        self.start = self.theta()
        return self.start + beta_at(t, **self.case["ema"]) * self.d

    def update(self, t, point, tracked, consensus):
        super().update(t, point, tracked, consensus)
        gamma = self.case["ema"]["gamma"]
        self.d = gamma * self.d + (1 - gamma) * (self.theta() - self.start)


class Rotation(Local):
    def __init__(self, case):
        super().__init__(case)
        self.eager = EagerRotation(self.model.net, case["rotation"])

    def gradient(self, t, flat, x, y, first):
        self.set(flat)  # update() sets the point again before the optimizer reads it
        loss = self.eager.loss(t, x, y, first)
        _note("rotation choice", min(self.eager.margins))
        return _flat(torch.autograd.grad(loss, list(self.model.parameters())))


def _local(case):
    kinds = (("low_rank", GaLore), ("cage", CAGE), ("eco", ECO), ("ema", Lookahead), ("rotation", Rotation))
    for key, kind in kinds:
        if key in case:
            return kind(case)
    return Local(case)


def _top_k(new, hat, k):
    """Q(new - hat). The difference cancels: its last-bit error scales with |new|, |hat|."""
    d = new - hat
    order = d.abs().argsort(descending=True)
    last, first_left = order[k - 1], order[k]
    operands = torch.stack([new[last], hat[last], new[first_left], hat[first_left]]).abs().max()
    _note("top-k", (d[last].abs() - d[first_left].abs()) / operands)
    q = torch.zeros_like(d)
    index = d.abs().topk(k, sorted=False).indices
    q[index] = d[index]
    return q


def _case(name):
    """A case by name; "plain <optimizer>" is gossip around that optimizer alone."""
    if name.startswith("plain "):
        return {"optimizer": name.removeprefix("plain ")}
    return CASES[name]


@functools.cache
def reference(name):
    """DoCoM-SGT for WORLD workers on a ring around each worker's local update. Returns, per
    worker, its final parameters, its public copy theta_hat and (EMA) its direction d, and
    the closest approach to a tie of each kind of discrete choice."""
    _margins.clear()
    case = _case(name)
    workers = [_local(case) for _ in range(WORLD)]
    batches = [_batches(i) for i in range(WORLD)]
    mixing = torch.full((WORLD, WORLD), 1.0 / WORLD)  # two workers: self and one neighbour, 1/2 each
    gamma, beta = GOSSIP["gamma"], GOSSIP["beta"]
    n = workers[0].theta().numel()
    k = max(1, round(GOSSIP["ratio"] * n))
    theta_hat = [w.theta() for w in workers]  # the same start on every worker (ECO: on the grid)
    tracker_hat = [torch.zeros(n) for _ in workers]
    tracker, momentum, previous = [None] * WORLD, [None] * WORLD, [None] * WORLD
    for t in range(STEPS):
        points, new_tracker, new_momentum = [], [], []
        for i, w in enumerate(workers):
            x, y = batches[i][t]
            point = w.point(t)
            fresh = w.gradient(t, point, x, y, first=True)
            if t == 0:
                v = g = fresh
            else:
                at_previous = w.gradient(t, previous[i], x, y, first=False)
                v = fresh + (1 - beta) * (momentum[i] - at_previous)
                disagreement = sum(mixing[i, j] * (tracker_hat[j] - tracker_hat[i]) for j in range(WORLD))
                g = tracker[i] + gamma * disagreement + v - momentum[i]
            points.append(point)
            new_tracker.append(g)
            new_momentum.append(v)
        consensus = [gamma * sum(mixing[i, j] * (theta_hat[j] - theta_hat[i]) for j in range(WORLD))
                     for i in range(WORLD)]
        for i, w in enumerate(workers):
            w.update(t, points[i], new_tracker[i], consensus[i])
            if t > 0:
                tracker_hat[i] = tracker_hat[i] + _top_k(new_tracker[i], tracker_hat[i], k)
            theta_hat[i] = theta_hat[i] + _top_k(w.theta(), theta_hat[i], k)
        tracker, momentum, previous = new_tracker, new_momentum, points
    workers = [dict(params=w.theta(), param_hat=theta_hat[i], d=getattr(w, "d", None),
                    history=w.eager.history if isinstance(w, Rotation) else [])
               for i, w in enumerate(workers)]
    return workers, dict(_margins)


def _check(got, want, margins, label):
    closest = ", ".join(f"{kind} {margin:.1e}" for kind, margin in margins.items())
    keys = ("params", "param_hat")
    assert_close({k: got[k] for k in keys}, {k: want[k] for k in keys},
                 msg=f"{label} (closest approach to a tie: {closest})")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES))
def test_each_worker_follows_the_recursion(runs, name):
    if "low_rank" in CASES[name]:
        expected_schedule = ["init+refresh"] + ["step" if k % GAP else "refresh" for k in range(1, STEPS)]
    elif "rotation" in CASES[name]:
        expected_schedule = ["choose_rotation+init"] + ["choose_rotation"] * (STEPS - 1)
    else:
        expected_schedule = ["init"] + ["step"] * (STEPS - 1)
    want, margins = reference(name)
    plain, _ = reference(f"plain {CASES[name]['optimizer']}")
    for rank, result in enumerate(runs):
        got = result[name]
        assert got["schedule"] == expected_schedule
        _check(got, want[rank], margins, f"{name}, rank {rank}")
        assert got["history"] == want[rank]["history"]
        changed = compare(plain[rank]["params"], want[rank]["params"], rtol=0, atol=1e-3)
        assert not changed.ok, "the rewrite changed nothing"
        if want[rank]["d"] is not None:
            # d is a difference of weights about 20 times its size, and carries their rounding.
            assert_close(got["directions"], want[rank]["d"], rtol=1e-4, atol=1e-5)
    assert not compare(runs[1][name]["params"], runs[0][name]["params"], rtol=0, atol=1e-4).ok, "workers agree exactly"


@pytest.mark.distributed
def test_rotation_is_chosen_once_per_step(runs):
    """The second forward, at the previous point, reads the choices the first made: one
    choice per layer in the graph, so both gradients of the momentum's correction are of
    one function."""
    want, _ = reference("rotation")
    assert {flag for worker in want for flags in worker["history"] for flag in flags} == {False, True}
    assert want[0]["history"] != want[1]["history"], "each worker chooses from its own weights and inputs"
    for result in runs:
        assert result["rotation"]["choices"] == len(ROTATED)


@pytest.mark.distributed
def test_on_nonfinite_skip_is_refused_and_raise_follows_the_recursion(runs):
    assert lc.Policy.docom().on_nonfinite == "raise"
    want, margins = reference("ema_nesterov")
    for rank, result in enumerate(runs):
        assert result["skip"] is not None, "on_nonfinite='skip' with gossip was accepted"
        assert "on_nonfinite='skip' cannot be used" in result["skip"] and "gossip" in result["skip"]
        assert "the gradients checked are each worker's own" in result["skip"]
        assert all("on_nonfinite" in result[name]["passes"] for name in CASES)
        _check(result["ema_nesterov"], want[rank], margins, f"ema_nesterov, rank {rank}")

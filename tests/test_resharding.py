"""Resuming on another number of workers (docs/reliability.md), 4 -> 2 and 2 -> 4 gloo processes.

DDP, DiLoCo and LoRDO save a checkpoint after H steps (`lc.save_checkpoint`; for DiLoCo and
LoRDO right after their first sync); a run with another number of workers loads it and trains
H steps more, to the next sync (H is `test_lordo.H`, EagerLoRDO's interval). Expected, written out:

- DDP: every new worker starts from the writers' model and AdamW state, all carried over
  (every writer held the same), and averages gradients over the new workers;
- DiLoCo: every new worker starts from the writers' common model and outer momentum, with
  fresh inner AdamW moments (each writer's own, so not carried over, and named in a
  warning), and DiLoCo goes on over the new workers; the same for its two-level form
  (`mesh=`: 4 workers as 2 x 2, 2 as 2 x 1);
- LoRDO: test_lordo.py's section 3 reference from the common model, outer momentum and
  global projection, with fresh low-rank moments (bias correction restarting with them),
  error feedback and dense AdamW moments; the same for its two-level form.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import lordo_compile as lc
from common import assert_close, average_gradients, named_parameters
from lordo_compile.launch import run_workers
from lordo_compile.models import MLP
from lordo_compile.testing import training_step
from test_lordo import BETAS, DEFAULTS, EPS, H, LR as LORDO_LR, NAMES, RANK, VARIANTS, WD, EagerLoRDO, lordo_problem

pytestmark = pytest.mark.distributed

OUTER = dict(lr=0.7, momentum=0.9, nesterov=True)


def _mlp_batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)) for _ in range(2 * H)]


def _mlp_problem(rank, policy):
    torch.manual_seed(0)
    model = MLP((16, 32, 32, 4))
    batches = _mlp_batches(rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")
    return model, opt, step, batches


def _problem(rank, mesh=None):
    return _mlp_problem(rank, lc.Policy.diloco(H, outer_lr=OUTER["lr"], outer_momentum=OUTER["momentum"], mesh=mesh))


def _ddp_problem(rank, mesh=None):
    """DDP has one level: `mesh` is always None here."""
    return _mlp_problem(rank, lc.Policy.ddp())


def _mesh(world):
    """Two levels: 2 groups of world / 2 workers (4 workers as 2 x 2, 2 as 2 x 1)."""
    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("outer", "inner"))


# LoRDO with an outer momentum, so that the checkpoint carries one.
LORDO = {**DEFAULTS, **VARIANTS["outer=nesterov"]}


def _lordo_problem(rank, mesh=None):
    model, batches = lordo_problem(rank)
    opt = torch.optim.AdamW(model.parameters(), lr=LORDO_LR, weight_decay=WD, betas=BETAS, eps=EPS)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy.lordo(rank=RANK, sync_every=H, mesh=mesh, **LORDO), compiler="eager")
    return model, opt, step, batches[:2 * H]


PROBLEMS = {"ddp": _ddp_problem, "diloco": _problem, "two-level diloco": _problem, "lordo": _lordo_problem,
            "two-level lordo": _lordo_problem}
TWO_LEVELS = {"two-level diloco", "two-level lordo"}


def writer(rank, world, directory):
    """Each policy to its first sync, checkpointed; the state every writer holds alike."""
    carried = {}
    for policy, problem in PROBLEMS.items():
        torch._dynamo.reset()
        model, opt, step, batches = problem(rank, _mesh(world) if policy in TWO_LEVELS else None)
        for x, y in batches[:H]:
            step(x, y)
        lc.save_checkpoint(f"{directory}/{policy}", model, opt, step)
        carried[policy] = {name: t for name, t in step.state_dict()["runtime"]["tensors"].items()
                           if ".outer_momentum." in name or ".projection." in name}
        if policy == "ddp":
            carried[policy] = {f"{index}.{key}": t for index, state in opt.state_dict()["state"].items()
                               for key, t in state.items()}
    return carried


def reader(rank, world, directory, carried):
    results = {}
    for policy, problem in PROBLEMS.items():
        torch._dynamo.reset()
        mesh = _mesh(world) if policy in TWO_LEVELS else None
        model, opt, step, batches = problem(rank, mesh)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lc.load_checkpoint(f"{directory}/{policy}", model, opt, step)
        loaded = named_parameters(model)
        for x, y in batches[H:]:
            step(x, y)
        inner = mesh.get_group("inner") if mesh else None
        if policy == "ddp":
            expected = _ddp_written_out(rank, world, loaded, carried[policy])
        else:
            written_out = _lordo_written_out if "lordo" in policy else _written_out
            expected = written_out(rank, world, loaded, carried[policy], inner)
        results[policy] = [str(w.message) for w in caught], loaded, named_parameters(model), expected
    return results


def _written_out(rank, world, loaded, carried, inner=None):
    """DiLoCo from the loaded model and outer momentum, with fresh AdamW moments, to the next
    sync; gradients averaged over `inner` first where there are two levels (inner groups then
    agree, so the average over every worker at the sync is the outer group's)."""
    model = MLP((16, 32, 32, 4))
    model.load_state_dict(loaded)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    anchor = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    outer = torch.optim.SGD(anchor, **OUTER)
    for a, (name, _) in zip(anchor, model.named_parameters()):
        outer.state[a]["momentum_buffer"] = carried[f"sync.outer_momentum.{name}"].clone()
    batches = _mlp_batches(rank)
    for x, y in batches[H:]:
        F.mse_loss(model(x), y).backward()
        if inner is not None:
            average_gradients(model, inner)
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for a, p in zip(anchor, model.parameters()):
            delta = a - p
            dist.all_reduce(delta)
            a.grad = delta / world
        outer.step()
        for a, p in zip(anchor, model.parameters()):
            p.copy_(a)
    return named_parameters(model)


def _ddp_written_out(rank, world, loaded, carried):
    """DDP from the loaded model and AdamW state (every writer held the same), to the end."""
    model = MLP((16, 32, 32, 4))
    model.load_state_dict(loaded)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state = {}
    for name, t in carried.items():
        index, key = name.split(".")
        state.setdefault(int(index), {})[key] = t.clone()
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    batches = _mlp_batches(rank)
    for x, y in batches[H:]:
        F.mse_loss(model(x), y).backward()
        average_gradients(model)
        opt.step()
        opt.zero_grad()
    return named_parameters(model)


def _lordo_written_out(rank, world, loaded, carried, inner=None):
    """Section 3 from the loaded model, outer momentum and projections, everything each writer
    held for itself (moments, error feedback, dense AdamW moments) from zero, to the next sync;
    fed the inner group's mean gradient where there are two levels (as in test_two_levels.py)."""
    model, batches = lordo_problem(rank)
    model.load_state_dict(loaded)
    reference = EagerLoRDO(model, LORDO, world, [None, None], [None, None])
    for a, (name, _) in zip(reference.anchor, model.named_parameters()):
        reference.outer.state[a]["momentum_buffer"] = carried[f"lordo.outer_momentum.{name}"].clone()
    for w, name in zip(reference.low, NAMES):
        reference.s[w]["Q"] = carried[f"lordo.projection.{name}"].clone()
    for k, (x, y) in enumerate(batches[H:2 * H], start=H):
        F.mse_loss(model(x), y).backward()
        if inner is not None:
            average_gradients(model, inner)
        reference.step(k)
        model.zero_grad()
    return named_parameters(model)


# The state each policy's writers held for themselves, which the warning must name.
DILOCO_OWN = ("'net.0.weight'", "torch.optim's state")
LORDO_OWN = ("'lordo.u.0.weight'", "'lordo.error.2.weight'")
OWN = {"diloco": DILOCO_OWN, "two-level diloco": DILOCO_OWN, "lordo": LORDO_OWN, "two-level lordo": LORDO_OWN}


@pytest.mark.parametrize("before, after", [(4, 2), (2, 4)])
def test_a_checkpoint_after_a_sync_resumes_on_another_number_of_workers(before, after, tmp_path):
    written = run_workers(writer, before, timeout=600, args=(str(tmp_path),))
    carried = written[0]
    assert all(torch.equal(w[policy][name], t) for w in written for policy in carried
               for name, t in carried[policy].items())
    for results in run_workers(reader, after, timeout=600, args=(str(tmp_path), carried)):
        for policy, (messages, loaded, resumed, expected) in results.items():
            if policy == "ddp":  # every writer held the same state: all of it is carried over
                assert not any("starts afresh" in m for m in messages), messages
            else:
                assert any(f"checkpoint of {before} workers on {after}" in m and all(own in m for own in OWN[policy])
                           for m in messages), (policy, messages)
            assert_close(resumed, expected, atol=1e-5 if "lordo" in policy else 1e-6)
            writers_model = _writers_model(tmp_path / policy,
                                           lordo_problem(0)[0] if "lordo" in policy else MLP((16, 32, 32, 4)))
            assert_close(loaded, writers_model, rtol=0, atol=0)


def _writers_model(directory, model):
    entries = {"rank0": {"model": model.state_dict()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(entries, checkpoint_id=str(directory), no_dist=True)
    return entries["rank0"]["model"]

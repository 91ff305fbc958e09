"""Resuming on another number of workers (docs/reliability.md), 4 -> 2 and 2 -> 4 gloo processes.

DiLoCo saves a checkpoint right after its first sync (`lc.save_checkpoint`); a run with
another number of workers loads it and trains to the next sync. Expected, written out: every
new worker starts from the writers' common model and outer momentum, with fresh inner AdamW
moments (each writer's own, so not carried over, and named in a warning), and DiLoCo goes on
over the new workers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

import lordo_compile as lc
from common import assert_close, named_parameters
from lordo_compile.launch import run_workers
from lordo_compile.models import MLP
from lordo_compile.testing import training_step

pytestmark = pytest.mark.distributed

H = 4
OUTER = dict(lr=0.7, momentum=0.9, nesterov=True)


def _problem(rank):
    torch.manual_seed(0)
    model = MLP((16, 32, 32, 4))
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator))
               for _ in range(2 * H)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy.diloco(H, outer_lr=OUTER["lr"], outer_momentum=OUTER["momentum"]),
                      compiler="eager")
    return model, opt, step, batches


def writer(rank, world, directory):
    model, opt, step, batches = _problem(rank)
    for x, y in batches[:H]:
        step(x, y)
    lc.save_checkpoint(directory, model, opt, step)
    tensors = step.state_dict()["runtime"]["tensors"]
    return {name.removeprefix("sync.outer_momentum."): t for name, t in tensors.items()
            if name.startswith("sync.outer_momentum.")}


def reader(rank, world, directory, outer_momentum):
    model, opt, step, batches = _problem(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lc.load_checkpoint(directory, model, opt, step)
    loaded = named_parameters(model)
    for x, y in batches[H:]:
        step(x, y)
    return [str(w.message) for w in caught], loaded, named_parameters(model), _written_out(rank, world, loaded,
                                                                                          outer_momentum)


def _written_out(rank, world, loaded, outer_momentum):
    """DiLoCo from the loaded model and outer momentum, with fresh AdamW moments, to the next sync."""
    model = MLP((16, 32, 32, 4))
    model.load_state_dict(loaded)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    anchor = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    outer = torch.optim.SGD(anchor, **OUTER)
    for a, (name, _) in zip(anchor, model.named_parameters()):
        outer.state[a]["momentum_buffer"] = outer_momentum[name].clone()
    _, _, _, batches = _problem(rank)
    for x, y in batches[H:]:
        F.mse_loss(model(x), y).backward()
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


@pytest.mark.parametrize("before, after", [(4, 2), (2, 4)])
def test_a_checkpoint_after_a_sync_resumes_on_another_number_of_workers(before, after, tmp_path):
    written = run_workers(writer, before, timeout=600, args=(str(tmp_path),))
    outer_momentum = written[0]
    assert all(torch.equal(m[name], outer_momentum[name]) for m in written for name in outer_momentum)
    for messages, loaded, resumed, expected in run_workers(reader, after, timeout=600,
                                                            args=(str(tmp_path), outer_momentum)):
        assert any(f"checkpoint of {before} workers on {after}" in m and "'net.0.weight'" in m
                   and "torch.optim's state" in m for m in messages), messages
        assert_close(resumed, expected)
    assert_close(loaded, _writers_model(tmp_path), rtol=0, atol=0)


def _writers_model(directory):
    model = MLP((16, 32, 32, 4))
    entries = {"rank0": {"model": model.state_dict()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(entries, checkpoint_id=str(directory), no_dist=True)
    return entries["rank0"]["model"]

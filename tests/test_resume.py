"""Checkpoint, resume and determinism for every policy, in gloo processes.

A first set of processes trains 9 steps and saves a checkpoint (model, optimizer and
`step.state_dict()`, through `torch.save`) after steps 2 and 4: after step 2 a projection
refresh comes next (every 3 steps), after step 4 a sync (every 3 steps). A second, fresh
set of processes trains the same 9 steps again (determinism) and, from each checkpoint,
rebuilds model, optimizer and compiled step, loads, and finishes. Every end state (weights,
optimizer state, the step's own state) must equal the first run's bit for bit. Policies
that communicate run on 2 workers, the others on 1 (a second worker would only repeat the
first); the compositions among them carry several events on one step (a refresh on a sync
step). Every pass runs, alone or in a composition: GaLore, DiLoCo, CAGE, EMA-Nesterov and
DoCoM only in one (each alone added a minute to the suite and checked no state that the
composition does not hold). Every policy of one worker count runs in the same two sets of
processes.

Also: a checkpoint is refused by a run with another number of workers, and a worker that
leaves or hangs in a sync fails the others within the process group's timeout, after
which the run resumes from the last checkpoint exactly.
"""

from __future__ import annotations

import datetime
import time
import traceback
from pathlib import Path

import pytest
import torch

import lordo_compile as lc
from common import ONE_LAYER_GPT, checkpoint_bytes, load_checkpoint_bytes
from lordo_compile.launch import WorkerError, run_workers
from lordo_compile.models import TinyGPT
from lordo_compile.testing import training_step

pytestmark = pytest.mark.distributed

STEPS, STOPS, EVERY = 9, (2, 4), 3
FAULT_TIMEOUT_S = 10
# Refreshes every 2 steps meet the syncs after steps 3, 6, 9 at 0-based steps 2 and 8.
OFTEN = 2

POLICIES = {
    "identity": lambda: lc.Policy(),
    "ddp": lambda: lc.Policy.ddp(),
    "local_sgd": lambda: lc.Policy.local_sgd(sync_every=EVERY),
    "low_rank_ddp": lambda: lc.Policy.low_rank_ddp(rank=4, update_proj_gap=EVERY),
    "lordo": lambda: lc.Policy.lordo(rank=4, sync_every=EVERY),
    "eco": lambda: lc.Policy.eco(format="int8", rounding="stochastic", seed=3),
    "adaptive_rotation": lambda: lc.Policy(fake_quant=lc.FakeQuant(bits=4, activation_bits=4,
                                                                   adaptive_rotation=lc.AdaptiveRotation(every=EVERY))),
    "galore+diloco": lambda: lc.Policy(low_rank=lc.LowRank(rank=4, update_proj_gap=OFTEN),
                                       sync=lc.Sync(every=EVERY, outer_lr=0.7, outer_momentum=0.9, nesterov=True)),
    "eco+diloco": lambda: lc.Policy(eco=lc.ECO(format="int8", rounding="stochastic", seed=3),
                                    sync=lc.Sync(every=EVERY, outer_lr=0.7, outer_momentum=0.9, nesterov=True)),
    "docom+ema": lambda: lc.Policy(gossip=lc.Gossip(ratio=0.1), ema_nesterov=lc.EMANesterov(beta=0.5)),
    "lordo+cage+eco+ema": lambda: lc.Policy(
        lordo=lc.LoRDO(rank=4, sync_every=EVERY), fake_quant=lc.FakeQuant(bits=4, correction=lc.CAGE(
            total_steps=STEPS, silence_ratio=0.3)), eco=lc.ECO(format="fp8_e4m3", rounding="stochastic", seed=3),
        ema_nesterov=lc.EMANesterov(beta=0.5, warmup_steps=OFTEN)),
}
# The workers each policy runs on: those that never communicate on one.
LOCAL = {"identity", "eco", "adaptive_rotation"}
WORLD = {name: 1 if name in LOCAL else 2 for name in POLICIES}


def _build(name: str):
    torch.manual_seed(0)
    model = TinyGPT(ONE_LAYER_GPT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # The rewritten graph run as it is: what is checked is the state it keeps, not code generation.
    step = lc.compile(training_step(model.loss, opt), POLICIES[name](), compiler="eager")
    return model, opt, step


def _batches(rank: int):
    generator = torch.Generator().manual_seed(10 + rank)
    idx = torch.randint(0, ONE_LAYER_GPT.vocab_size, (STEPS, 4, ONE_LAYER_GPT.block_size + 1), generator=generator)
    return [(row[:, :-1], row[:, 1:]) for row in idx]


def _end_state(model, opt, step) -> dict:
    with step.materialized():
        params = [p.detach().clone() for p in model.parameters()]
    return {"params": params, "opt": opt.state_dict()["state"], "step": step.state_dict()}


def first_run(rank, world, name, directory):
    model, opt, step = _build(name)
    for k, batch in enumerate(_batches(rank)):
        step(*batch)
        if k in STOPS:
            Path(directory, f"{name}-{world}-{rank}-{k}.pt").write_bytes(checkpoint_bytes(model, opt, step))
    return _end_state(model, opt, step)


def second_run(rank, world, name, directory):
    """A fresh process: the same run again, then a resume from each checkpoint."""
    model, opt, step = _build(name)
    for batch in _batches(rank):
        step(*batch)
    ends = {"again": _end_state(model, opt, step)}
    for k in STOPS:
        ends[f"resumed after step {k}"] = _resume(rank, world, name, directory, k)
    return ends


def _resume(rank, world, name, directory, stop):
    """Rebuild everything, load the checkpoint taken after step `stop`, and finish the run."""
    torch._dynamo.reset()
    model, opt, step = _build(name)
    load_checkpoint_bytes(Path(directory, f"{name}-{world}-{rank}-{stop}.pt").read_bytes(), model, opt, step)
    for batch in _batches(rank)[stop + 1:]:
        step(*batch)
    return _end_state(model, opt, step)


def _differences(expected, actual, path="") -> list[str]:
    if isinstance(expected, torch.Tensor):
        return [] if torch.equal(expected, actual) else [path]
    if isinstance(expected, dict):
        if set(expected) != set(actual):
            return [f"{path}: keys {sorted(map(str, expected))} != {sorted(map(str, actual))}"]
        return [d for key in expected for d in _differences(expected[key], actual[key], f"{path}.{key}")]
    if isinstance(expected, (list, tuple)):
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for d in _differences(e, a, f"{path}[{i}]")]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def _each(run, rank, world, names, directory):
    """`run` for every policy in `names`; a policy that raises gives its traceback instead."""
    results = {}
    for name in names:
        torch._dynamo.reset()
        try:
            results[name] = run(rank, world, name, directory)
        except Exception:
            results[name] = traceback.format_exc()
    return results


def first_runs(rank, world, names, directory):
    return _each(first_run, rank, world, names, directory)


def second_runs(rank, world, names, directory):
    return _each(second_run, rank, world, names, directory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("checkpoints"))
    results = {}
    for world in sorted(set(WORLD.values())):
        names = [name for name, w in WORLD.items() if w == world]
        firsts = run_workers(first_runs, world, args=(names, directory), timeout=1200)
        seconds = run_workers(second_runs, world, args=(names, directory), timeout=1200)
        results.update({name: [(first[name], second[name]) for first, second in zip(firsts, seconds)]
                        for name in names})
    return results


@pytest.mark.parametrize("name", list(POLICIES))
def test_resume_and_rerun_are_bit_identical(runs, name):
    for rank, (first, second) in enumerate(runs[name]):
        for run in (first, second):
            assert not isinstance(run, str), f"rank {rank} of {WORLD[name]} raised:\n{run}"
        for label, end in second.items():
            assert _differences(first, end) == [], f"rank {rank} of {WORLD[name]}, {label}"


def resume_elsewhere(rank, world, name, path):
    model, opt, step = _build(name)
    saved = torch.load(path, weights_only=True)
    step.load_state_dict(saved["step"])
    before = [p.detach().clone() for p in model.parameters()]
    try:
        step(*_batches(rank)[0])
    except ValueError as error:
        return str(error), all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return "no error", False


def test_resuming_with_another_number_of_workers_is_refused(tmp_path):
    # The refusal is the checkpoint's, whatever the policy (local SGD's run cost the suite 21 s more).
    name = "lordo"
    run_workers(first_run, 2, args=(name, str(tmp_path)))
    path = str(tmp_path / f"{name}-2-0-{STOPS[0]}.pt")
    message, untouched = run_workers(resume_elsewhere, 3, args=(name, path))[0]
    assert "written by a run of 2 workers; this run has 3" in message
    assert "Resume with 2 workers" in message
    assert untouched


def faulty_run(rank, world, name, directory, fault):
    """Checkpoint after step 4; at the sync of step 5, rank 1 leaves or hangs."""
    model, opt, step = _build(name)
    batches = _batches(rank)
    for k, batch in enumerate(batches[: STOPS[1] + 1]):
        step(*batch)
    Path(directory, f"{name}-{world}-{rank}-{STOPS[1]}.pt").write_bytes(checkpoint_bytes(model, opt, step))
    if rank == 1:
        if fault == "hangs":
            time.sleep(FAULT_TIMEOUT_S + 15)
        return "left"
    started = time.monotonic()
    try:
        step(*batches[STOPS[1] + 1])
    except lc.CollectiveError as error:
        return str(error), time.monotonic() - started
    return "no error", time.monotonic() - started


def resumed_run(rank, world, name, directory):
    return _resume(rank, world, name, directory, STOPS[1])


@pytest.fixture(scope="module")
def uninterrupted_lordo(tmp_path_factory):
    return run_workers(first_run, 2, args=("lordo", str(tmp_path_factory.mktemp("uninterrupted"))))


@pytest.mark.parametrize("fault", ["exits", "hangs"])
def test_a_fault_in_a_sync_raises_within_the_timeout_and_the_run_resumes_exactly(fault, tmp_path,
                                                                                  uninterrupted_lordo):
    name, faulty = "lordo", tmp_path
    message, elapsed = run_workers(faulty_run, 2, timeout=120, args=(name, str(faulty), fault),
                                   pg_timeout=datetime.timedelta(seconds=FAULT_TIMEOUT_S))[0]
    assert f"graph 'sync' at step {STOPS[1] + 1} failed" in message
    assert "Restart every worker from the last checkpoint" in message
    assert elapsed < FAULT_TIMEOUT_S + 10
    resumed = run_workers(resumed_run, 2, args=(name, str(faulty)))
    for rank in range(2):
        assert _differences(uninterrupted_lordo[rank], resumed[rank]) == [], f"rank {rank}"


def dcp_first_run(rank, world, name, directory):
    model, opt, step = _build(name)
    for k, batch in enumerate(_batches(rank)):
        step(*batch)
        if k == STOPS[1]:
            lc.save_checkpoint(directory, model, opt, step)
    return _end_state(model, opt, step)


def dcp_resumed_run(rank, world, name, directory):
    model, opt, step = _build(name)
    lc.load_checkpoint(directory, model, opt, step)
    for batch in _batches(rank)[STOPS[1] + 1:]:
        step(*batch)
    return _end_state(model, opt, step)


@pytest.mark.parametrize("name, world", [("lordo", 2), ("eco", 1)])
def test_torch_distributed_checkpoint_resumes_bit_for_bit(name, world, tmp_path):
    expected = run_workers(dcp_first_run, world, args=(name, str(tmp_path)))
    resumed = run_workers(dcp_resumed_run, world, args=(name, str(tmp_path)))
    for rank in range(world):
        assert _differences(expected[rank], resumed[rank]) == [], f"rank {rank}"
    if world == 2:
        # Taken between syncs (a sync follows step 5): each worker's model is its own.
        with pytest.raises(WorkerError, match="written by 2 workers whose models differ .* cannot resume on 3"):
            run_workers(dcp_resumed_run, 3, args=(name, str(tmp_path)))

"""Infrequent synchronization and data parallelism in 2 gloo processes, against eager references.

- local_sgd(H) against torch's PeriodicModelAverager(period=H, warmup_steps=H-1);
- diloco(H) against DiLoCo written out below with torch.optim.SGD as the outer optimizer, and
  with its inner moments and outer momentum held in 8 bits (QuantizedState) against the same
  reference storing them as torchao does after each step;
- streaming diloco(H, fragments=2), with and without overlap (delay, local_weight; 2 and
  4 workers), against the same reference synced and merged per fragment;
- ddp() on a step with no collective against eager training with an explicit all-reduce, its
  buckets' all-reduces issued during the backward;
plus byte accounting, resuming between syncs (an overlapped all-reduce in flight included),
and a worker that leaves during a sync.
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

import lordo_compile as lc
from common import (EagerOuterStep, assert_close, average_gradients, checkpoint_bytes, compare, int8_sent,
                    load_checkpoint_bytes, named_parameters, stored_in_8_bits)
from lordo_compile.launch import run_workers
from lordo_compile.models import MLP
from lordo_compile.testing import training_step

pytestmark = pytest.mark.distributed

H, STEPS = 4, 12  # three syncs, the last on the last step
INNER = dict(lr=1e-2, weight_decay=0.1)
# Blocks of 32 from 256 entries: the MLP's two larger weights (512 and 1024 entries) are held.
HELD = lc.QuantizedState(bits=8, block_size=32, min_size=256)


def _problem(rank):
    torch.manual_seed(0)
    model = MLP((16, 32, 32, 4))
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator))
               for _ in range(STEPS)]
    return model, torch.optim.AdamW(model.parameters(), **INNER), batches


def _eager_local_sgd(rank):
    model, opt, batches = _problem(rank)
    averager = PeriodicModelAverager(period=H, warmup_steps=H - 1)
    for x, y in batches:
        F.mse_loss(model(x), y).backward()
        opt.step()
        averager.average_parameters(model.parameters())
        opt.zero_grad()
    return named_parameters(model)


def _store_in_8_bits(optimizer, held):
    """Each moment of `optimizer` that `held` holds, as torchao stores it."""
    for state in optimizer.state.values():
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False), ("momentum_buffer", True)):
            if key in state and held.holds(state[key].numel()):
                state[key].copy_(stored_in_8_bits(state[key], signed, held.block))


def _eager_diloco(rank, world, held=None, fragments=None, delay=0, local_weight=0.0, payload="full"):
    """DiLoCo whose fragments (lists of parameter names; default one, the whole model) each
    sync alone, fragment f after steps (f + 1) H / F - 1, then every H steps; with `delay`,
    its average is applied `delay` steps after it was taken, keeping `local_weight` of the
    local parameters; with the int8 payload, each worker sends `int8_sent(delta + error)` and
    keeps the rest as its error."""
    model, opt, batches = _problem(rank)
    outer = EagerOuterStep(model)
    fragments = fragments or [list(outer.params)]
    averages, errors = {}, {name: torch.zeros_like(p) for name, p in outer.params.items()}
    for k, (x, y) in enumerate(batches):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if held:
            _store_in_8_bits(opt, held)
        for f, names in enumerate(fragments):
            first = (f + 1) * H // len(fragments) - 1
            if k >= first and (k - first) % H == 0:
                averages[f] = {}
                for name in names:
                    delta = outer.pseudo_gradient(name)
                    if payload == "int8":
                        sent = int8_sent(delta + errors[name])
                        errors[name] = delta + errors[name] - sent
                        every = [torch.empty_like(sent) for _ in range(world)]
                        dist.all_gather(every, sent)
                        averages[f][name] = torch.stack(every).mean(0)
                    else:
                        dist.all_reduce(delta)
                        averages[f][name] = delta / world
            if k >= first + delay and (k - first - delay) % H == 0:
                outer.step(averages[f], local_weight)
                if held:
                    _store_in_8_bits(outer.optimizer, held)
    return named_parameters(model)


def _eager_ddp(rank, world):
    model, opt, batches = _problem(rank)
    for x, y in batches:
        F.mse_loss(model(x), y).backward()
        average_gradients(model)
        opt.step()
        opt.zero_grad()
    return named_parameters(model)


def _compiled(rank, policy, explicit_all_reduce=False, compiler="eager"):
    model, opt, batches = _problem(rank)
    world = dist.get_world_size()

    def averaged_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        opt.zero_grad()
        return loss

    train_step = averaged_step if explicit_all_reduce else training_step(lambda x, y: F.mse_loss(model(x), y), opt)
    step = lc.compile(train_step, policy, compiler=compiler)
    for x, y in batches:
        step(x, y)
    report = step.comm_report()
    aten = step.graphs["step"]["aten"].body.splitlines() if compiler != "eager" else []
    return named_parameters(model), {"bytes": report.bytes_sent, "collectives": report.collectives,
                                     "calls": dict(report.calls), "graphs": sorted(step.graphs), "aten": aten}


def parity_worker(rank, world, case):
    if case == "local_sgd":
        return _eager_local_sgd(rank), _compiled(rank, lc.Policy.local_sgd(sync_every=H))
    if case == "local_sgd_explicit":
        return _eager_local_sgd(rank), _compiled(rank, lc.Policy.local_sgd(sync_every=H), explicit_all_reduce=True)
    if case == "diloco":
        return _eager_diloco(rank, world), _compiled(rank, lc.Policy.diloco(sync_every=H))
    if case == "diloco_8_bit":
        policy = lc.Policy(sync=lc.Policy.diloco(sync_every=H).sync, quantized_state=HELD)
        return (_eager_diloco(rank, world, HELD), _eager_diloco(rank, world)), _compiled(rank, policy)
    return _eager_ddp(rank, world), _compiled(rank, lc.Policy(data_parallel=DDP_BUCKETS), compiler="aot_eager")


# 2 KiB buckets on the MLP's gradients in reverse order (4, 128, 32, 1024, 32, 512 entries):
# [4, 128, 32], [1024] (larger than a bucket), [32], [512]: four all-reduces per step.
DDP_BUCKETS = lc.DataParallel(bucket_cap_mb=2 / 1024)


@pytest.fixture(scope="module", params=["local_sgd", "local_sgd_explicit", "diloco", "diloco_8_bit", "ddp"])
def parity(request):
    return request.param, run_workers(parity_worker, 2, args=(request.param,))


def test_compiled_matches_the_eager_reference(parity):
    case, results = parity
    for reference, (params, _) in results:
        if case == "diloco_8_bit":
            _assert_equal_up_to_flipped_codes(params, *reference)
        else:
            assert_close(params, reference)


def _assert_equal_up_to_flipped_codes(params, held, full):
    """Our graph and torch.optim round AdamW's update in a different order, by about an ulp
    on some CPUs (AVX-512 ones, measured): a moment that close to the midpoint between two
    codes of the 8-bit map then rounds to the other code, and the 12 steps carry that to
    other weights. Measured: the worst weight 3.5e-4 of its tensor's rms away from the
    reference stored in 8 bits (on other CPUs, within the default 1e-6). The floor is 1e-3
    of the rms, and the reference that keeps its moments in fp32 must lie far outside it, or
    the test could not tell 8-bit storage from none."""
    assert_close(params, held, atol=1e-3)
    assert compare(params, full, atol=1e-3).ratio > 100


def test_ranks_are_bit_identical_after_the_last_sync(parity):
    _, results = parity
    (first, _), (second, _) = results[0][1], results[1][1]
    assert_close(second, first, rtol=0, atol=0)


def test_bytes_sent_match_the_analytic_count(parity):
    case, results = parity
    numel = sum(p.numel() for p in MLP((16, 32, 32, 4)).parameters())
    _, report = results[0][1]
    if case == "ddp":
        assert report["calls"] == {"step": STEPS}
        assert (report["collectives"], report["bytes"]) == (4 * STEPS, STEPS * numel * 4)
    else:
        assert report["graphs"] == ["step", "sync"]
        assert report["calls"] == {"step": STEPS - STEPS // H, "sync": STEPS // H}
        assert (report["collectives"], report["bytes"]) == (STEPS // H, STEPS // H * numel * 4)


@pytest.mark.parametrize("parity", ["ddp"], indirect=True)
def test_ddp_buckets_start_during_the_backward_and_wait_before_the_update(parity):
    _, results = parity
    aten = results[0][1][1]["aten"]
    lines = {kind: [i for i, line in enumerate(aten) if f" = {kind}(" in line]
             for kind in ("aten.mm", "_c10d_functional.all_reduce", "_c10d_functional.wait_tensor")}
    matmuls, all_reduces, waits = lines.values()
    assert len(all_reduces) == len(waits) == 4
    # The last layer's bucket is sent before the backward's remaining matmuls run.
    assert all_reduces[0] < matmuls[-1]
    assert min(waits) > max(matmuls)


FRAGMENTS = [["net.0.weight", "net.0.bias"], ["net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"]]


def streaming_worker(rank, world, delay=0, local_weight=0.0, payload="full"):
    return (_eager_diloco(rank, world, fragments=FRAGMENTS, delay=delay, local_weight=local_weight, payload=payload),
            _compiled(rank, lc.Policy.diloco(H, fragments=2, delay=delay, local_weight=local_weight, payload=payload)))


# Bytes one sync of each fragment sends: fp32 pseudo-gradients, or int8 codes and fp32 row scales.
FRAGMENT_BYTES = {"full": (544 * 4, 1188 * 4), "int8": (544 + 33 * 4, 1188 + 38 * 4)}


def test_streaming_syncs_each_fragment_alone_at_its_offset():
    results = run_workers(streaming_worker, 2)
    for reference, (params, report) in results:
        assert_close(params, reference)
        # Fragment 0 (544 parameters) syncs after steps 1, 5, 9; fragment 1 (1,188) after 3, 7, 11.
        assert report["graphs"] == ["step", "sync.0", "sync.1"]
        assert report["calls"] == {"step": STEPS - 6, "sync.0": 3, "sync.1": 3}
        assert (report["collectives"], report["bytes"]) == (6, 3 * (544 + 1188) * 4)
    # Fragment 1 synced at the last step; fragment 0 has taken two local steps since.
    synced = [name for name in results[0][1][0] if not name.startswith("net.0.")]
    assert_close({n: results[1][1][0][n] for n in synced}, {n: results[0][1][0][n] for n in synced}, rtol=0, atol=0)


@pytest.mark.parametrize("payload", ["full", "int8"])
def test_overlapped_fragments_merge_their_average_delay_steps_later(payload):
    for reference, (params, report) in run_workers(streaming_worker, 2, args=(1, 0.5, payload)):
        assert_close(params, reference)
        # Fragment 0 is sent after steps 1, 5, 9 and merged after 2, 6, 10; fragment 1 sent
        # after 3, 7, 11 and merged after 4, 8 (its last collective is still in flight).
        assert report["graphs"] == ["merge.0", "merge.1", "step", "sync.0", "sync.1"]
        assert report["calls"] == {"step": 1, "sync.0": 3, "merge.0": 3, "sync.1": 3, "merge.1": 2}
        collectives = 6 if payload == "full" else 12  # int8: codes and scales
        assert (report["collectives"], report["bytes"]) == (collectives, 3 * sum(FRAGMENT_BYTES[payload]))


def test_an_int8_payload_in_the_sync_step_is_gathered_and_its_error_fed_back():
    for reference, (params, report) in run_workers(streaming_worker, 2, args=(0, 0.0, "int8")):
        assert_close(params, reference)
        # Per sync, two all-gathers: the codes' and the scales'.
        assert (report["collectives"], report["bytes"]) == (12, 3 * sum(FRAGMENT_BYTES["int8"]))


def test_overlapped_fragments_in_four_workers():
    # delay 2: fragment 0 merges after steps 3, 7, 11, where fragment 1 is sent.
    for reference, (params, report) in run_workers(streaming_worker, 4, args=(2, 0.0)):
        assert_close(params, reference)
        assert "merge.0+sync.1" in report["graphs"]


def resume_worker(rank, world, delay):
    """Stop between syncs (after step 6 of 12), save, rebuild everything, load, finish; with
    `delay` 3, the all-reduce of step 4's sync is in flight when the checkpoint is taken."""
    policy = lc.Policy.diloco(sync_every=H, delay=delay, local_weight=0.5 if delay else 0.0)
    model, opt, batches = _problem(rank)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")
    for k, (x, y) in enumerate(batches):
        step(x, y)
        if k == 5:
            saved = checkpoint_bytes(model, opt, step)
    uninterrupted = named_parameters(model)

    torch._dynamo.reset()
    model, opt, batches = _problem(rank)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")
    load_checkpoint_bytes(saved, model, opt, step)
    for x, y in batches[6:]:
        step(x, y)
    return uninterrupted, named_parameters(model), step.comm_report().calls


@pytest.mark.parametrize("delay", [0, 3])
def test_resuming_between_syncs_reproduces_the_run_bit_for_bit(delay):
    for uninterrupted, resumed, calls in run_workers(resume_worker, 2, args=(delay,)):
        assert_close(resumed, uninterrupted, rtol=0, atol=0)
        expected = {"step": 7, "sync": 3, "merge": 2} if delay else {"step": STEPS - STEPS // H, "sync": STEPS // H}
        assert calls == expected


def leaving_worker(rank, world):
    """Rank 1 leaves before the first sync; rank 0 must fail there, not wait forever."""
    model, opt, batches = _problem(rank)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy.local_sgd(sync_every=H),
                      compiler="eager")
    for k, (x, y) in enumerate(batches[: H - 1]):
        step(x, y)
    if rank == 1:
        return "left"
    started = time.monotonic()
    try:
        step(*batches[H - 1])
    except lc.CollectiveError as error:
        return str(error), time.monotonic() - started
    return "no error", time.monotonic() - started


def test_a_worker_leaving_during_a_sync_fails_the_others_within_the_timeout():
    timeout = 10.0
    results = run_workers(leaving_worker, 2, timeout=60, pg_timeout=datetime.timedelta(seconds=timeout))
    message, elapsed = results[0]
    assert "graph 'sync' at step 3 failed in one of its 1 collective(s)" in message
    assert "Restart every worker from the last checkpoint" in message
    assert elapsed < timeout + 10

"""Compressed gossip (DoCoM-SGT) against its recursion written out eagerly below.

The reference simulates every worker of the ring in one process: each worker's gradient
by torch.func at any parameters, the momentum, the tracker, the consensus steps and the
top-k messages, with the neighbourhood sums computed from every worker's copies directly
(the compiled step keeps them as running sums instead). The compiled step runs one
worker per gloo process; each process compares its own parameters with the reference.
"""

from __future__ import annotations

import functools

import expecttest
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call, grad

import lordo_compile as lc
from lordo_compile.launch import run_workers
from lordo_compile.models import MLP
from lordo_compile.testing import stage_diff, training_step

SIZES = (6, 8, 3)
STEPS = 6


def _model():
    torch.manual_seed(0)
    return MLP(SIZES)


def _batches(rank, steps=STEPS):
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(5, SIZES[0], generator=generator), torch.randn(5, SIZES[-1], generator=generator))
            for _ in range(steps)]


def _mixing(world):
    """Ring mixing matrix: self and the two neighbours 1/3 each (1/2 each with two workers)."""
    w = torch.zeros(world, world, dtype=torch.float64)
    for i in range(world):
        peers = {i, (i - 1) % world, (i + 1) % world}
        for j in peers:
            w[i, j] = 1.0 / len(peers)
    return w


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _gradient(model, flat, x, y):
    names = [n for n, _ in model.named_parameters()]
    pieces = torch.split(flat, [p.numel() for p in model.parameters()])
    params = {n: t.view(p.shape) for n, t, p in zip(names, pieces, model.parameters())}
    grads = grad(lambda ps: F.mse_loss(functional_call(model, ps, (x,)), y))(params)
    return torch.cat([grads[n].reshape(-1) for n in names])


def _top_k(d, k):
    q = torch.zeros_like(d)
    index = d.abs().topk(k).indices
    q[index] = d[index]
    return q


def docom_reference(world, steps, make_opt, *, ratio, gamma, beta):
    """DoCoM-SGT for `world` workers on a ring; returns every worker's final flat parameters."""
    models = [_model() for _ in range(world)]
    opts = [make_opt(m) for m in models]
    batches = [_batches(i, steps) for i in range(world)]
    w = _mixing(world).float()
    n = _flat(models[0]).numel()
    k = max(1, round(ratio * n))
    theta_hat = [_flat(m) for m in models]
    tracker_hat = [torch.zeros(n) for _ in range(world)]
    tracker = [torch.zeros(n) for _ in range(world)]
    momentum = [torch.zeros(n) for _ in range(world)]
    previous = [_flat(m) for m in models]
    for step in range(steps):
        new_tracker, new_momentum = [], []
        for i in range(world):
            x, y = batches[i][step]
            fresh = _gradient(models[i], _flat(models[i]), x, y)
            if step == 0:
                v = g = fresh
            else:
                v = fresh + (1 - beta) * (momentum[i] - _gradient(models[i], previous[i], x, y))
                mixing = sum(w[i, j] * (tracker_hat[j] - tracker_hat[i]) for j in range(world))
                g = tracker[i] + gamma * mixing + v - momentum[i]
            new_momentum.append(v)
            new_tracker.append(g)
        consensus = [gamma * sum(w[i, j] * (theta_hat[j] - theta_hat[i]) for j in range(world))
                     for i in range(world)]
        for i in range(world):
            previous[i] = _flat(models[i])
            for p, piece in zip(models[i].parameters(), torch.split(new_tracker[i], [p.numel() for p in models[i].parameters()])):
                p.grad = piece.view(p.shape).clone()
            opts[i].step()
            with torch.no_grad():
                for p, piece in zip(models[i].parameters(),
                                    torch.split(consensus[i], [p.numel() for p in models[i].parameters()])):
                    p.add_(piece.view(p.shape))
        for i in range(world):
            if step > 0:
                tracker_hat[i] = tracker_hat[i] + _top_k(new_tracker[i] - tracker_hat[i], k)
            theta_hat[i] = theta_hat[i] + _top_k(_flat(models[i]) - theta_hat[i], k)
        tracker, momentum = new_tracker, new_momentum
    return [_flat(m) for m in models]


def _compiled(policy, make_opt, compiler="aot_eager"):
    model = _model()
    opt = make_opt(model)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler=compiler)
    return model, opt, step


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
}
CASES = [("sgd", dict(ratio=0.25, gamma=0.5, beta=0.5)), ("adamw", dict(ratio=0.1, gamma=0.8, beta=1.0)),
         ("sgd", dict(ratio=1.0, gamma=0.5, beta=0.2, compressor="identity"))]


@pytest.mark.parametrize("optimizer, options", CASES)
def test_one_worker_follows_the_recursion(optimizer, options):
    model, _, step = _compiled(lc.Policy(gossip=lc.Gossip(**options), on_nonfinite=None), OPTIMIZERS[optimizer])
    for x, y in _batches(0):
        step(x, y)
    reference = docom_reference(1, STEPS, OPTIMIZERS[optimizer], **{k: v for k, v in options.items()
                                                                   if k != "compressor"})
    torch.testing.assert_close(_flat(model), reference[0], rtol=1e-5, atol=1e-6)
    assert [step.backend.schedule.name_at(i) for i in range(3)] == ["init", "step", "step"]
    assert step.comm_report().bytes_sent == 0


@pytest.mark.inductor
def test_inductor_lowers_the_recursion():
    options = dict(ratio=0.25, gamma=0.5, beta=0.5)
    model, _, step = _compiled(lc.Policy(gossip=lc.Gossip(**options), on_nonfinite=None), OPTIMIZERS["sgd"], compiler="inductor")
    for x, y in _batches(0):
        step(x, y)
    reference = docom_reference(1, STEPS, OPTIMIZERS["sgd"], **options)
    torch.testing.assert_close(_flat(model), reference[0], rtol=1e-5, atol=1e-6)


def test_one_worker_without_momentum_is_the_plain_optimizer():
    """beta = 1 and no neighbour: the tracker is the gradient and the consensus terms vanish."""
    model, _, step = _compiled(lc.Policy.docom(beta=1.0), OPTIMIZERS["adamw"])
    reference = _model()
    opt = OPTIMIZERS["adamw"](reference)
    for x, y in _batches(0):
        step(x, y)
        F.mse_loss(reference(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-5, atol=1e-6)


def test_state_dict_resumes_the_recursion():
    options = dict(ratio=0.25, gamma=0.5, beta=0.5)
    model, opt, step = _compiled(lc.Policy(gossip=lc.Gossip(**options), on_nonfinite=None), OPTIMIZERS["sgd"])
    batches = _batches(0)
    for x, y in batches[:3]:
        step(x, y)
    saved = (model.state_dict(), opt.state_dict(), step.state_dict())
    model2, opt2, step2 = _compiled(lc.Policy(gossip=lc.Gossip(**options), on_nonfinite=None), OPTIMIZERS["sgd"])
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    step2.load_state_dict(saved[2])
    for x, y in batches[3:]:
        step2(x, y)
    reference = docom_reference(1, STEPS, OPTIMIZERS["sgd"], **options)
    torch.testing.assert_close(_flat(model2), reference[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(topology="torus"), r"Gossip.topology must be one of \('ring',\), got 'torus'"),
    (dict(compressor="sign"), r"Gossip.compressor must be one of \('top_k', 'identity'\), got 'sign'"),
    (dict(ratio=0), r"Gossip.ratio must be a number in \(0, 1\], got 0"),
    (dict(ratio=1.5), r"Gossip.ratio must be a number in \(0, 1\], got 1.5"),
    (dict(gamma=0.0), r"Gossip.gamma must be a number in \(0, 1\], got 0.0"),
    (dict(beta=True), r"Gossip.beta must be a number in \(0, 1\], got True"),
    (dict(beta=-0.1), r"Gossip.beta must be a number in \(0, 1\], got -0.1"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.Gossip(**kwargs)


def test_policy_field_takes_only_gossip_options():
    with pytest.raises(ValueError, match=r"Policy.gossip must be a lordo_compile.Gossip"):
        lc.Policy(gossip=0.01)


@pytest.mark.parametrize("other, pair", [
    (dict(data_parallel=lc.DataParallel()), "data_parallel"),
    (dict(sync=lc.Sync(every=2)), "sync"),
    (dict(lordo=lc.LoRDO(rank=2)), "lordo"),
])
def test_compositions_it_cannot_make_are_refused(other, pair):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = lc.Policy(gossip=lc.Gossip(), **{"on_nonfinite": None, **other})
    with pytest.raises(ValueError, match=rf"'({pair}' and 'gossip'|gossip' and '{pair})', which cannot be combined"):
        lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")(
            *_batches(0)[0])


def test_a_forward_with_buffers_is_refused_for_the_second_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy.docom(beta=0.5),
                      compiler="eager")
    with pytest.raises(NotImplementedError, match=r"reads buffer .*running_mean.*Use Gossip\(beta=1\)"):
        step(*_batches(0)[0])


def _expected_bytes(k, steps, neighbours):
    """Per neighbour: the init step sends the parameter message, every later step both
    messages; a message is k int32 indices and k float32 values."""
    return neighbours * (2 * k * 4 + (steps - 1) * 2 * 2 * k * 4)


PARITY = dict(ratio=0.25, gamma=0.5, beta=0.5)
CONSENSUS = dict(ratio=0.3, gamma=0.4, beta=1.0)
CONSENSUS_STEPS = 60


def gossip_worker(rank, world):
    model, _, step = _compiled(lc.Policy(gossip=lc.Gossip(**PARITY), on_nonfinite=None), OPTIMIZERS["sgd"])
    for x, y in _batches(rank):
        step(x, y)
    reference = docom_reference(world, STEPS, OPTIMIZERS["sgd"], **PARITY)
    # Consensus alone: one step on each worker's own gradient, then a learning rate of 0.
    consensus_model, consensus_opt, consensus_step = _compiled(lc.Policy(gossip=lc.Gossip(**CONSENSUS), on_nonfinite=None),
                                                               OPTIMIZERS["sgd"], compiler="eager")
    spread, means = [], []
    for i, (x, y) in enumerate(_batches(rank, CONSENSUS_STEPS)):
        consensus_opt.param_groups[0]["lr"] = 0.05 if i == 0 else 0.0
        consensus_step(x, y)
        gathered = [torch.zeros_like(_flat(consensus_model)) for _ in range(world)]
        dist.all_gather(gathered, _flat(consensus_model))
        stacked = torch.stack(gathered)
        spread.append((stacked - stacked.mean(0)).norm().item())
        means.append(stacked.mean(0))
    return {"params": _flat(model), "reference": reference[rank], "bytes": step.comm_report().bytes_sent,
            "report": str(step.comm_report()), "spread": spread, "means": (means[0], means[-1]),
            "snapshot": stage_diff(consensus_step, "captured", "gossip") if rank == 0 else None}


@functools.cache
def _runs():
    return run_workers(gossip_worker, 4, timeout=600)


@pytest.mark.distributed
def test_four_workers_follow_the_recursion():
    for rank, result in enumerate(_runs()):
        torch.testing.assert_close(result["params"], result["reference"], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, rank=rank: f"rank {rank}: {m}")


@pytest.mark.distributed
def test_bytes_counted_are_the_neighbour_messages():
    n = sum(p.numel() for p in _model().parameters())
    k = round(PARITY["ratio"] * n)
    for result in _runs():
        assert result["bytes"] == _expected_bytes(k, STEPS, neighbours=2), result["report"]


@pytest.mark.distributed
def test_gossip_brings_the_workers_together_and_keeps_their_mean():
    result = _runs()[0]
    spread = result["spread"]
    assert spread[0] > 1e-3
    assert spread[-1] < 1e-3 * spread[0], spread[::10]
    torch.testing.assert_close(result["means"][1], result["means"][0], rtol=0, atol=1e-5)


@pytest.mark.distributed
class TestGossipGraph(expecttest.TestCase):
    def test_rank_0_of_four_exchanges_with_ranks_3_and_1(self):
        self.assertExpectedInline(_runs()[0]["snapshot"], """\
--- captured
+++ gossip
@@ -7,2 +7,8 @@
 group0_hyperparameters: f64[2]  hyperparameter
+gossip_param_hat: f32[83]  optimizer_state  [gossip.param_hat]  <gossip>
+gossip_param_mix: f32[83]  optimizer_state  [gossip.param_mix]  <gossip>
+gossip_tracker: f32[83]  optimizer_state  [gossip.tracker]  <gossip>
+gossip_tracker_hat: f32[83]  optimizer_state  [gossip.tracker_hat]  <gossip>
+gossip_tracker_mix: f32[83]  optimizer_state  [gossip.tracker_mix]  <gossip>
+gossip_momentum: f32[83]  optimizer_state  [gossip.momentum]  <gossip>
 input_1 = torch._C._nn.linear(x, net_0_weight, net_0_bias)  # f32[5, 8]  forward
@@ -19,10 +25,89 @@
 group0_weight_decay = group0_hyperparameters[1]  # f64[]  hyperparameter
-sgd_net_0_weight = lordo.sgd(net_0_weight, grad_net_0_weight, group0_lr, group0_weight_decay, maximize=False)  # f32[8, 6]  optimizer_update
-write_param_net_0_weight = net_0_weight.copy_(sgd_net_0_weight)  # f32[8, 6]  writeback  [param]
-sgd_net_0_bias = lordo.sgd(net_0_bias, grad_net_0_bias, group0_lr, group0_weight_decay, maximize=False)  # f32[8]  optimizer_update
-write_param_net_0_bias = net_0_bias.copy_(sgd_net_0_bias)  # f32[8]  writeback  [param]
-sgd_net_2_weight = lordo.sgd(net_2_weight, grad_net_2_weight, group0_lr, group0_weight_decay, maximize=False)  # f32[3, 8]  optimizer_update
-write_param_net_2_weight = net_2_weight.copy_(sgd_net_2_weight)  # f32[3, 8]  writeback  [param]
-sgd_net_2_bias = lordo.sgd(net_2_bias, grad_net_2_bias, group0_lr, group0_weight_decay, maximize=False)  # f32[3]  optimizer_update
-write_param_net_2_bias = net_2_bias.copy_(sgd_net_2_bias)  # f32[3]  writeback  [param]
+reshape = grad_net_0_weight.reshape(-1)  # f32[48]  <gossip>
+reshape_1 = grad_net_0_bias.reshape(-1)  # f32[8]  <gossip>
+reshape_2 = grad_net_2_weight.reshape(-1)  # f32[24]  <gossip>
+reshape_3 = grad_net_2_bias.reshape(-1)  # f32[3]  <gossip>
+flat_gradient = torch._VariableFunctionsClass.cat([reshape, reshape_1, reshape_2, reshape_3])  # f32[83]  gradient  <gossip>
+tracker_disagreement = aten.sub.Tensor(gossip_tracker_mix, gossip_tracker_hat)  # f32[83]  optimizer_update  <gossip>
+tracker_consensus = aten.mul.Tensor(tracker_disagreement, 0.4)  # f32[83]  optimizer_update  <gossip>
+add_tensor = aten.add.Tensor(gossip_tracker, tracker_consensus)  # f32[83]  optimizer_update  <gossip>
+momentum_change = aten.sub.Tensor(flat_gradient, gossip_momentum)  # f32[83]  optimizer_update  <gossip>
+new_tracker = aten.add.Tensor(add_tensor, momentum_change)  # f32[83]  optimizer_update  <gossip>
+param_disagreement = aten.sub.Tensor(gossip_param_mix, gossip_param_hat)  # f32[83]  optimizer_update  <gossip>
+param_consensus = aten.mul.Tensor(param_disagreement, 0.4)  # f32[83]  optimizer_update  <gossip>
+split = torch.functional.split(param_consensus, [48, 8, 24, 3])  # (f32[48], f32[8], f32[24], f32[3])  <gossip>
+getitem = split[0]  # f32[48]  <gossip>
+consensus_net_0_weight = getitem.view((8, 6))  # f32[8, 6]  optimizer_update  <gossip>
+getitem_1 = split[1]  # f32[8]  <gossip>
+consensus_net_0_bias = getitem_1.view((8,))  # f32[8]  optimizer_update  <gossip>
+getitem_2 = split[2]  # f32[24]  <gossip>
+consensus_net_2_weight = getitem_2.view((3, 8))  # f32[3, 8]  optimizer_update  <gossip>
+getitem_3 = split[3]  # f32[3]  <gossip>
+consensus_net_2_bias = getitem_3.view((3,))  # f32[3]  optimizer_update  <gossip>
+split_1 = torch.functional.split(new_tracker, [48, 8, 24, 3])  # (f32[48], f32[8], f32[24], f32[3])  <gossip>
+getitem_4 = split_1[0]  # f32[48]  <gossip>
+tracked_gradient_net_0_weight = getitem_4.view((8, 6))  # f32[8, 6]  gradient  <gossip>
+getitem_5 = split_1[1]  # f32[8]  <gossip>
+tracked_gradient_net_0_bias = getitem_5.view((8,))  # f32[8]  gradient  <gossip>
+getitem_6 = split_1[2]  # f32[24]  <gossip>
+tracked_gradient_net_2_weight = getitem_6.view((3, 8))  # f32[3, 8]  gradient  <gossip>
+getitem_7 = split_1[3]  # f32[3]  <gossip>
+tracked_gradient_net_2_bias = getitem_7.view((3,))  # f32[3]  gradient  <gossip>
+sgd_net_0_weight = lordo.sgd(net_0_weight, tracked_gradient_net_0_weight, group0_lr, group0_weight_decay, maximize=False)  # f32[8, 6]  optimizer_update
+mixed_net_0_weight = aten.add.Tensor(sgd_net_0_weight, consensus_net_0_weight)  # f32[8, 6]  optimizer_update  <gossip>
+write_param_net_0_weight = net_0_weight.copy_(mixed_net_0_weight)  # f32[8, 6]  writeback  [param]
+sgd_net_0_bias = lordo.sgd(net_0_bias, tracked_gradient_net_0_bias, group0_lr, group0_weight_decay, maximize=False)  # f32[8]  optimizer_update
+mixed_net_0_bias = aten.add.Tensor(sgd_net_0_bias, consensus_net_0_bias)  # f32[8]  optimizer_update  <gossip>
+write_param_net_0_bias = net_0_bias.copy_(mixed_net_0_bias)  # f32[8]  writeback  [param]
+sgd_net_2_weight = lordo.sgd(net_2_weight, tracked_gradient_net_2_weight, group0_lr, group0_weight_decay, maximize=False)  # f32[3, 8]  optimizer_update
+mixed_net_2_weight = aten.add.Tensor(sgd_net_2_weight, consensus_net_2_weight)  # f32[3, 8]  optimizer_update  <gossip>
+write_param_net_2_weight = net_2_weight.copy_(mixed_net_2_weight)  # f32[3, 8]  writeback  [param]
+sgd_net_2_bias = lordo.sgd(net_2_bias, tracked_gradient_net_2_bias, group0_lr, group0_weight_decay, maximize=False)  # f32[3]  optimizer_update
+mixed_net_2_bias = aten.add.Tensor(sgd_net_2_bias, consensus_net_2_bias)  # f32[3]  optimizer_update  <gossip>
+write_param_net_2_bias = net_2_bias.copy_(mixed_net_2_bias)  # f32[3]  writeback  [param]
+write_tracker = gossip_tracker.copy_(new_tracker)  # f32[83]  writeback  [gossip.tracker]  <gossip>
+write_momentum = gossip_momentum.copy_(flat_gradient)  # f32[83]  writeback  [gossip.momentum]  <gossip>
+reshape_4 = mixed_net_0_weight.reshape(-1)  # f32[48]  <gossip>
+reshape_5 = mixed_net_0_bias.reshape(-1)  # f32[8]  <gossip>
+reshape_6 = mixed_net_2_weight.reshape(-1)  # f32[24]  <gossip>
+reshape_7 = mixed_net_2_bias.reshape(-1)  # f32[3]  <gossip>
+flat_new_param = torch._VariableFunctionsClass.cat([reshape_4, reshape_5, reshape_6, reshape_7])  # f32[83]  optimizer_update  <gossip>
+tracker_change = aten.sub.Tensor(new_tracker, gossip_tracker_hat)  # f32[83]  optimizer_update  <gossip>
+tracker_message = lordo.top_k_message(tracker_change, k=25)  # (i32[25], f32[25])  optimizer_update  <gossip>
+tracker_indices = tracker_message[0]  # i32[25]  optimizer_update  <gossip>
+tracker_values = tracker_message[1]  # f32[25]  optimizer_update  <gossip>
+tracker_value_bits = tracker_values.view(torch.int32)  # i32[25]  optimizer_update  <gossip>
+param_change = aten.sub.Tensor(flat_new_param, gossip_param_hat)  # f32[83]  optimizer_update  <gossip>
+param_message = lordo.top_k_message(param_change, k=25)  # (i32[25], f32[25])  optimizer_update  <gossip>
+param_indices = param_message[0]  # i32[25]  optimizer_update  <gossip>
+param_values = param_message[1]  # f32[25]  optimizer_update  <gossip>
+param_value_bits = param_values.view(torch.int32)  # i32[25]  optimizer_update  <gossip>
+packed_messages = torch._VariableFunctionsClass.cat([tracker_indices, tracker_value_bits, param_indices, param_value_bits])  # i32[100]  optimizer_update  <gossip>
+received_messages = lordo.neighbour_exchange(packed_messages, '0', [1, 3], [1, 3])  # i32[2, 100]  collective  <gossip>
+tracker_own_indices = tracker_indices.unsqueeze(0)  # i32[1, 25]  optimizer_update  <gossip>
+tracker_own_values = tracker_values.unsqueeze(0)  # f32[1, 25]  optimizer_update  <gossip>
+tracker_own_message = lordo.message_sum(tracker_own_indices, tracker_own_values, [1.0], size=83)  # f32[83]  optimizer_update  <gossip>
+received_tracker_indices = received_messages[(slice(None, None, None), slice(0, 25, None))]  # i32[2, 25]  optimizer_update  <gossip>
+tracker_indices_by_worker = torch._VariableFunctionsClass.cat([tracker_own_indices, received_tracker_indices])  # i32[3, 25]  optimizer_update  <gossip>
+getitem_13 = received_messages[(slice(None, None, None), slice(25, 50, None))]  # i32[2, 25]  optimizer_update  <gossip>
+received_tracker_values = getitem_13.view(torch.float32)  # f32[2, 25]  optimizer_update  <gossip>
+tracker_values_by_worker = torch._VariableFunctionsClass.cat([tracker_own_values, received_tracker_values])  # f32[3, 25]  optimizer_update  <gossip>
+tracker_mixed_messages = lordo.message_sum(tracker_indices_by_worker, tracker_values_by_worker, [0.3333333333333333, 0.3333333333333333, 0.3333333333333333], size=83)  # f32[83]  optimizer_update  <gossip>
+new_tracker_hat = aten.add.Tensor(gossip_tracker_hat, tracker_own_message)  # f32[83]  optimizer_update  <gossip>
+write_tracker_hat = gossip_tracker_hat.copy_(new_tracker_hat)  # f32[83]  writeback  [gossip.tracker_hat]  <gossip>
+new_tracker_mix = aten.add.Tensor(gossip_tracker_mix, tracker_mixed_messages)  # f32[83]  optimizer_update  <gossip>
+write_tracker_mix = gossip_tracker_mix.copy_(new_tracker_mix)  # f32[83]  writeback  [gossip.tracker_mix]  <gossip>
+param_own_indices = param_indices.unsqueeze(0)  # i32[1, 25]  optimizer_update  <gossip>
+param_own_values = param_values.unsqueeze(0)  # f32[1, 25]  optimizer_update  <gossip>
+param_own_message = lordo.message_sum(param_own_indices, param_own_values, [1.0], size=83)  # f32[83]  optimizer_update  <gossip>
+received_param_indices = received_messages[(slice(None, None, None), slice(50, 75, None))]  # i32[2, 25]  optimizer_update  <gossip>
+param_indices_by_worker = torch._VariableFunctionsClass.cat([param_own_indices, received_param_indices])  # i32[3, 25]  optimizer_update  <gossip>
+getitem_15 = received_messages[(slice(None, None, None), slice(75, 100, None))]  # i32[2, 25]  optimizer_update  <gossip>
+received_param_values = getitem_15.view(torch.float32)  # f32[2, 25]  optimizer_update  <gossip>
+param_values_by_worker = torch._VariableFunctionsClass.cat([param_own_values, received_param_values])  # f32[3, 25]  optimizer_update  <gossip>
+param_mixed_messages = lordo.message_sum(param_indices_by_worker, param_values_by_worker, [0.3333333333333333, 0.3333333333333333, 0.3333333333333333], size=83)  # f32[83]  optimizer_update  <gossip>
+new_param_hat = aten.add.Tensor(gossip_param_hat, param_own_message)  # f32[83]  optimizer_update  <gossip>
+write_param_hat = gossip_param_hat.copy_(new_param_hat)  # f32[83]  writeback  [gossip.param_hat]  <gossip>
+new_param_mix = aten.add.Tensor(gossip_param_mix, param_mixed_messages)  # f32[83]  optimizer_update  <gossip>
+write_param_mix = gossip_param_mix.copy_(new_param_mix)  # f32[83]  writeback  [gossip.param_mix]  <gossip>
 _set_grad_enabled_3 = torch._C._set_grad_enabled(True)  # other
""")

"""Bad input, in one place: each case is a clear exception that names the thing and a fix,
and leaves the model and optimizer as they were."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import assert_close, named_parameters
from lordo_compile.testing import training_step


def _problem(make_opt=lambda params: torch.optim.AdamW(params, lr=1e-2)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, make_opt(model.parameters())


def _refused(policy_or_step, error, message, make_opt=None):
    """Compile and call once; the exception must match, and nothing may have changed."""
    model, opt = _problem(make_opt) if make_opt else _problem()
    before = [p.detach().clone() for p in model.parameters()]
    step = policy_or_step(model, opt) if callable(policy_or_step) else \
        training_step(lambda x, y: F.mse_loss(model(x), y), opt)
    with pytest.raises(error, match=message):
        compiled = lc.compile(step, policy_or_step if isinstance(policy_or_step, lc.Policy) else lc.Policy(),
                              compiler="aot_eager")
        compiled(torch.randn(8, 16), torch.randn(8, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(opt.state[p] and any(torch.is_tensor(v) and v.abs().sum() > 0 for k, v in opt.state[p].items()
                                        if k != "step") for p in model.parameters())


@pytest.mark.parametrize("make, message", [
    (lambda: lc.LowRank(rank=0), r"LowRank.rank must be an int >= 1, got 0"),
    (lambda: lc.LowRank(rank=4.0), r"LowRank.rank must be an int >= 1, got 4.0"),
    (lambda: lc.LoRDO(rank=-2), r"LoRDO.rank must be an int >= 1"),
    (lambda: lc.LoRDO(rank=4, sync_every=0), r"LoRDO.sync_every must be an int >= 2"),
    (lambda: lc.Sync(every=0), r"every"),
    (lambda: lc.DataParallel(bucket_cap_mb=0), r"DataParallel.bucket_cap_mb must be a number of MiB > 0 or None, got 0"),
    (lambda: lc.FakeQuant(bits=5), r"FakeQuant.bits must be one of \(2, 3, 4, 8\)"),
    (lambda: lc.FakeQuant(quantizer="nf4"), r"FakeQuant.quantizer must be one of"),
    (lambda: lc.ECO(format="fp4"), r"ECO.format must be one of"),
    (lambda: lc.Policy(low_rank="galore"), r"Policy.low_rank must be a lordo_compile.LowRank"),
    (lambda: lc.Policy(on_nonfinite="ignore"), r"Policy.on_nonfinite must be"),
    (lambda: lc.Policy.cage(bits=4), r"Policy.cage needs total_steps"),
])
def test_bad_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("policy, message", [
    (lc.Policy.galore(rank=16), r"rank=16 is >= the smaller side of every matrix"),
    (lc.Policy.lordo(rank=16), r"LoRDO selected no matrix for a low-rank update.*smaller side 16 <= rank 16"),
    (lc.Policy.low_rank_ddp(rank=16), r"low-rank DDP selected no AdamW matrix"),
    (lc.Policy(low_rank=lc.LowRank(rank=4), lordo=lc.LoRDO(rank=4)),
     r"'lordo' and 'low_rank', which cannot be combined \(LoRDO is GaLore with one global projection"),
    (lc.Policy(data_parallel=lc.DataParallel(), sync=lc.Sync(every=4)),
     r"'data_parallel' and 'sync', which cannot be combined \(each decides how workers combine"),
    (lc.Policy(extra_passes=("no_such_pass",)), r"Policy.extra_passes names 'no_such_pass'"),
])
def test_policies_that_cannot_apply(policy, message):
    _refused(policy, ValueError, message)


@pytest.mark.parametrize("make_opt, error, message", [
    (lambda p: torch.optim.LBFGS(p), NotImplementedError, r"cannot capture the optimizer torch.optim.lbfgs.LBFGS"),
    (lambda p: torch.optim.Adam(p, amsgrad=True), NotImplementedError, r"amsgrad"),
    (lambda p: torch.optim.SGD(p, lr=0.1, differentiable=True), NotImplementedError, r"differentiable"),
])
def test_unsupported_optimizers(make_opt, error, message):
    _refused(lc.Policy(), error, message, make_opt=make_opt)


def test_graph_break_names_the_line():
    def step_with_print(model, opt):
        def train_step(x, y):
            loss = F.mse_loss(model(x), y)
            print("loss", loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss
        return train_step

    _refused(step_with_print, lc.CaptureError, r"test_bad_input.py")


def test_step_that_returns_no_loss():
    def silent(model, opt):
        def train_step(x, y):
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return train_step

    _refused(silent, ValueError, r"the training step returns no loss; return it")


def test_a_new_batch_shape_recompiles_and_stays_exact():
    model, opt = _problem(lambda p: torch.optim.SGD(p, lr=0.1))
    reference, reference_opt = _problem(lambda p: torch.optim.SGD(p, lr=0.1))
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy(), compiler="aot_eager")
    for batch in (8, 5, 8, 3):
        x, y = torch.randn(batch, 16), torch.randn(batch, 4)
        step(x, y)
        F.mse_loss(reference(x), y).backward()
        reference_opt.step()
        reference_opt.zero_grad()
    assert_close(named_parameters(model), named_parameters(reference), rtol=1e-6, atol=1e-7)


def test_loading_state_of_another_shape_raises_and_changes_nothing():
    model, opt = _problem()
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy.galore(rank=2),
                      compiler="aot_eager")
    step(torch.randn(8, 16), torch.randn(8, 4))
    saved = step.state_dict()
    name = next(n for n, t in saved["runtime"]["tensors"].items() if t.dim() == 2 and t.shape[0] > 1)
    before = {n: t.clone() for n, t in saved["runtime"]["tensors"].items()}
    shape = tuple(saved["runtime"]["tensors"][name].shape)
    # One row: copy_ would broadcast it over the whole tensor.
    bad = {**saved, "runtime": {**saved["runtime"], "tensors": {
        **saved["runtime"]["tensors"], name: torch.ones(1, shape[1])}}}
    with pytest.raises(ValueError, match=rf"'{name}': saved \(1, {shape[1]}\) torch.float32, this step holds "
                                         rf"\({shape[0]}, {shape[1]}\)"):
        step.load_state_dict(bad)
    after = step.state_dict()["runtime"]["tensors"]
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("policy", [lc.Policy.ddp(), lc.Policy.local_sgd(sync_every=2), lc.Policy.lordo(rank=2)],
                         ids=["ddp", "local_sgd", "lordo"])
def test_a_policy_that_combines_workers_without_a_process_group(policy, monkeypatch):
    model, opt = _problem()
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="aot_eager")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.warns(UserWarning, match=r"combine workers, but no process group is initialized: the step runs as "
                                         r"one worker"):
        step(torch.randn(8, 16), torch.randn(8, 4))
    model, opt = _problem()
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="aot_eager")
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2, but no process group is initialized"):
        step(torch.randn(8, 16), torch.randn(8, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_eco_with_galore_torch_numerics_is_refused():
    policy = lc.Policy(low_rank=lc.LowRank(rank=2, numerics="galore_torch"), eco=lc.ECO(format="int8"))
    _refused(policy, NotImplementedError, r"ECO feeds 0.weight's rounding error into GaLore's projected moments "
                                          r"through torch's Adam arithmetic, not numerics='galore_torch'")

"""The sync and data-parallel passes in one process: sign, schedule, options, refusals."""

import difflib
import tempfile

import expecttest
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lordo_compile as lc
from common import int8_sent
from lordo_compile.models import MLP
from lordo_compile.testing import capture, stage_diff, training_step


def _mlp():
    torch.manual_seed(0)
    return MLP((8, 16, 2))


def _batches(n):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=generator), torch.randn(4, 2, generator=generator)) for _ in range(n)]


def test_pseudo_gradient_points_along_descent():
    """One worker, outer lr 2: the sync step moves the anchor twice as far as the local step did.

    With delta = anchor - local and anchor <- anchor - 2 delta, the result is
    anchor + 2 (local - anchor); the opposite sign would land at anchor - 2 (local - anchor).
    """
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy(sync=lc.Sync(every=1, outer_lr=2.0)), compiler="eager")
    anchor = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(1)[0]
    reference = _mlp()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    F.mse_loss(reference(x), y).backward()
    ref_opt.step()
    local = [p.detach().clone() for p in reference.parameters()]
    step(x, y)
    for a, l, p in zip(anchor, local, model.parameters()):
        torch.testing.assert_close(p, a + 2 * (l - a), rtol=1e-6, atol=1e-7)
    assert step.backend.schedule.name_at(0) == "sync"


def test_schedule_syncs_after_every_h_steps():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy.local_sgd(sync_every=3),
                      compiler="eager")
    for x, y in _batches(7):
        step(x, y)
    assert [step.backend.schedule.name_at(k) for k in range(7)] == ["step", "step", "sync"] * 2 + ["step"]
    assert step.comm_report().calls == {"step": 5, "sync": 2}
    assert step.comm_report().bytes_sent == 0  # one worker: no collective
    assert "one worker: nothing sent" in step.explain()


def test_local_sgd_with_outer_lr_one_and_one_worker_is_the_inner_optimizer():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), lc.Policy.local_sgd(sync_every=2),
                      compiler="aot_eager")
    reference = _mlp()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for x, y in _batches(6):
        step(x, y)
        F.mse_loss(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(every=0), r"Sync.every \(sync_every\) must be an int >= 1, got 0"),
        (dict(every=2.0), r"must be an int >= 1, got 2.0"),
        (dict(every=2, outer_lr=0), r"Sync.outer_lr must be > 0"),
        (dict(every=2, outer_momentum=1.0), r"outer_momentum must be in \[0, 1\)"),
        (dict(every=2, nesterov=True), r"nesterov=True needs outer_momentum > 0"),
        (dict(every=2, fragments=3), r"Sync.fragments must be an int in \[1, every=2\]"),
        (dict(every=2, fragments=0), r"Sync.fragments must be an int in \[1, every=2\]"),
        (dict(every=2, delay=2), r"Sync.delay must be an int in \[0, every - 1 = 1\]"),
        (dict(every=2, delay=-1), r"Sync.delay must be an int in \[0, every - 1 = 1\]"),
        (dict(every=2, delay=1, local_weight=1.0), r"Sync.local_weight must be in \[0, 1\)"),
        (dict(every=2, payload="int4"), r"Sync.payload must be one of \('full', 'int8'\), got 'int4'"),
    ],
)
def test_bad_sync_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.Sync(**kwargs)


@pytest.mark.parametrize(
    "policy, pair",
    [
        (lc.Policy(sync=lc.Sync(every=2), data_parallel=lc.DataParallel()), "'data_parallel' and 'sync'|'sync' and 'data_parallel'"),
        (lc.Policy(sync=lc.Sync(every=2), lordo=lc.LoRDO(rank=2)), "'lordo' and 'sync'|'sync' and 'lordo'"),
    ],
)
def test_passes_that_cannot_compose_are_named(policy, pair):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=rf"({pair}), which cannot be combined"):
        lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy)


@pytest.fixture
def one_worker_group():
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sum_all_reduce_cannot_be_replaced(one_worker_group):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
        return loss

    step = lc.compile(train_step, lc.Policy.local_sgd(sync_every=2), compiler="eager")
    with pytest.raises(NotImplementedError, match=r"test_sync_pass.py:\d+.*is not a mean \(reduce op 'sum'"):
        step(*_batches(1)[0])


def test_the_steps_own_mean_all_reduce_is_removed_from_local_steps(one_worker_group):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        opt.step()
        opt.zero_grad()
        return loss

    step = capture(train_step, *_batches(1)[0], policy=lc.Policy.local_sgd(sync_every=2))
    diff = stage_diff(step, "captured", "sync", events="step")
    assert diff.count("-tensor") + diff.count("-wait_tensor") >= 4 and "_c10d_functional.all_reduce" in diff
    assert "all_reduce" not in step.graphs["step"]["sync"].text


def test_local_weight_is_refused_where_weights_are_rounded():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    policy = lc.Policy(sync=lc.Sync(every=2, delay=1, local_weight=0.5), eco=lc.ECO(format="int8"))
    with pytest.raises(NotImplementedError, match=r"Sync.local_weight=0.5 with parameter 'net.0.weight' held in a "
                                                  r"rounded form \(ECO\).*Use local_weight=0"):
        lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy)(*_batches(1)[0])


def test_one_worker_merges_what_its_int8_payload_says():
    """H = 2, tau = 1, local SGD: the merge after step 2 sets W to W0 - int8(W0 - W1), whatever
    step 2 did locally (W1: after steps 0 and 1)."""
    model = _mlp()
    initial = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy.local_sgd(sync_every=2, delay=1, payload="int8"), compiler="eager")
    reference = _mlp()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    batches = _batches(3)
    for x, y in batches[:2]:
        F.mse_loss(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for x, y in batches:
        step(x, y)
    for w0, w1, w in zip(initial, reference.parameters(), model.parameters()):
        torch.testing.assert_close(w, w0 - int8_sent(w0 - w1.detach()), rtol=1e-6, atol=1e-7)
    assert step.comm_report().calls == {"step": 1, "sync": 1, "merge": 1}


class TestOverlappedSyncGraphs(expecttest.TestCase):
    """One process: nothing is sent (with several, the payload is divided by their number and
    tagged `sent`, its average `received`), but the graphs are every worker's."""

    def setUp(self):
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        self.addCleanup(dist.destroy_process_group)
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2, bias=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)
        self.step = capture(train_step, torch.randn(4, 3), torch.randn(4, 2),
                            policy=lc.Policy.local_sgd(sync_every=4, delay=2, local_weight=0.25))

    def test_the_sync_step_writes_the_payload_the_runtime_sends(self):
        self.assertExpectedInline(stage_diff(self.step, "captured", "sync", events="sync"), """\
--- captured
+++ sync
@@ -4,2 +4,4 @@
 group0_hyperparameters: f64[2]  hyperparameter
+sync_anchor_weight: f32[2, 3]  optimizer_state  [sync.anchor.weight]  <sync>
+sync_payload_0: f32[6]  optimizer_state  [sync.payload.0]  <sync>
 linear = torch._C._nn.linear(x, weight, None)  # f32[4, 2]  forward
@@ -13,2 +15,7 @@
 write_param_weight = weight.copy_(sgd_weight)  # f32[2, 3]  writeback  [param]
+pseudo_gradient_weight = aten.sub.Tensor(sync_anchor_weight, sgd_weight)  # f32[2, 3]  gradient  <sync>
+reshape = pseudo_gradient_weight.reshape(-1)  # f32[6]  <sync>
+cat = torch._VariableFunctionsClass.cat([reshape])  # f32[6]  <sync>
+payload_0 = aten.div.Tensor(cat, 1.0)  # f32[6]  optimizer_update  <sync>
+write_sync_payload_0 = sync_payload_0.copy_(payload_0)  # f32[6]  writeback  [sync.payload.0]  <sync>
 _set_grad_enabled_3 = torch._C._set_grad_enabled(True)  # other
""")

    def test_the_merge_reads_the_average_and_mixes_in_the_local_weights(self):
        # The merge graph against the sync graph, both after the sync pass.
        sent, merged = (self.step.graphs[events]["sync"].text.splitlines() for events in ("sync", "merge"))
        self.assertExpectedInline("\n".join(difflib.unified_diff(sent, merged, "sync", "merge", n=0, lineterm="")),
                                  """\
--- sync
+++ merge
@@ -1 +1 @@
-# graph "sync" after sync
+# graph "merge" after sync
@@ -17,5 +17,7 @@
-pseudo_gradient_weight = aten.sub.Tensor(sync_anchor_weight, sgd_weight)  # f32[2, 3]  gradient  <sync>
-reshape = pseudo_gradient_weight.reshape(-1)  # f32[6]  <sync>
-cat = torch._VariableFunctionsClass.cat([reshape])  # f32[6]  <sync>
-payload_0 = aten.div.Tensor(cat, 1.0)  # f32[6]  optimizer_update  <sync>
-write_sync_payload_0 = sync_payload_0.copy_(payload_0)  # f32[6]  writeback  [sync.payload.0]  <sync>
+split = torch.functional.split(sync_payload_0, [6])  # (f32[6])  <sync>
+getitem = split[0]  # f32[6]  <sync>
+received_weight = getitem.view((2, 3))  # f32[2, 3]  optimizer_update  <sync>
+outer_sgd_weight = lordo.outer_sgd(sync_anchor_weight, received_weight, lr=1.0)  # f32[2, 3]  optimizer_update  <sync>
+write_anchor_weight = sync_anchor_weight.copy_(outer_sgd_weight)  # f32[2, 3]  writeback  [anchor]  <sync>
+merged_with_local_weight = torch._VariableFunctionsClass.lerp(outer_sgd_weight, sgd_weight, 0.25)  # f32[2, 3]  optimizer_update  <sync>
+assign_weight = weight.copy_(merged_with_local_weight)  # f32[2, 3]  writeback  [param]  <sync>""")

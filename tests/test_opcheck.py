"""torch.library.opcheck over every op in the lordo namespace, on inputs recorded from real steps.

The ops are enumerated from the dispatcher, so an op added later is checked too, and fails
here until one of POLICIES calls it. Its inputs are those the op received in a step of one
of POLICIES: the graph is run with its lordo ops kept (not lowered to their math), and the
first call of each op is recorded.
"""

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

import lordo_compile as lc
import lordo_compile.api as api

ADAMW = lambda m: [torch.optim.AdamW(m.parameters(), lr=1e-2)]  # noqa: E731
SGD_MOMENTUM = lambda m: [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)]  # noqa: E731


def _plain_optimizers(m):
    """Every plain update in one step: SGD with and without momentum and dampening, and Adam."""
    return [torch.optim.SGD([{"params": [m[0].weight]}, {"params": [m[0].bias], "momentum": 0.9},
                             {"params": [m[2].weight], "momentum": 0.9, "dampening": 0.1}], lr=0.1),
            torch.optim.Adam([m[2].bias], lr=1e-2)]


GALORE = lc.LowRank(rank=4, update_proj_gap=2)
COUPLED_CAGE = lc.FakeQuant(bits=4, correction=lc.CAGE(total_steps=4, silence_ratio=0.0, form="coupled"))
POLICIES = {
    "plain": (lc.Policy(), _plain_optimizers),
    "four-way": (lc.Policy(lordo=lc.LoRDO(rank=4, sync_every=2), eco=lc.ECO(format="fp8_e4m3"),
                           fake_quant=lc.FakeQuant(bits=4, correction=lc.CAGE(total_steps=4, silence_ratio=0.0)),
                           ema_nesterov=lc.EMANesterov(beta=0.5, warmup_steps=1)), ADAMW),
    "lordo variants, coupled cage": (lc.Policy(
        lordo=lc.LoRDO(rank=4, sync_every=2, full_rank_normalizer="full", on_refresh="ldadam"),
        fake_quant=COUPLED_CAGE), ADAMW),
    "eco+galore, sgd": (lc.Policy(eco=lc.ECO(format="int8"), low_rank=GALORE), SGD_MOMENTUM),
    "eco+galore": (lc.Policy(eco=lc.ECO(format="int8"), low_rank=GALORE), ADAMW),
    "eco+diloco": (lc.Policy(eco=lc.ECO(format="int8"), sync=lc.Sync(every=2, outer_lr=0.7, outer_momentum=0.9)),
                   ADAMW),
    "eco master, sgd, coupled cage": (lc.Policy(
        eco=lc.ECO(format="int8", mode="master"), fake_quant=COUPLED_CAGE), SGD_MOMENTUM),
    "eco, sgd": (lc.Policy(eco=lc.ECO(format="int8")), SGD_MOMENTUM),
    "rotation+galore, adam": (lc.Policy(low_rank=GALORE, fake_quant=lc.FakeQuant(
        bits=4, activation_bits=4, adaptive_rotation=lc.AdaptiveRotation(every=3))),
        lambda m: [torch.optim.Adam(m.parameters(), lr=1e-2)]),
    "low-rank ddp, coupled cage": (dataclasses.replace(lc.Policy.low_rank_ddp(rank=4, update_proj_gap=2),
                                                       fake_quant=COUPLED_CAGE), ADAMW),
    "docom": (lc.Policy.docom(), ADAMW),
    "4-bit moments, galore": (lc.Policy(low_rank=GALORE, quantized_state=lc.QuantizedState(
        bits=4, block_size=4, min_size=0)), ADAMW),
}

# A point-to-point exchange between workers: with one process there is nobody to send to.
NEEDS_WORKERS = {"neighbour_exchange": "sends to and receives from other ranks of a process group"}
FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}
# Ops that only the lowering for Inductor inserts (no step lowered to its math calls them), with
# inputs like those it gives them; tests/test_lowering.py runs them through Inductor.
LOWERING_SAMPLES = {"computed_once": ((torch.tensor(0.19, dtype=torch.float64),), {})}


def _lordo_ops():
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("lordo::"))


def _recording_lower(recorded):
    def lower(train_graph):
        module = train_graph.copy().module
        for node in module.graph.nodes:
            op = node.target
            if node.op == "call_function" and isinstance(op, torch._ops.OpOverload) and op.namespace == "lordo":
                def call(*args, op=op, **kwargs):
                    if op._opname not in recorded:
                        # As the step calls it: update ops under no_grad, forward ops with grad.
                        keep = torch.is_grad_enabled()
                        recorded[op._opname] = tree_map_only(
                            torch.Tensor, lambda t: t.detach().clone().requires_grad_(keep and t.requires_grad),
                            (args, kwargs))
                    return op(*args, **kwargs)

                call.__name__ = op._opname
                node.target = call
        module.recompile()
        return module

    return lower


@pytest.fixture(scope="module")
def samples():
    recorded = {}
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 16, generator=generator), torch.randn(4, 8, generator=generator)) for _ in range(4)]
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(api, "lower", _recording_lower(recorded))
        warnings.simplefilter("ignore")  # the communicating policies run as one worker, and say so
        for policy, make_optimizers in POLICIES.values():
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
            optimizers = make_optimizers(model)

            def train_step(x, y):
                loss = F.mse_loss(model(x), y)
                loss.backward()
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad()
                return loss

            step = lc.compile(train_step, policy, compiler="eager", optimizers=optimizers)
            for x, y in batches:
                step(x, y)
    return recorded


@pytest.mark.parametrize("name", _lordo_ops())
def test_opcheck(samples, name):
    if name in NEEDS_WORKERS:
        pytest.skip(f"lordo.{name} {NEEDS_WORKERS[name]}")
    if name in LOWERING_SAMPLES:
        args, kwargs = LOWERING_SAMPLES[name]
    else:
        assert name in samples, f"no policy in POLICIES calls lordo.{name}: add one that does"
        args, kwargs = samples[name]
    test_utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if any(isinstance(t, torch.Tensor) and t.dtype in FLOAT8 for t in tree_leaves((args, kwargs))):
        # test_schema compares each input before and after with a multiplication that CPU
        # torch does not implement for float8 ("mul_cpu_reduced_float"): a limit of the check.
        test_utils.remove("test_schema")
    torch.library.opcheck(getattr(torch.ops.lordo, name).default, args, kwargs, test_utils=test_utils)

"""Identity policy vs eager in 2 gloo processes, with the gradient all-reduce in the user's step.

Every rank builds the same model (seed 0), trains on its own data (seeded by rank) and
averages gradients explicitly in the step, first eagerly, then compiled. Compiled must
match eager on each rank, and, gradients being averaged, the ranks must end bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F

import lordo_compile as lc
from common import ADAM_ATOL, SMALL_GPT, assert_close, named_parameters
from lordo_compile.launch import run_workers
from lordo_compile.graph import ROLE, Role
from lordo_compile.models import MLP, TinyGPT

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
STEPS = 20

ALL_REDUCE_TARGETS = (torch.ops._c10d_functional.all_reduce, torch.ops._c10d_functional.all_reduce.default)


def _mlp_problem(rank: int, device: torch.device):
    torch.manual_seed(0)
    model = MLP((16, 32, 32, 4)).to(device)
    generator = torch.Generator().manual_seed(1000 + rank)
    batches = [(torch.randn(8, 16, generator=generator).to(device), torch.randn(8, 4, generator=generator).to(device))
               for _ in range(STEPS)]

    def loss_fn(x, y):
        return F.mse_loss(model(x), y)

    return model, loss_fn, batches


def _gpt_problem(rank: int, device: torch.device):
    torch.manual_seed(0)
    model = TinyGPT(SMALL_GPT).to(device)
    generator = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for _ in range(STEPS):
        idx = torch.randint(0, SMALL_GPT.vocab_size, (4, SMALL_GPT.block_size + 1), generator=generator).to(device)
        batches.append((idx[:, :-1], idx[:, 1:]))
    return model, model.loss, batches


PROBLEMS = {"mlp": _mlp_problem, "gpt": _gpt_problem}
OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "sgd_nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
}
# case -> (problem, optimizer, how the step averages gradients)
CASES = {
    "mlp-adamw-dist.all_reduce": ("mlp", "adamw", "all_reduce"),
    "mlp-sgd_nesterov-functional": ("mlp", "sgd_nesterov", "functional"),
    "gpt-adam-dist.all_reduce": ("gpt", "adam", "all_reduce"),
}


def _train(rank: int, world_size: int, problem: str, optimizer: str, sync: str, compiler: str | None,
           device: torch.device):
    model, loss_fn, batches = PROBLEMS[problem](rank, device)
    opt = OPTIMIZERS[optimizer](model)

    if sync == "all_reduce":

        def train_step(x, y):
            loss = loss_fn(x, y)
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
            opt.step()
            opt.zero_grad()
            return loss

    else:

        def train_step(x, y):
            loss = loss_fn(x, y)
            loss.backward()
            for p in model.parameters():
                p.grad.copy_(fc.all_reduce(p.grad, "avg", dist.group.WORLD))
            opt.step()
            opt.zero_grad()
            return loss

    step = train_step if compiler is None else lc.compile(train_step, lc.Policy(), compiler=compiler)
    losses = [float(step(x, y).detach()) for x, y in batches[:STEPS]]
    return model, step, named_parameters(model), losses


def train_worker(rank: int, world_size: int, problem: str, optimizer: str, sync: str, device: str = "cpu") -> dict:
    """Eager, then compiled; returns both runs' parameters (on the CPU) and losses and what
    was captured. `device` "cuda": this rank's GPU (over NCCL)."""
    where = torch.device("cuda", rank) if device == "cuda" else torch.device(device)
    _, _, eager_params, eager_losses = _train(rank, world_size, problem, optimizer, sync, None, where)
    model, step, params, losses = _train(rank, world_size, problem, optimizer, sync, "aot_eager", where)
    eager_params, params = ({name: p.cpu() for name, p in named.items()} for named in (eager_params, params))
    captured = step.graphs["step"]["captured"].train_graph
    all_reduces = [n for n in captured.graph.nodes if n.op == "call_function" and n.target in ALL_REDUCE_TARGETS]
    return {
        "optimizer": optimizer,
        "eager_params": eager_params,
        "eager_losses": eager_losses,
        "params": params,
        "losses": losses,
        "num_params": len(list(model.parameters())),
        "captures": step.captures,
        "all_reduces": len(all_reduces),
        "all_reduce_roles": sorted({str(n.meta.get(ROLE)) for n in all_reduces}),
        "collective_nodes": sum(1 for _ in captured.nodes(Role.COLLECTIVE)),
    }


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request):
    """Each case runs once in 2 processes; the tests below check different things about it."""
    return run_workers(train_worker, WORLD_SIZE, timeout=240, args=CASES[request.param])


def test_compiled_matches_eager_on_each_rank(run):
    for rank, result in enumerate(run):
        atol = ADAM_ATOL if "adam" in result["optimizer"] else 1e-6
        assert_close(result["params"], result["eager_params"], atol=atol, msg=f"rank {rank}")
        assert_close(torch.tensor(result["losses"]), torch.tensor(result["eager_losses"]), atol=0, msg=f"rank {rank}")
        assert result["captures"] == 1


def test_ranks_end_bit_identical(run):
    first, *others = run
    assert first["losses"] != others[0]["losses"], "the ranks should train on different data"
    for other in others:
        for mode in ("eager_params", "params"):
            assert_close(other[mode], first[mode], rtol=0, atol=0, msg=f"{mode}: ranks differ after averaging")


def test_one_all_reduce_per_parameter(run):
    for result in run:
        assert result["all_reduces"] == result["num_params"]


def test_all_reduces_have_collective_role(run):
    for result in run:
        assert result["all_reduce_roles"] == [str(Role.COLLECTIVE)]
        assert result["collective_nodes"] >= 2 * result["num_params"]  # all_reduce + wait_tensor


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL runs one worker per GPU: needs 2 GPUs")
def test_compiled_matches_eager_over_nccl():
    """The same check with each rank on its own GPU and the gradients all-reduced by NCCL."""
    results = run_workers(train_worker, WORLD_SIZE, timeout=600, args=("gpt", "adam", "all_reduce", "cuda"),
                          backend="nccl")
    for rank, result in enumerate(results):
        assert_close(result["params"], result["eager_params"], atol=ADAM_ATOL, msg=f"rank {rank}")
        assert result["captures"] == 1 and result["all_reduces"] == result["num_params"]
    assert_close(results[1]["params"], results[0]["params"], rtol=0, atol=0, msg="ranks differ after averaging")

"""GaLore trained side by side with galore-torch's own GaLoreAdamW (proj_type "std"), on a
tall, a wide and a square weight, compared at every step; low-rank DDP too, which on one
worker is GaLore with the same projection.

galore-torch is the package scripts/setup.sh installs (without its declared dependencies),
not a copy. Its projector refreshes when the parameter's step count, read before the step
increments it, is a multiple of update_proj_gap: 0-based steps 0, T, 2T, ..., where the
"refresh" event fires. Its moments cross a refresh unchanged (on_refresh="keep"), so from
the second refresh on the trajectory depends on the signs of the singular vectors as well
as on their span.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from lordo_compile.testing import galore_torch_adamw, training_step

RANK, GAP = 4, 5
# Refreshes at steps 0, 5, 10 and 15: three after the first, then a gap's worth of steps.
STEPS = 4 * GAP
# EPS is galore-torch's default; a larger eps would hide less of where it is added.
LR, WD, EPS, SCALE = 1e-2, 0.1, 1e-6, 0.25


@pytest.mark.parametrize("preset", [lc.Policy.galore, lc.Policy.low_rank_ddp], ids=["galore", "low_rank_ddp"])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)], ids=["tall", "wide", "square"])
def test_trains_as_galore_torch(shape, preset):
    m, n = shape
    torch.manual_seed(0)
    model = nn.Linear(n, m, bias=False)
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, n, generator=generator), torch.randn(16, m, generator=generator))
               for _ in range(STEPS)]

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, eps=EPS)
    policy = preset(rank=RANK, update_proj_gap=GAP, scale=SCALE, params="weight", numerics="galore_torch")
    step = lc.compile(training_step(lambda x, y: F.mse_loss(torch.tanh(model(x)), y), opt), policy,
                      compiler="aot_eager")
    galore = galore_torch_adamw()([{"params": [reference.weight], "rank": RANK, "update_proj_gap": GAP, "scale": SCALE,
                               "proj_type": "std"}], lr=LR, weight_decay=WD, eps=EPS, no_deprecation_warning=True)

    tensors = step.backend.runtime.tensors
    ours_refreshed, theirs_refreshed = [], []
    for k, (x, y) in enumerate(batches):
        held = tensors.get("low_rank.projection.weight")
        held = None if held is None else held.clone()
        step(x, y)
        if held is None or not torch.equal(held, tensors["low_rank.projection.weight"]):
            ours_refreshed.append(k)

        projector = galore.state[reference.weight].get("projector")
        previous = None if projector is None else projector.ortho_matrix
        F.mse_loss(torch.tanh(reference(x)), y).backward()
        galore.step()
        galore.zero_grad()
        projector = galore.state[reference.weight]["projector"]
        if projector.ortho_matrix is not previous:
            theirs_refreshed.append(k)

        ours, theirs = model.weight.detach(), reference.weight.detach()
        scale = float(theirs.pow(2).mean().sqrt())
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * scale, msg=lambda s: f"step {k}: {s}")
        # galore-torch keeps Vh[:r] (r x n) for a tall weight and U[:, :r] (m x r) for a wide one.
        their_projection = projector.ortho_matrix.T if m >= n else projector.ortho_matrix
        torch.testing.assert_close(tensors["low_rank.projection.weight"], their_projection, rtol=1e-4, atol=1e-5,
                                   msg=lambda s: f"projection after step {k} (signs included): {s}")
    assert ours_refreshed == theirs_refreshed == [0, GAP, 2 * GAP, 3 * GAP]

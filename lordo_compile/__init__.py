"""lordo_compile: a torch.compile backend that rewrites whole training steps.

    step = lordo_compile.compile(train_step, lordo_compile.Policy())
    loss = step(x, y)
    print(step.explain())
"""

from .api import CompiledStep, LordoBackend, backend, compile
from .capture.optim import prepare
from .errors import CaptureError, PassError
from .graph import Role, StateSpec, TrainGraph
from .passes.low_rank import LowRank
from .policy import Policy

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "CompiledStep",
    "LordoBackend",
    "LowRank",
    "PassError",
    "Policy",
    "Role",
    "StateSpec",
    "TrainGraph",
    "backend",
    "compile",
    "prepare",
]

"""lordo_compile: a torch.compile backend that rewrites whole training steps.

    step = lordo_compile.compile(train_step, lordo_compile.Policy())
    loss = step(x, y)
    print(step.explain())
"""

from .api import CompiledStep, LordoBackend, backend, compile
from .capture.optim import prepare
from .errors import CaptureError, PassError
from .runtime.checkpoint import load_checkpoint, save_checkpoint
from .runtime.executor import CollectiveError, NonFiniteError
from .graph import Role, StateSpec, TrainGraph, WeightStorage
from .passes.adaptive_rotation import AdaptiveRotation
from .passes.data_parallel import DataParallel
from .passes.eco import ECO
from .passes.ema_nesterov import EMANesterov
from .passes.fake_quant import CAGE, FakeQuant
from .passes.gossip import Gossip
from .passes.lordo import LoRDO
from .passes.low_rank import LowRank
from .passes.low_rank_ddp import LowRankDDP
from .passes.quantized_state import QuantizedState
from .passes.sync import Sync
from .policy import Policy

__version__ = "0.1.0"

__all__ = [
    "AdaptiveRotation",
    "CAGE",
    "CaptureError",
    "CollectiveError",
    "CompiledStep",
    "DataParallel",
    "ECO",
    "EMANesterov",
    "FakeQuant",
    "Gossip",
    "LoRDO",
    "LordoBackend",
    "LowRank",
    "LowRankDDP",
    "QuantizedState",
    "NonFiniteError",
    "PassError",
    "Policy",
    "Role",
    "StateSpec",
    "Sync",
    "TrainGraph",
    "WeightStorage",
    "backend",
    "compile",
    "load_checkpoint",
    "prepare",
    "save_checkpoint",
]

"""Policy: which rewrites a compiled step gets. `Policy()` is the identity."""

from __future__ import annotations

from dataclasses import dataclass

from .passes.data_parallel import DataParallel
from .passes.eco import ECO
from .passes.ema_nesterov import EMANesterov
from .passes.fake_quant import CAGE, FakeQuant
from .passes.gossip import Gossip
from .passes.lordo import LoRDO
from .passes.low_rank import LowRank
from .passes.low_rank_ddp import LowRankDDP
from .passes.sync import Sync


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The rewrites to apply to a captured training step.

    Each field is the option object of one pass (None: that pass is off). With every
    field off, the step is compiled unchanged through the identity pass.

    Raises:
      ValueError: if `extra_passes` is not a sequence of registered pass names or pass options.
    """

    low_rank: LowRank | None = None
    data_parallel: DataParallel | None = None
    sync: Sync | None = None
    low_rank_sync: LoRDO | None = None
    low_rank_data_parallel: LowRankDDP | None = None
    fake_quant: FakeQuant | None = None
    quantized_weights: ECO | None = None
    lookahead: EMANesterov | None = None
    gossip: Gossip | None = None
    # "raise" (the default) or "skip" a step whose loss or gradients are not finite; None:
    # not checked (saves one host read of a flag vector per step; see docs/reliability.md).
    on_nonfinite: str | None = "raise"
    extra_passes: tuple[object, ...] = ()

    def __post_init__(self) -> None:
        for name, kind in (("low_rank", LowRank), ("data_parallel", DataParallel), ("sync", Sync), ("low_rank_sync", LoRDO),
                           ("low_rank_data_parallel", LowRankDDP), ("fake_quant", FakeQuant), ("quantized_weights", ECO),
                           ("lookahead", EMANesterov), ("gossip", Gossip)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"Policy.{name} must be a lordo_compile.{kind.__name__}, got {value!r}")
        if self.on_nonfinite not in (None, "raise", "skip"):
            raise ValueError(f"Policy.on_nonfinite must be 'raise', 'skip' or None, got {self.on_nonfinite!r}")
        if isinstance(self.extra_passes, str) or not isinstance(self.extra_passes, (tuple, list)):
            raise ValueError(
                f"Policy.extra_passes must be a sequence of registered pass names or pass options, got "
                f"{self.extra_passes!r}"
            )
        object.__setattr__(self, "extra_passes", tuple(self.extra_passes))

    @classmethod
    def identity(cls) -> "Policy":
        return cls()

    @classmethod
    def ddp(cls, group=None) -> "Policy":
        """Average every gradient over workers every step."""
        return cls(data_parallel=DataParallel(group=group))

    @classmethod
    def local_sgd(cls, sync_every: int, group=None) -> "Policy":
        """`sync_every` local steps, then average the models (periodic model averaging)."""
        return cls(sync=Sync(every=sync_every, group=group))

    @classmethod
    def diloco(cls, sync_every: int, outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
               group=None) -> "Policy":
        """DiLoCo: local steps, then Nesterov SGD on the averaged pseudo-gradient."""
        return cls(sync=Sync(every=sync_every, outer_lr=outer_lr, outer_momentum=outer_momentum,
                             nesterov=nesterov, group=group))

    @classmethod
    def lordo(cls, rank: int, sync_every: int = 32, **options) -> "Policy":
        """LoRDO; `options` are the other `LoRDO` fields (omega, payload, ...)."""
        return cls(low_rank_sync=LoRDO(rank=rank, sync_every=sync_every, **options))

    @classmethod
    def docom(cls, ratio: float = 0.01, gamma: float = 0.1, beta: float = 0.1, **options) -> "Policy":
        """DoCoM-SGT: compressed gossip on a ring instead of an all-reduce; `options` are the
        other `Gossip` fields (topology, compressor, group)."""
        # Unchecked: a worker that skipped or stopped a step alone would leave its neighbours'
        # copies of its state behind (the gossip pass refuses the check).
        return cls(gossip=Gossip(ratio=ratio, gamma=gamma, beta=beta, **options), on_nonfinite=None)

    @classmethod
    def low_rank_ddp(cls, rank: int, update_proj_gap: int = 200, scale: float = 0.25, group=None,
                     **options) -> "Policy":
        """GaLore with the projected gradient averaged every step (LoRDO's baseline)."""
        low_rank = LowRank(rank=rank, update_proj_gap=update_proj_gap, scale=scale, **options)
        return cls(low_rank_data_parallel=LowRankDDP(low_rank=low_rank, group=group))

    @classmethod
    def galore(cls, rank: int, update_proj_gap: int = 200, scale: float = 0.25, **options) -> "Policy":
        """Low-rank optimizer state (GaLore); `options` are the other `LowRank` fields."""
        return cls(low_rank=LowRank(rank=rank, update_proj_gap=update_proj_gap, scale=scale, **options))

    @classmethod
    def cage(cls, bits: int = 4, total_steps: int | None = None, *, quantizer: str = "rms_gaussian",
             hadamard: bool = False, lam: float = 10.0, silence_ratio: float = 0.8, ramp: str = "linear",
             form: str = "decoupled", **options) -> "Policy":
        """CAGE: fake-quantized weights (STE) plus the correction lambda_t (W - Q(W));
        `total_steps` is the run's length, which the schedule spans. `options` are the
        other `FakeQuant` fields (group_size, ste, activation_bits, params, adaptive_rotation)."""
        if total_steps is None:
            raise ValueError("Policy.cage needs total_steps=T, the run's length: the correction is silent for "
                             "the first silence_ratio * T steps")
        correction = CAGE(lam=lam, total_steps=total_steps, silence_ratio=silence_ratio, ramp=ramp, form=form)
        return cls(fake_quant=FakeQuant(bits=bits, quantizer=quantizer, hadamard=hadamard, correction=correction,
                                        **options))

    @classmethod
    def eco(cls, format: str = "fp8_e4m3", scale: str = "per_row", rounding: str = "nearest", **options) -> "Policy":
        """ECO: weights kept quantized, the rounding error fed into the momentum; `options`
        are the other `ECO` fields (group_size, mode, seed, params)."""
        return cls(quantized_weights=ECO(format=format, scale=scale, rounding=rounding, **options))

    def describe(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if v not in (None, ())}
        inner = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"Policy({inner})"

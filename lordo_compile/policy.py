"""Policy: which rewrites a compiled step gets. `Policy()` is the identity.

Each field is named as its pass and holds that pass's option type (`lordo=LoRDO(...)` runs
the pass "lordo"); the fields of the previous release (`low_rank_sync`,
`low_rank_data_parallel`, `quantized_weights`, `lookahead`) are deprecated aliases.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from .distributed import levels
from .passes.data_parallel import DataParallel
from .passes.eco import ECO
from .passes.ema_nesterov import EMANesterov
from .passes.fake_quant import CAGE, FakeQuant
from .passes.gossip import Gossip
from .passes.lordo import VARIANTS as LORDO_VARIANTS, LoRDO
from .passes.low_rank import LowRank
from .passes.low_rank_ddp import LowRankDDP
from .passes.quantized_state import QuantizedState
from .passes.sync import Sync


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The rewrites to apply to a captured training step.

    Each field is the option object of the pass of the same name (None: that pass is off).
    Any combination composes unless its passes conflict mathematically (docs/compositions.md
    says which, and why). With every field off, the step is compiled unchanged through the
    identity pass.

    Raises:
      ValueError: if a field holds another option type, or `extra_passes` is not a sequence
        of registered pass names or pass options.
    """

    low_rank: LowRank | None = None
    data_parallel: DataParallel | None = None
    sync: Sync | None = None
    lordo: LoRDO | None = None
    low_rank_ddp: LowRankDDP | None = None
    fake_quant: FakeQuant | None = None
    eco: ECO | None = None
    ema_nesterov: EMANesterov | None = None
    gossip: Gossip | None = None
    quantized_state: QuantizedState | None = None
    # "raise" (the default) or "skip" a step whose loss or gradients are not finite; None:
    # not checked (saves one host read of a flag vector per step; see docs/reliability.md).
    on_nonfinite: str | None = "raise"
    extra_passes: tuple[object, ...] = ()

    def __post_init__(self) -> None:
        written = getattr(self, "_written_as", {})
        for name, kind in (("low_rank", LowRank), ("data_parallel", DataParallel), ("sync", Sync), ("lordo", LoRDO),
                           ("low_rank_ddp", LowRankDDP), ("fake_quant", FakeQuant), ("eco", ECO),
                           ("ema_nesterov", EMANesterov), ("gossip", Gossip),
                           ("quantized_state", QuantizedState)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"Policy.{written.get(name, name)} must be a lordo_compile.{kind.__name__}, "
                                 f"got {value!r}")
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
    def local_sgd(cls, sync_every: int, group=None, mesh=None, fragments: int = 1, delay: int = 0,
                  local_weight: float = 0.0, payload: str = "full") -> "Policy":
        """`sync_every` local steps, then average the models (periodic model averaging).
        `mesh`, `fragments`, `delay`, `local_weight`, `payload`: see `diloco`."""
        inner, group = _levels(group, mesh)
        return _with_inner(cls(sync=Sync(every=sync_every, group=group, fragments=fragments, delay=delay,
                                         local_weight=local_weight, payload=payload)), inner)

    @classmethod
    def diloco(cls, sync_every: int, outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
               group=None, mesh=None, fragments: int = 1, delay: int = 0, local_weight: float = 0.0,
               payload: str = "full") -> "Policy":
        """DiLoCo: local steps, then Nesterov SGD on the averaged pseudo-gradient.

        `mesh`: a 2-D `DeviceMesh` (outer, inner) or an (inner, outer) pair of process groups:
        gradients are averaged over `inner` every step (DDP), the sync runs over `outer`.
        `fragments`: sync the model in this many fragments at staggered steps (streaming).
        `delay`: let each sync's all-reduce overlap this many local steps before its result is
        merged, keeping `local_weight` of the local parameters then (Streaming DiLoCo's tau, alpha).
        `payload="int8"`: send int8 codes with a scale per row instead of the pseudo-gradients,
        what they drop fed back into the next sync's."""
        inner, group = _levels(group, mesh)
        return _with_inner(cls(sync=Sync(every=sync_every, outer_lr=outer_lr, outer_momentum=outer_momentum,
                                         nesterov=nesterov, group=group, fragments=fragments, delay=delay,
                                         local_weight=local_weight, payload=payload)), inner)

    @classmethod
    def docom(cls, ratio: float = 0.01, gamma: float = 0.1, beta: float = 0.1, **options) -> "Policy":
        """DoCoM-SGT: compressed gossip on a ring instead of an all-reduce; `options` are the
        other `Gossip` fields (topology, compressor, group)."""
        return cls(gossip=Gossip(ratio=ratio, gamma=gamma, beta=beta, **options))

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

    def describe(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if v not in (None, ())}
        inner = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"Policy({inner})"


_RENAMED = {"low_rank_sync": "lordo", "low_rank_data_parallel": "low_rank_ddp", "quantized_weights": "eco",
            "lookahead": "ema_nesterov"}


def _deprecated_field(old: str) -> property:
    new = _RENAMED[old]

    def read(self):
        warnings.warn(f"Policy.{old} is deprecated; read Policy.{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(read, doc=f"Deprecated alias of `{new}`.")


def _accepting_old_names(init):
    def __init__(self, **fields) -> None:
        written = {}
        for old, new in _RENAMED.items():
            if old not in fields:
                continue
            warnings.warn(f"Policy({old}=...) is deprecated; use Policy({new}=...)", DeprecationWarning, stacklevel=2)
            if fields.get(new) is not None:
                raise ValueError(f"Policy got both {old}= and {new}=, the same field under its old and new name")
            fields[new] = fields.pop(old)
            written[new] = old
        # Read by __post_init__, so an error names the field as the caller wrote it.
        object.__setattr__(self, "_written_as", written)
        init(self, **fields)
        object.__delattr__(self, "_written_as")

    __init__.__doc__ = init.__doc__
    return __init__


Policy.__init__ = _accepting_old_names(Policy.__init__)
for _old in _RENAMED:
    setattr(Policy, _old, _deprecated_field(_old))


# The presets named as their fields are set after the dataclass is built: on the class
# `Policy.lordo(rank=8)` is the preset, on an instance `policy.lordo` is the field's value
# (a classmethod does not shadow an instance attribute).


def _levels(group, mesh) -> tuple[object, object]:
    """(inner group or None, the sync's group) of a preset's `group=` or `mesh=`."""
    if mesh is None:
        return None, group
    if group is not None:
        raise ValueError("give a preset group= (one level) or mesh= (two levels), not both")
    return levels(mesh)


def _with_inner(policy: "Policy", inner) -> "Policy":
    return policy if inner is None else dataclasses.replace(policy, data_parallel=DataParallel(group=inner))


def _lordo(cls, rank: int, sync_every: int = 32, variant: str = "default", mesh=None, **options) -> "Policy":
    """LoRDO; `variant` "authors" sets the fields that make it the authors' public code
    (`passes.lordo.VARIANTS`, docs/passes/lordo.md); `options` are other `LoRDO` fields
    (omega, payload, group, ...) and override the variant's. `mesh`: see `Policy.diloco`."""
    if variant not in LORDO_VARIANTS:
        raise ValueError(f"Policy.lordo variant must be one of {tuple(LORDO_VARIANTS)}, got {variant!r}")
    inner, group = _levels(options.pop("group", None), mesh)
    return _with_inner(cls(lordo=LoRDO(rank=rank, sync_every=sync_every, group=group,
                                       **{**LORDO_VARIANTS[variant], **options})), inner)


Policy.lordo = classmethod(_lordo)


def _low_rank_ddp(cls, rank: int, update_proj_gap: int = 200, scale: float = 0.25, group=None,
                 **options) -> "Policy":
    """GaLore with the projected gradient averaged every step (LoRDO's baseline)."""
    low_rank = LowRank(rank=rank, update_proj_gap=update_proj_gap, scale=scale, **options)
    return cls(low_rank_ddp=LowRankDDP(low_rank=low_rank, group=group))


Policy.low_rank_ddp = classmethod(_low_rank_ddp)


def _eco(cls, format: str = "fp8_e4m3", scale: str = "per_row", rounding: str = "nearest", **options) -> "Policy":
    """ECO: weights kept quantized, the rounding error fed into the momentum; `options`
    are the other `ECO` fields (group_size, mode, seed, params)."""
    return cls(eco=ECO(format=format, scale=scale, rounding=rounding, **options))


Policy.eco = classmethod(_eco)


def _quantized_state(cls, bits: int = 8, **options) -> "Policy":
    """Optimizer moments held in `bits` bits with per-block scales (torchao's AdamW8bit and
    AdamW4bit at the defaults); `options` are the other `QuantizedState` fields. Combine it
    with another rewrite as a field: `Policy(low_rank=..., quantized_state=QuantizedState())`."""
    return cls(quantized_state=QuantizedState(bits=bits, **options))


Policy.quantized_state = classmethod(_quantized_state)

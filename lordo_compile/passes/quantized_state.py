"""Optimizer moments held in 8 or 4 bits between steps, whichever rewrite holds them.

    before:
        adamw = lordo.adamw(W, grad_W, exp_avg_W, exp_avg_sq_W, step_W, lr, ...)
        exp_avg_W.copy_(adamw[1])
    after (every graph; exp_avg_sq alike with the unsigned map):
        exp_avg_W_read = lordo.dequantize_moment(codes_exp_avg_W, scales_exp_avg_W, signed_map, bits=8)
        adamw = lordo.adamw(W, grad_W, exp_avg_W_read.view(shape), exp_avg_sq_W_read.view(shape), ...)
        exp_avg_W_held = lordo.quantize_moment(adamw[1], signed_map, bits=8, block_size=256)
        codes_exp_avg_W.copy_(exp_avg_W_held[0]); scales_exp_avg_W.copy_(exp_avg_W_held[1])

Every step reads each moment back in fp32, updates it in fp32 and stores it again
(ALGORITHMS.md section 8, `ops.moments`), so the update of a step uses the moments it just
computed before they are rounded, as torchao's and bitsandbytes' 8-bit optimizers do. The
maps (`signed_map`, `unsigned_map`: 2^bits fp32 values each) are state the runtime fills.

The pass finds the moments; it knows no other pass. They are the moments of torch.optim's
state that no other pass took over (`exp_avg`, `exp_avg_sq`, `momentum_buffer`: released
from the optimizer before capture) and every state a pass declared with
`StateSpec(moment=...)`. It runs after every rewrite that reads or writes state
(`Stage.STATE_STORAGE`), so it holds the moments in whatever form they left: GaLore's
projected moments, for one. Moments of fewer than `min_size` entries, or whose size is not
a multiple of the block, stay as they are (the references' rule). A moment that a graph
writes other than by copies after its last read of its value is refused with a PassError
naming it (a `zeros_like`, which reads only the shape, may follow a write: LoRDO's reset);
of several copies, the last is the one stored.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import PassError
from ..graph import INPUT, PARAM, ROLE, STATE, ParamInfo, Role, StateSpec, TrainGraph, tag, writes_into
from ..ops import op_named
from ..ops.moments import BITS, code_count, dequantize_moment, quantization_map, quantize_moment
from .manager import PassResult, PassRuntime, Program, Stage, register_pass

# torch.optim's moments and their sign.
OPTIMIZER_MOMENTS = {"exp_avg": "signed", "exp_avg_sq": "unsigned", "momentum_buffer": "signed"}
# torchao's block sizes (AdamW8bit, AdamW4bit).
DEFAULT_BLOCK = {8: 256, 4: 128}


@dataclass(frozen=True, kw_only=True)
class QuantizedState:
    """Optimizer moments held in `bits` bits (ALGORITHMS.md section 8).

    Args:
      bits: 8 (the dynamic map, signed or unsigned) or 4 (signed dynamic, unsigned linear;
        two codes per byte).
      block_size: entries per fp32 scale; None: 256 at 8 bits, 128 at 4 (torchao's).
      min_size: moments with fewer entries stay fp32 (4096, as torchao and bitsandbytes).

    Raises:
      ValueError: for bits not in (8, 4), or a block size or minimum size that is not a
        positive int (an odd block at 4 bits: codes are packed in pairs).
    """

    bits: int = 8
    block_size: int | None = None
    min_size: int = 4096

    def __post_init__(self) -> None:
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ValueError(f"QuantizedState.bits must be one of {BITS}, got {self.bits!r}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                            or self.block_size < 1 or (self.bits == 4 and self.block_size % 2)):
            raise ValueError(f"QuantizedState.block_size must be an int >= 1 (even at 4 bits) or None, got "
                             f"{self.block_size!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"QuantizedState.min_size must be an int >= 0, got {self.min_size!r}")

    @property
    def block(self) -> int:
        return self.block_size or DEFAULT_BLOCK[self.bits]

    def holds(self, numel: int) -> bool:
        """Whether a moment of `numel` entries is held in `bits` bits."""
        return numel >= max(self.min_size, 1) and numel % self.block == 0


def _releases(option: QuantizedState, info: ParamInfo, op_name: str) -> tuple[str, ...]:
    if not option.holds(math.prod(info.shape)):
        return ()
    return tuple(key for key in op_named(op_name).state if key in OPTIMIZER_MOMENTS)


@dataclass
class _Moment:
    placeholder: fx.Node
    name: str
    param: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    sign: str
    declared: bool  # by a pass (a StateSpec), not by the optimizer
    counted_by_optimizer: bool


def _moments(graph: TrainGraph, option: QuantizedState) -> list[_Moment]:
    found = []
    for node in graph.placeholders():
        if node.meta.get(ROLE) != Role.OPTIMIZER_STATE:
            continue
        source = node.meta.get(INPUT) or ()
        if source[:1] == ("state",):
            spec = graph.state[source[1]]
            moment = _Moment(node, spec.name, spec.param, spec.shape, spec.dtype, spec.moment, True,
                             spec.counted_by_optimizer)
        else:
            key, param = node.meta.get(STATE), node.meta.get(PARAM)
            info = graph.params.get(param)
            # A moment another pass took over is no longer read: that pass holds it.
            if key not in OPTIMIZER_MOMENTS or info is None or not any(
                    not writes_into(user, node) for user in node.users):
                continue
            moment = _Moment(node, f"{key}.{param}", param, info.shape, info.dtype, OPTIMIZER_MOMENTS[key], False,
                             True)
        if moment.sign is not None and option.holds(math.prod(moment.shape)):
            found.append(moment)
    return found


def _hold(graph: TrainGraph, moment: _Moment, option: QuantizedState) -> str:
    """Rewrite the reads and the write of one moment; a line for the summary."""
    g = graph.graph
    node = moment.placeholder
    writes = [user for user in node.users if writes_into(user, node)]
    reads = [user for user in node.users if user not in writes]
    order = {n: i for i, n in enumerate(g.nodes)}
    # A *_like op reads only the shape (a reset to zeros): it may come after a write.
    values_read = [read for read in reads if read.target not in _SHAPE_ONLY]
    if any(write.target != "copy_" for write in writes) or (writes and values_read and max(
            map(order.__getitem__, values_read)) > min(map(order.__getitem__, writes))):
        raise PassError(f"quantized_state: {moment.name} is written other than by copies after its last read "
                        f"({[w.format_node() for w in writes]}); it cannot be held quantized. Exclude it with "
                        "min_size, or report the rewrite that writes it so")
    numel = math.prod(moment.shape)
    levels = graph.state_node(_map_spec(moment.sign, option.bits))
    attributes = {"bits": option.bits}
    held = [graph.add_state(StateSpec(name=f"quantized_state.{part}.{moment.name}", shape=(size,), dtype=dtype,
                                      owner="quantized_state", param=moment.param,
                                      counted_by_optimizer=moment.counted_by_optimizer))
            for part, size, dtype in (("codes", code_count(numel, option.bits), torch.uint8),
                                      ("scales", numel // option.block, torch.float32))]
    label = moment.name.replace(".", "_")
    if reads:
        with g.inserting_before(min(reads, key=order.__getitem__)):
            flat = tag(g.call_function(dequantize_moment, (*held, levels), attributes), Role.OPTIMIZER_UPDATE,
                       moment.param, moment.name, name=f"read_{label}")
            value = g.call_function(torch.ops.aten.view.default, (flat, list(moment.shape)))
            if moment.dtype != torch.float32:
                value = g.call_function(torch.ops.aten._to_copy.default, (value,), {"dtype": moment.dtype})
            tag(value, Role.OPTIMIZER_UPDATE, moment.param, moment.name, name=f"read_{label}_shaped")
        for read in reads:
            read.replace_input_with(node, value)
    if writes:
        last = max(writes, key=order.__getitem__)
        with g.inserting_before(last):
            stored = tag(g.call_function(quantize_moment, (last.args[1], levels), {**attributes, "block_size": option.block}),
                         Role.OPTIMIZER_UPDATE, moment.param, moment.name, name=f"hold_{label}")
            for index, (target, kind) in enumerate(zip(held, ("codes", "scales"))):
                part = tag(g.call_function(operator.getitem, (stored, index)), Role.OPTIMIZER_UPDATE, moment.param,
                           moment.name, name=f"new_{kind}_{label}")
                tag(g.call_method("copy_", (target, part)), Role.WRITEBACK, moment.param, target.meta[STATE],
                    name=f"write_{kind}_{label}")
        for write in writes:
            g.erase_node(write)
    if moment.declared:
        g.erase_node(node)
        del graph.state[moment.name]
    held_bytes = code_count(numel, option.bits) + 4 * numel // option.block
    return (f"quantized_state: {moment.name} {list(moment.shape)} ({moment.sign}) in {option.bits} bits: "
            f"{held_bytes:,} bytes instead of {numel * moment.dtype.itemsize:,}")


_SHAPE_ONLY = (torch.ops.aten.zeros_like.default, torch.ops.aten.ones_like.default,
               torch.ops.aten.empty_like.default, torch.ops.aten.full_like.default)


def _map_spec(sign: str, bits: int) -> StateSpec:
    return StateSpec(name=f"quantized_state.{sign}_map", shape=(2**bits,), dtype=torch.float32,
                     owner="quantized_state")


class MapFill(PassRuntime):
    """Fills the quantization maps when they are allocated (a checkpoint restores them as they were)."""

    def setup(self, fresh: set[str]) -> None:
        tensors = self.context.runtime.tensors
        for sign in ("signed", "unsigned"):
            name = _map_spec(sign, self.option.bits).name
            if name in fresh:
                tensors[name].copy_(torch.tensor(quantization_map(sign == "signed", self.option.bits)))


@register_pass("quantized_state", stage=Stage.STATE_STORAGE, option="quantized_state", option_type=QuantizedState,
               releases=_releases, releases_leftover=True, runtime=MapFill)
def quantized_state(program: Program, option: QuantizedState) -> PassResult:
    graph = program.graph
    summary = tuple(_hold(graph, moment, option) for moment in _moments(graph, option))
    return PassResult(program, summary or ("quantized_state: no moment of at least "
                                           f"{option.min_size} entries in blocks of {option.block}",))

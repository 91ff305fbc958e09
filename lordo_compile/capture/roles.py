"""Turn dynamo's graph of a training step into a TrainGraph: roles, names, checks.

What dynamo hands over (torch 2.13, `trace_autograd_ops=True`):

    params, batch, opt state, hparams (placeholders)
    loss = ... forward ...
    grad = torch.autograd.grad(loss, [p0, p1, ...]); g0 = grad[0]; ...
    new_grad_strided = torch.empty_like(p0); new_grad_strided.copy_(g0)    # the .grad write
    out = torch.ops.lordo.adamw.default(p0, new_grad_strided, m0, v0, ...) # traced opt.step()
    p0.copy_(out[0]); m0.copy_(out[1]); ...

Here the `.grad` staging copies are folded away (uses read `g0` directly), every node
gets a role, and placeholders and gradients get names (`layers_0_weight`,
`grad_layers_0_weight`, `exp_avg_layers_0_weight`, `group0_lr`).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ..errors import CaptureError, user_line
from ..graph import INPUT, PARAM, PROVENANCE, ROLE, STATE, ParamInfo, Role, TrainGraph, UpdateSite, identifier
from ..ops import canonical_op
from .discover import Names
from .functionalize import functionalize_gradients
from .optim import OptimizerAdapter

_HOST_SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__"}


@dataclass
class InputCatalog:
    """What each tensor the step may read is, keyed by `id(tensor)`."""

    names: Names
    arg_names: list[str]
    params: dict[int, nn.Parameter | torch.Tensor] = field(default_factory=dict)
    state: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict)
    hyperparameters: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def build(cls, names: Names, arg_names: list[str], adapters: list[OptimizerAdapter]) -> "InputCatalog":
        catalog = cls(names, arg_names)
        for a, adapter in enumerate(adapters):
            prefix = f"opt{a}_" if len(adapters) > 1 else ""
            for g, plan in enumerate(adapter.groups):
                catalog.hyperparameters[id(plan.hyperparameters)] = (f"{prefix}group{g}", plan.op.hyperparameters)
                for p in plan.params:
                    catalog.params[id(p)] = p
                    for key, tensor in zip(plan.op.state, adapter.state_tensors(p, plan.op)):
                        catalog.state[id(tensor)] = (p, key)
        return catalog


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    if grapharg is None or grapharg.source is None:
        return node.name
    text = grapharg.source.name
    # Keep what follows the last closure cell: `...cell_contents.net.0.weight` -> `net.0.weight`.
    text = re.split(r"\.cell_contents\.?", text)[-1] or text
    text = re.sub(r"\._(modules|parameters|buffers)\['([^']+)'\]", r".\2", text)
    text = re.sub(r"^[LG]\['([^']+)'\]", r"\1", text)
    return re.sub(r"^_(modules|parameters|buffers)\['([^']+)'\]", r"\2", text)


def _is_grad_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.autograd.grad


def _is_collective(node: fx.Node) -> bool:
    # Dynamo records packets (`_c10d_functional.all_reduce`), AOT graphs overloads (`.default`).
    target = getattr(node.target, "_overloadpacket", node.target)
    name = getattr(target, "_qualified_op_name", "")
    return node.op == "call_function" and name.startswith("_c10d_functional::")


def _check_host_syncs(graph: fx.Graph) -> None:
    for node in graph.nodes:
        sync = (node.op == "call_method" and node.target in _HOST_SYNCS) or (
            node.op == "call_function" and node.target is torch.ops.aten._local_scalar_dense.default
        )
        if sync:
            raise CaptureError(
                f"the step reads a tensor's value on the host (`.{node.target}()`) at "
                f"{user_line(node.meta.get('stack_trace'))}; that would stall every step. "
                "Return the tensor from the step and call .item() on the result instead."
            )


def _fold_grad_staging(graph: fx.Graph, grads: set[fx.Node]) -> None:
    """Replace `e = empty_like(p); e.copy_(g)` by `g` where `g` is a fresh gradient."""
    for node in list(graph.nodes):
        if not (node.op == "call_method" and node.target == "copy_" and len(node.args) == 2):
            continue
        staging, grad = node.args
        if grad not in grads or len(grad.users) != 1 or node.users:
            continue
        if not (isinstance(staging, fx.Node) and staging.target is torch.empty_like):
            continue
        staging.replace_all_uses_with(grad, delete_user_cb=lambda user: user is not node)
        graph.erase_node(node)
        graph.erase_node(staging)


def build_train_graph(gm: fx.GraphModule, example_inputs: list, catalog: InputCatalog) -> TrainGraph:
    graph = gm.graph
    _check_host_syncs(graph)
    params: dict[str, ParamInfo] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names: dict[fx.Node, str] = {}
    param_names: dict[int, str] = {}
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        node.meta[INPUT] = ("dynamo", index)
        key = id(value)
        if key in catalog.params or isinstance(value, nn.Parameter):
            name = catalog.names.params.get(key) or _source_name(node)
            param_names[key] = name
            node.meta.update({ROLE: Role.PARAMETER, PARAM: name})
            params[name] = ParamInfo(name, tuple(value.shape), value.dtype, catalog.names.module_types.get(key))
            names[node] = identifier(name)
    for node, value in zip(placeholders, example_inputs):
        key = id(value)
        if key in param_names:
            continue
        if key in catalog.state:
            owner, state_key = catalog.state[key]
            pname = param_names.get(id(owner)) or catalog.names.params.get(id(owner)) or _source_name(node)
            node.meta.update({ROLE: Role.OPTIMIZER_STATE, PARAM: pname, STATE: state_key})
            names[node] = identifier(f"{state_key}_{pname}")
        elif key in catalog.hyperparameters:
            group, keys = catalog.hyperparameters[key]
            node.meta[ROLE] = Role.HYPERPARAMETER
            names[node] = f"{group}_hyperparameters"
            for user in node.users:
                if user.target is operator.getitem and isinstance(user.args[1], int):
                    user.meta[ROLE] = Role.HYPERPARAMETER
                    names[user] = f"{group}_{keys[user.args[1]]}"
        elif key in catalog.names.buffers:
            node.meta[ROLE] = Role.BUFFER
            names[node] = identifier(catalog.names.buffers[key])
        else:
            node.meta[ROLE] = Role.BATCH_INPUT
            source = _source_name(node)
            match = re.fullmatch(r"args\[(\d+)\]", source)
            if match and int(match.group(1)) < len(catalog.arg_names):
                source = catalog.arg_names[int(match.group(1))]
            source = re.sub(r"^kwargs\['([^']+)'\]", r"\1", source)
            names[node] = identifier(source)

    backward = [n for n in graph.nodes if _is_grad_call(n)]
    if not backward:
        raise CaptureError(
            "the step never calls loss.backward() (or torch.autograd.grad), so there is no "
            "training step to compile: call backward inside the step, or use torch.compile "
            "with another backend for inference."
        )
    grads: set[fx.Node] = set()
    for call in backward:
        call.meta[ROLE] = Role.BACKWARD
        outputs, inputs = call.args[0], call.args[1]
        for loss in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
            loss.meta[ROLE] = Role.LOSS
        for user in list(call.users):
            if user.target is operator.getitem:
                param_node = inputs[user.args[1]]
                pname = param_node.meta.get(PARAM, param_node.name)
                user.meta.update({ROLE: Role.GRADIENT, PARAM: pname})
                names[user] = identifier(f"grad_{pname}")
                grads.add(user)
    _fold_grad_staging(graph, grads)
    functionalize_gradients(graph, grads)

    updates = []
    for node in graph.nodes:
        op = canonical_op(node.target) if node.op == "call_function" else None
        if op is None:
            continue
        updates.append(node)
        pname = node.args[0].meta.get(PARAM, node.args[0].name)
        node.meta.update({ROLE: Role.OPTIMIZER_UPDATE, PARAM: pname})
        names[node] = identifier(f"{op.name}_{pname}")
        site = UpdateSite(node, op, pname)
        for key, output in site.outputs().items():
            if output is not node:
                output.meta.update({ROLE: Role.OPTIMIZER_UPDATE, PARAM: pname, STATE: key})
                names[output] = identifier(f"new_{key}_{pname}")
            for write in output.users:
                if write.op == "call_method" and write.target == "copy_" and write.args[1] is output:
                    write.meta.update({ROLE: Role.WRITEBACK, PARAM: pname, STATE: key})
                    names[write] = identifier(f"write_{key}_{pname}")
    if not updates:
        raise CaptureError(
            "the step computes gradients but no optimizer update was captured. Step a "
            "torch.optim optimizer inside the step (SGD, Adam, AdamW); if you call "
            "torch.compile(..., backend='lordo') yourself, call lordo_compile.prepare(opt) first "
            "and pass fullgraph=True, or use lordo_compile.compile(step, policy)."
        )

    _assign_remaining_roles(graph, backward, grads, updates)
    for node in graph.nodes:
        node.meta[PROVENANCE] = "capture"
    for node, name in names.items():
        node._rename(name)
    for node in graph.nodes:
        if "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
    gm.recompile()
    # The fake tensors dynamo recorded: new nodes' values are computed in the same fake mode.
    recorded = [node.meta["val"] for node in placeholders if isinstance(node.meta.get("val"), torch.Tensor)]
    parameters = [example_inputs[i] for i, node in enumerate(placeholders) if node.meta.get(ROLE) == Role.PARAMETER]
    return TrainGraph(gm, gm.graph, frozenset(), params, num_dynamo_inputs=len(placeholders),
                      fake_mode=getattr(recorded[0], "fake_mode", None) if recorded else None,
                      device=parameters[0].device if parameters else torch.device("cpu"))


def _assign_remaining_roles(graph: fx.Graph, backward, grads, updates) -> None:
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        for source in node.all_input_nodes:
            dag.add_edge(source, node)
    losses = [n for n in graph.nodes if n.meta.get(ROLE) == Role.LOSS]
    forward = set().union(*(nx.ancestors(dag, loss) for loss in losses))
    after_grads = set().union(*(nx.descendants(dag, g) for g in grads))
    before_updates = set().union(*(nx.ancestors(dag, u) for u in updates))
    output = next(n for n in graph.nodes if n.op == "output")
    output.meta[ROLE] = Role.OUTPUT
    returned = [n for n in output.all_input_nodes if n in losses or any(loss in nx.ancestors(dag, n) for loss in losses)]
    if losses and not returned:
        raise ValueError(
            "the training step returns no loss; return it (`return loss`: lc.compile detaches it, or "
            "`return loss.detach()` under torch.compile). The loss is what a step reports and what "
            "Policy(on_nonfinite=...) checks."
        )
    for node in graph.nodes:
        if ROLE in node.meta:
            continue
        if _is_collective(node):
            node.meta[ROLE] = Role.COLLECTIVE
        elif node in forward:
            node.meta[ROLE] = Role.FORWARD
        elif node in after_grads and (node in before_updates or output in node.users):
            node.meta[ROLE] = Role.GRADIENT
        elif list(node.users) == [output]:
            node.meta[ROLE] = Role.OUTPUT
        else:
            node.meta[ROLE] = Role.OTHER

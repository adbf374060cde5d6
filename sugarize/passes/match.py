"""What counts as a ReLU (and, for relufy, a GELU or SiLU) in an fx graph, and how it is spelled."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ..method.op import OP
from .activations import THRESHOLD_NOTE, call_match, module_match

__all__ = ["Match", "match_node", "scripted_sites", "module_path", "may_alias"]


@dataclass(frozen=True)
class Match:
    """One activation call site found in a graph."""

    kind: str  # a row of the activation table (passes/activations.ACTIVATIONS): "relu", "gelu", "silu", "relu6", ...
    spelling: str  # as the user wrote it, e.g. "F.relu(inplace=True)"
    inplace: bool
    input: Node | None
    note: str = ""  # what to know about a converted site


_ATEN = torch.ops.aten


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def match_node(node: Node, modules: dict[str, nn.Module]) -> Match | None:
    """The activation ``node`` calls, if it is one of the rule table's (``activations``)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    hit = None
    if node.op == "call_module":
        mod = modules.get(node.target)
        hit = module_match(mod) if mod is not None else None
    elif node.op == "call_function":
        hit = call_match(node.target, node.args, node.kwargs)
    elif node.op == "call_method":
        func = getattr(torch.Tensor, str(node.target), None)
        hit = call_match(func, node.args, node.kwargs) if func is not None else None
    if hit is None:
        return None
    kind, spelling, inplace = hit
    threshold = node.op != "call_module" and "threshold" in spelling
    return Match(kind, spelling, inplace, x, THRESHOLD_NOTE if threshold else "")


_SCRIPTED_RELU = {"aten::relu", "aten::relu_"}


def scripted_sites(model: nn.Module) -> list:
    """One skipped Site per TorchScript submodule that calls ReLU: its code is compiled, so no
    pass can rewrite it (nor see it run); the report says so instead of missing it."""
    from .report import Site

    sites = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.jit.ScriptModule) or any(
                path.startswith(f"{p}.") for p, _ in sites):
            continue
        try:
            calls = sum(1 for n in module.inlined_graph.nodes() if n.kind() in _SCRIPTED_RELU)
        except Exception:  # noqa: BLE001 - a scripted module without a graph to read
            calls = 0
        if calls:
            sites.append((path, calls))
    return [Site(path, "TorchScript", "relu", "", "skipped",
                 f"inside a TorchScript module (torch.jit.script/trace): {n} ReLU call(s) compiled there cannot be "
                 "rewritten; convert the Python module before scripting it", calls=n)
            for path, n in sites]


def module_path(node: Node) -> str:
    """Dotted path of the module a call belongs to ("" for the root model)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(str(path))
    return ""


def _clean_path(path: str) -> str:
    # torch.export records paths like "L['self'].layer1[0]"; symbolic_trace plain "layer1.0".
    if path.startswith("L['self']"):
        path = path[len("L['self']") :].lstrip(".")
        path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path


# Producers whose output is a fresh tensor that no other value aliases.
_FRESH_MODULES = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase,
    nn.LayerNorm, nn.GroupNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Embedding, nn.Upsample, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Softmax,
)
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.bmm, torch.mm, torch.cat,
    torch.stack, torch.sigmoid, torch.tanh, torch.relu, torch.mean, torch.sum, torch.addmm,
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.layer_norm, F.group_norm,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.interpolate, F.gelu, F.silu,
    OP,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "mean", "sum", "relu", "sigmoid", "tanh", "clone"}


def _is_fresh(node: Node, modules: dict[str, nn.Module]) -> bool:
    if node.kwargs.get("out") is not None:  # torch.add(a, b, out=buf) is buf: an alias, not fresh
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _FRESH_MODULES) or (
            isinstance(modules.get(node.target), nn.ReLU) and not modules[node.target].inplace
        )
    if node.op == "call_function":
        if node.target is F.relu:
            return not bool(_arg(node, 1, "inplace", False))
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def may_alias(x: Node, before: Node, modules: dict[str, nn.Module], order: dict) -> bool:
    """Whether an in-place op on ``x`` at ``before`` could be seen through another name.

    False only when ``x`` is a fresh tensor and nothing before ``before`` made a view of it;
    then replacing the later uses of ``x`` is equivalent to mutating it.
    """
    if not _is_fresh(x, modules):
        return True
    for user in x.users:
        if user is before or order.get(user, -1.0) > order[before]:
            continue
        if not _is_fresh(user, modules) and user.op != "output":
            return True  # e.g. a view taken before the mutation
    return False

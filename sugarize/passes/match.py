"""What counts as a ReLU (and, for relufy, a GELU or SiLU) in an fx graph, and how it is spelled."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ..method.op import OP

__all__ = ["Match", "match_node", "module_path", "is_sugar", "may_alias", "HF_ACTIVATIONS"]

# Hugging Face transformers' activation classes (what ``ACT2FN[config.hidden_act]`` returns),
# matched by class name so that copies of them in other code bases count too.
HF_ACTIVATIONS = {
    "GELUActivation": "gelu",  # "gelu"
    "NewGELUActivation": "gelu_tanh",  # "gelu_new"
    "GELUTanh": "gelu_tanh",  # "gelu_pytorch_tanh"
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",  # "gelu_fast": the tanh form, written differently
    "SiLUActivation": "silu",  # "silu"/"swish" in older releases
}


@dataclass(frozen=True)
class Match:
    """One activation call site found in a graph."""

    kind: str  # "relu", "gelu", "gelu_tanh", "silu", or "relu6"/"other" for look-alikes
    spelling: str  # as the user wrote it, e.g. "F.relu(inplace=True)"
    inplace: bool
    input: Node | None


_ATEN = torch.ops.aten


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_module_call(mod: nn.Module, cls: type) -> bool:
    # A subclass that overrides forward is traced through, not matched as a leaf here.
    return isinstance(mod, cls) and type(mod).forward is cls.forward


def match_node(node: Node, modules: dict[str, nn.Module]) -> Match | None:
    """The activation ``node`` calls, if it is one we know."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if mod is None:
            return None
        x = node.args[0] if node.args else None
        if _is_module_call(mod, nn.ReLU):
            return Match("relu", "nn.ReLU(inplace=True)" if mod.inplace else "nn.ReLU", mod.inplace, x)
        if _is_module_call(mod, nn.ReLU6):
            return Match("relu6", "nn.ReLU6", False, x)
        if _is_module_call(mod, nn.GELU):
            kind = "gelu_tanh" if mod.approximate == "tanh" else "gelu"
            spelling = "nn.GELU(approximate='tanh')" if kind == "gelu_tanh" else "nn.GELU"
            return Match(kind, spelling, False, x)
        if _is_module_call(mod, nn.SiLU):
            return Match("silu", "nn.SiLU", bool(mod.inplace), x)
        if _is_module_call(mod, nn.LeakyReLU):
            return Match("leaky_relu", "nn.LeakyReLU", bool(mod.inplace), x)
        hf = HF_ACTIVATIONS.get(type(mod).__name__)
        if hf is not None:
            return Match(hf, type(mod).__name__, False, x)
        return None
    if node.op == "call_function":
        t = node.target
        x = node.args[0] if node.args else node.kwargs.get("input")
        if t is F.relu:
            inplace = bool(_arg(node, 1, "inplace", False))
            return Match("relu", "F.relu(inplace=True)" if inplace else "F.relu", inplace, x)
        if t is torch.relu or t is _ATEN.relu.default:
            return Match("relu", "torch.relu" if t is torch.relu else "aten.relu", False, x)
        if t is torch.relu_ or t is _ATEN.relu_.default:
            return Match("relu", "torch.relu_" if t is torch.relu_ else "aten.relu_", True, x)
        if t is torch.Tensor.relu:
            return Match("relu", "Tensor.relu", False, x)
        if t is torch.Tensor.relu_:
            return Match("relu", "Tensor.relu_", True, x)
        if t is F.relu6 or t is _ATEN.relu6.default:
            return Match("relu6", "F.relu6", False, x)
        if t is F.gelu or t is _ATEN.gelu.default:
            approx = _arg(node, 1, "approximate", "none")
            kind = "gelu_tanh" if approx == "tanh" else "gelu"
            return Match(kind, "F.gelu(approximate='tanh')" if kind == "gelu_tanh" else "F.gelu", False, x)
        if t is F.leaky_relu or t is _ATEN.leaky_relu.default:
            return Match("leaky_relu", "F.leaky_relu", bool(_arg(node, 2, "inplace", False)), x)
        if t is F.silu or t is _ATEN.silu.default:
            inplace = bool(_arg(node, 1, "inplace", False))
            return Match("silu", "F.silu", inplace, x)
        return None
    if node.op == "call_method":
        x = node.args[0] if node.args else None
        if node.target == "relu":
            return Match("relu", "Tensor.relu", False, x)
        if node.target == "relu_":
            return Match("relu", "Tensor.relu_", True, x)
        return None
    return None


def is_sugar(node: Node) -> bool:
    return node.op == "call_function" and node.target is OP


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

"""What counts as a ReLU (and, for relufy, a GELU or SiLU) in an fx graph, and how it is spelled."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ..method.op import OP

__all__ = ["Match", "match_node", "relu_call", "activation_call", "module_kind", "scripted_sites", "module_path", "is_sugar", "may_alias", "HF_ACTIVATIONS"]

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
    note: str = ""  # what to know about a converted site


_ATEN = torch.ops.aten

# The one table of ReLU spellings, for the fx matcher, the runtime path and the report:
# function -> (spelling, in place). Calls that are ReLU only for some arguments (clamp with
# min=0 and no max, threshold(0, 0)) are checked in ``relu_call``.
_RELU = {
    torch.relu: ("torch.relu", False), torch.relu_: ("torch.relu_", True),
    torch.Tensor.relu: ("Tensor.relu", False), torch.Tensor.relu_: ("Tensor.relu_", True),
    _ATEN.relu.default: ("aten.relu", False), _ATEN.relu_.default: ("aten.relu_", True),
}
_CLAMP = {  # clamp(input, min=None, max=None): ReLU when min == 0 and max is None
    torch.clamp: ("torch.clamp(min=0)", False), torch.Tensor.clamp: ("Tensor.clamp(min=0)", False),
    torch.clamp_: ("torch.clamp_(min=0)", True), torch.Tensor.clamp_: ("Tensor.clamp_(min=0)", True),
    _ATEN.clamp.default: ("aten.clamp(min=0)", False),
}
_CLAMP_MIN = {  # clamp_min(input, min): ReLU when min == 0
    torch.clamp_min: ("torch.clamp_min(0)", False), torch.Tensor.clamp_min: ("Tensor.clamp_min(0)", False),
    torch.clamp_min_: ("torch.clamp_min_(0)", True), torch.Tensor.clamp_min_: ("Tensor.clamp_min_(0)", True),
    _ATEN.clamp_min.default: ("aten.clamp_min(0)", False),
}
_THRESHOLD = {  # threshold(input, threshold, value): ReLU when both are 0, but for the sign of -0.0
    F.threshold: ("F.threshold(0, 0)", None), torch.threshold: ("torch.threshold(0, 0)", False),
    F.threshold_: ("F.threshold_(0, 0)", True), torch.threshold_: ("torch.threshold_(0, 0)", True),
}
THRESHOLD_NOTE = "threshold(x, 0, 0) gives +0.0 where ReLU keeps -0.0: values equal, the sign of a zero may differ"


def _given(args, kwargs, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def relu_call(func, args, kwargs) -> tuple[str, bool] | None:
    """``(spelling, in place)`` if calling ``func(*args, **kwargs)`` computes ReLU, else None.

    ReLU in all its spellings, and in all but name: ``clamp(min=0)`` with no max and
    ``clamp_min(0)`` (bit for bit ReLU), ``threshold(x, 0, 0)`` (ReLU but for the sign of
    -0.0). ``relu6`` and ``clamp(0, 6)`` are not ReLU.
    """
    kwargs = kwargs or {}
    if func is F.relu:
        inplace = bool(_given(args, kwargs, 1, "inplace", False))
        return ("F.relu(inplace=True)" if inplace else "F.relu"), inplace
    if func in _RELU:
        return _RELU[func]
    if func in _CLAMP:
        if _zero(_given(args, kwargs, 1, "min")) and _given(args, kwargs, 2, "max") is None:
            return _CLAMP[func]
        return None
    if func in _CLAMP_MIN:
        return _CLAMP_MIN[func] if _zero(_given(args, kwargs, 1, "min")) else None
    if func in _THRESHOLD:
        if _zero(_given(args, kwargs, 1, "threshold")) and _zero(_given(args, kwargs, 2, "value")):
            spelling, inplace = _THRESHOLD[func]
            if inplace is None:
                inplace = bool(_given(args, kwargs, 3, "inplace", False))
            return spelling, inplace
    return None


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
        hit = relu_call(t, node.args, node.kwargs)
        if hit is not None:
            return Match("relu", hit[0], hit[1], x, THRESHOLD_NOTE if t in _THRESHOLD else "")
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
        hit = relu_call(getattr(torch.Tensor, str(node.target), None), node.args, node.kwargs)
        return Match("relu", hit[0], hit[1], x) if hit is not None else None
    return None


def activation_call(func, args, kwargs) -> tuple[str, str, bool] | None:
    """``(kind, spelling, in place)`` if ``func(*args, **kwargs)`` is an activation sugarize
    converts (ReLU in every spelling) or can relufy (GELU, SiLU), else None: the runtime
    path's view of the spelling table."""
    kwargs = kwargs or {}
    hit = relu_call(func, args, kwargs)
    if hit is not None:
        return "relu", hit[0], hit[1]
    if func is F.gelu or func is _ATEN.gelu.default:
        tanh = _given(args, kwargs, 1, "approximate", "none") == "tanh"
        return ("gelu_tanh", "F.gelu(approximate='tanh')", False) if tanh else ("gelu", "F.gelu", False)
    if func is F.silu or func is _ATEN.silu.default:
        inplace = bool(_given(args, kwargs, 1, "inplace", False)) if func is F.silu else False
        return "silu", "F.silu", inplace
    return None


MODULE_KINDS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.LeakyReLU: "leaky_relu"}


def module_kind(module: nn.Module) -> str | None:
    """The activation an activation *module* computes (``nn.ReLU``, ``nn.GELU``, HF's classes...), or None."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    for cls, kind in MODULE_KINDS.items():
        if type(module) is cls:
            return kind
    return HF_ACTIVATIONS.get(type(module).__name__)


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

"""The activation rule table: one row per activation kind, for every capture path.

A row says how the kind is recognised (torch module classes, Hugging Face activation classes
by class identity, function and method spellings) and what sugarize does with it (convert,
relufy with which surrogate, or leave alone and why). The fx matcher, the module swap, the
run-time call catcher, the config, inspect and the audit all read this table: a new kind is
one row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "relu_call", "call_match", "module_match", "hf_kind",
           "relufy_kinds", "FUNCTION_NAMES", "THRESHOLD_NOTE"]

_ATEN = torch.ops.aten


def _given(args, kwargs, index: int, name: str, default=None):
    return args[index] if len(args) > index else (kwargs or {}).get(name, default)


def _zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _is_module_call(mod: nn.Module, cls: type) -> bool:
    # A subclass that overrides forward computes something else: never matched.
    return isinstance(mod, cls) and type(mod).forward is cls.forward


# ---- ReLU: every spelling, and ReLU in all but name -------------------------------------------

_RELU = {  # function -> (spelling, in place)
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


def relu_call(func, args, kwargs) -> tuple[str, bool] | None:
    """``(spelling, in place)`` if calling ``func(*args, **kwargs)`` computes ReLU, else None.

    ReLU in all its spellings, and in all but name: ``clamp(min=0)`` with no max and
    ``clamp_min(0)`` (bit for bit ReLU), ``threshold(x, 0, 0)`` (ReLU but for the sign of
    -0.0). ``relu6`` and ``clamp(0, 6)`` are not ReLU.
    """
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


def _relu_module(mod):
    if _is_module_call(mod, nn.ReLU):
        return ("nn.ReLU(inplace=True)" if mod.inplace else "nn.ReLU"), mod.inplace
    return None


def _gelu_call(tanh: bool):
    def match(func, args, kwargs):
        if func is F.gelu or func is _ATEN.gelu.default:
            if (_given(args, kwargs, 1, "approximate", "none") == "tanh") == tanh:
                return ("F.gelu(approximate='tanh')" if tanh else "F.gelu"), False
        return None
    return match


def _gelu_module(tanh: bool):
    def match(mod):
        if _is_module_call(mod, nn.GELU) and (mod.approximate == "tanh") == tanh:
            return ("nn.GELU(approximate='tanh')" if tanh else "nn.GELU"), False
        return None
    return match


def _silu_call(func, args, kwargs):
    if func is F.silu:
        return "F.silu", bool(_given(args, kwargs, 1, "inplace", False))
    if func is _ATEN.silu.default:
        return "F.silu", False
    return None


def _simple_module(cls: type, spelling: str):
    def match(mod):
        return (spelling, bool(getattr(mod, "inplace", False))) if _is_module_call(mod, cls) else None
    return match


def _simple_call(spelling: str, inplace_index: int | None, *funcs):
    def match(func, args, kwargs):
        if any(func is f for f in funcs):
            inplace = inplace_index is not None and bool(_given(args, kwargs, inplace_index, "inplace", False))
            return spelling, inplace
        return None
    return match


@dataclass(frozen=True)
class Activation:
    """One activation kind.

    Attributes:
        kind: the name reports and the config use ("relu", "gelu", "gelu_tanh", "silu", ...).
        call: ``(func, args, kwargs) -> (spelling, in place) | None``: a function or method call.
        module: ``(module) -> (spelling, in place) | None``: a torch activation module.
        hf_classes: Hugging Face ``transformers.activations`` class names of this kind, matched
            by class identity (a look-alike class elsewhere is never taken for one).
        hf_names: ``ACT2FN`` keys that mean this kind, as a config's activation field spells it.
        relufy: the ``relufy=`` word that selects it (None: ReLU itself, or never relufied).
        surrogate: the surrogate of a relufied site: the activation's own derivative.
        skip: why sites of this kind are never converted ("" where they can be).
        names: the function and method names it is called by (``F.gelu``: "gelu"), for reading code.
    """

    kind: str
    call: Callable
    module: Callable
    hf_classes: tuple[str, ...] = ()
    hf_names: tuple[str, ...] = ()
    relufy: str | None = None
    surrogate: str | None = None
    skip: str = ""
    names: tuple[str, ...] = ()


_RELU_NAMES = tuple(sorted({f.__name__ for table in (_RELU, _CLAMP, _CLAMP_MIN, _THRESHOLD) for f in table
                            if not isinstance(f, torch._ops.OpOverload)} | {"relu"}))

ACTIVATIONS: dict[str, Activation] = {a.kind: a for a in (
    Activation("relu", relu_call, _relu_module, hf_names=("relu",), names=_RELU_NAMES),
    Activation("gelu", _gelu_call(False), _gelu_module(False), ("GELUActivation",), ("gelu", "gelu_python"),
               relufy="gelu", surrogate="gelu", names=("gelu",)),
    Activation("gelu_tanh", _gelu_call(True), _gelu_module(True),
               ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"),
               ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast"), relufy="gelu", surrogate="gelu_tanh",
               names=("gelu",)),
    Activation("silu", _silu_call, _simple_module(nn.SiLU, "nn.SiLU"), ("SiLUActivation",), ("silu", "swish"),
               relufy="silu", surrogate="silu", names=("silu",)),
    Activation("relu6", _simple_call("F.relu6", None, F.relu6, _ATEN.relu6.default), _simple_module(nn.ReLU6, "nn.ReLU6"),
               hf_names=("relu6",), skip="ReLU6 clamps at 6: not a ReLU, left as is", names=("relu6",)),
    Activation("leaky_relu", _simple_call("F.leaky_relu", 2, F.leaky_relu, _ATEN.leaky_relu.default),
               _simple_module(nn.LeakyReLU, "nn.LeakyReLU"), hf_names=("leaky_relu",),
               skip="LeakyReLU already has a gradient for x < 0: left as is", names=("leaky_relu",)),
)}

# Names under which the functions of the table are called (``F.relu``, ``x.clamp_min``...): a
# forward whose code names none of them makes no functional activation call of its own.
FUNCTION_NAMES = frozenset(name for row in ACTIVATIONS.values() for name in row.names)


def call_match(func, args, kwargs) -> tuple[str, str, bool] | None:
    """``(kind, spelling, in place)`` if ``func(*args, **kwargs)`` is an activation of the table."""
    for row in ACTIVATIONS.values():
        hit = row.call(func, args, kwargs or {})
        if hit is not None:
            return row.kind, hit[0], hit[1]
    return None


def _hf_classes() -> dict[type, str]:
    """Hugging Face activation class -> kind, by identity; empty while transformers is not imported
    (no instance of its classes can exist then, so nothing is imported for a plain torch model)."""
    module = sys.modules.get("transformers.activations")
    if module is None:
        return {}
    out = {}
    for row in ACTIVATIONS.values():
        for name in row.hf_classes:
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                out[cls] = row.kind
    return out


def hf_kind(module: nn.Module) -> str | None:
    """The kind of a Hugging Face activation module (its exact class, from transformers), or None."""
    return _hf_classes().get(type(module))


def module_match(module: nn.Module) -> tuple[str, str, bool] | None:
    """``(kind, spelling, in place)`` if ``module`` is an activation module of the table."""
    for row in ACTIVATIONS.values():
        hit = row.module(module)
        if hit is not None:
            return row.kind, hit[0], hit[1]
    kind = hf_kind(module)
    return (kind, type(module).__name__, False) if kind is not None else None


def relufy_kinds(word: str) -> list[str]:
    """The kinds a ``relufy=`` word selects ("gelu": both GELU forms)."""
    return [row.kind for row in ACTIVATIONS.values() if row.relufy == word]

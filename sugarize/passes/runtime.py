"""The runtime path: SUGAR for models no tracer can capture, and ReLU call counting.

``torch.fx.symbolic_trace`` fails on data-dependent control flow, iteration over inputs and
much of Hugging Face's code. The runtime path needs no graph: a ``TorchFunctionMode``,
active while the model's own ``forward`` runs (forward hooks on the root module), turns each
ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``relu_``, ``Tensor.relu``, ``clamp(min=0)``...) into the
SUGAR op as it executes, whatever the control flow. The model keeps its class, call
signature, outputs and ``state_dict`` keys; ``strip`` removes the hooks.

Costs, measured in benchmarks/results/perf.md: a Python call per torch function inside the
forward. Limits: ``include``/``exclude`` and relufication need a graph (module paths are not
known here), so this path converts every ReLU call.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..method.op import OP
from ..modes import eval_mode
from .match import relu_call

__all__ = ["ReluCounter", "RuntimeSugar", "attach", "detach", "count_relu_calls", "is_runtime"]

class ReluCounter(TorchFunctionMode):
    """Counts ReLU calls (by module path and spelling) and SUGAR op calls while active.

    Changes nothing. ``root`` (optional) names the module whose submodule paths are
    recorded: process-wide module hooks keep a stack of the modules running.
    """

    def __init__(self, root: nn.Module | None = None):
        super().__init__()
        self.relu: dict[str, int] = {}
        self.sites: dict[tuple[str, str], int] = {}
        self.sugar = 0
        self._names = {id(m): n for n, m in root.named_modules()} if root is not None else {}
        self._stack: list[str] = []
        self._handles: list = []

    def __enter__(self):
        if self._names:
            from torch.nn.modules.module import (
                register_module_forward_hook, register_module_forward_pre_hook,
            )

            def push(module, args):
                self._stack.append(self._names.get(id(module), self._stack[-1] if self._stack else ""))

            def pop(module, args, output):
                if self._stack:
                    self._stack.pop()

            self._handles = [register_module_forward_pre_hook(push),
                             register_module_forward_hook(pop, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = relu_call(func, args, kwargs)
        if hit is not None:
            spelling = hit[0]
            self.relu[spelling] = self.relu.get(spelling, 0) + 1
            key = (self._stack[-1] if self._stack else "", spelling)
            self.sites[key] = self.sites.get(key, 0) + 1
        elif func is OP or func is OP.overloadpacket:
            self.sugar += 1
        return func(*args, **kwargs)

    @property
    def relu_calls(self) -> int:
        return sum(self.relu.values())


def count_relu_calls(model: nn.Module, args=(), kwargs=None) -> ReluCounter:
    """Runs ``model(*args, **kwargs)`` once in eval mode without grad and counts its calls."""
    counter = ReluCounter(model)
    with torch.no_grad(), eval_mode(model), counter:
        model(*args, **(kwargs or {}))
    return counter


class _SugarMode(TorchFunctionMode):
    def __init__(self, options: tuple):
        super().__init__()
        self.options = options

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = relu_call(func, args, kwargs)
        if hit is not None:
            x = args[0] if args else kwargs["input"]
            y = OP(x, *self.options)
            return x.copy_(y) if hit[1] else y
        return func(*args, **kwargs)


class RuntimeSugar:
    """Forward pre-hook and hook pair (picklable) that run the root's forward under SUGAR."""

    def __init__(self, surrogate: str, params: list[float], negative_only: bool, save: str):
        self.options = (surrogate, list(params), bool(negative_only), save)
        self._modes: list[_SugarMode] = []

    def __getstate__(self):
        return {"options": self.options}

    def __setstate__(self, state):
        self.options, self._modes = state["options"], []

    def enter(self, module, args):
        mode = _SugarMode(self.options)
        mode.__enter__()
        self._modes.append(mode)

    def exit(self, module, args, output):
        if self._modes:
            self._modes.pop().__exit__(None, None, None)


_ATTR = "_sugarize_runtime"


def attach(model: nn.Module, surrogate: str, params: list[float], negative_only: bool, save: str) -> RuntimeSugar:
    """In place: ``model``'s forward runs with every ReLU call as SUGAR."""
    hooks = RuntimeSugar(surrogate, params, negative_only, save)
    model.register_forward_pre_hook(hooks.enter)
    model.register_forward_hook(hooks.exit, always_call=True)
    object.__setattr__(model, _ATTR, hooks)
    return hooks


def is_runtime(model: nn.Module) -> bool:
    return isinstance(getattr(model, _ATTR, None), RuntimeSugar)


def detach(model: nn.Module) -> bool:
    """In place: removes the runtime SUGAR hooks; False if there were none."""
    hooks = getattr(model, _ATTR, None)
    if not isinstance(hooks, RuntimeSugar):
        return False
    for registry in (model._forward_pre_hooks, model._forward_hooks):
        for key, fn in list(registry.items()):
            if getattr(fn, "__self__", None) is hooks:
                del registry[key]
                model._forward_hooks_always_called.pop(key, None)
    object.__delattr__(model, _ATTR)
    return True

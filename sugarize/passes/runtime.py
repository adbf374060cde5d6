"""The runtime path: SUGAR for models no tracer can capture, and activation call counting.

``torch.fx.symbolic_trace`` fails on data-dependent control flow, iteration over inputs and
much of Hugging Face's code. The runtime path needs no graph: a ``TorchFunctionMode``,
active while the model's own ``forward`` runs (forward hooks on the root module), turns each
activation call into the SUGAR op as it executes, whatever the control flow.

Each call is decided by the module it runs in: process-wide module hooks, active only during
the root's forward, keep a stack of the running submodules' paths, so ``include``,
``exclude`` and ``relufy`` select sites by module path exactly as on the fx path
(``SugarConfig.decide``). ReLU in every spelling and the functional GELU/SiLU are converted
where they are called; Hugging Face's activation classes (``NewGELUActivation``...), which
compute their formula in several calls, are converted whole: their output is replaced by the
SUGAR op of their input. The model keeps its class, call signature, outputs and
``state_dict`` keys; ``strip`` removes the hooks.

Costs, measured in benchmarks/results/perf.md: a Python call per torch function inside the
forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..method.op import OP
from ..modes import eval_mode
from .config import SugarConfig
from .match import HF_ACTIVATIONS, activation_call

__all__ = ["ActivationCounter", "ReluCounter", "RuntimeSugar", "attach", "detach", "count_relu_calls", "is_runtime"]

_WHOLE = "<whole module>"  # stack marker: inside an activation module converted whole


class _ModuleStack(TorchFunctionMode):
    """A TorchFunctionMode that knows, at each call, the path of the submodule running it."""

    def __init__(self, root: nn.Module | None = None):
        super().__init__()
        self._names = {id(m): name for name, m in root.named_modules()} if root is not None else {}
        self._stack: list[str] = []
        self._handles: list = []

    @property
    def path(self) -> str:
        return self._stack[-1] if self._stack else ""

    def _push(self, module, args):
        self._stack.append(self._names.get(id(module), self.path))

    def _pop(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def __enter__(self):
        if self._names:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            self._handles = [register_module_forward_pre_hook(self._push),
                             register_module_forward_hook(self._pop, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return super().__exit__(*exc)


class ActivationCounter(_ModuleStack):
    """Counts activation calls by (module path, spelling, kind), and SUGAR op calls, while active.

    Changes nothing. ``root`` (optional) names the module whose submodule paths are recorded."""

    def __init__(self, root: nn.Module | None = None):
        super().__init__(root)
        self.sites: dict[tuple[str, str, str], int] = {}
        self.sugar = 0

    def _push(self, module, args):
        super()._push(module, args)
        kind = HF_ACTIVATIONS.get(type(module).__name__)
        if kind is not None:  # counted whole, as the runtime path converts it
            key = (self.path, type(module).__name__, kind)
            self.sites[key] = self.sites.get(key, 0) + 1
            self._stack.append(_WHOLE)

    def _pop(self, module, args, output):
        if HF_ACTIVATIONS.get(type(module).__name__) is not None and self._stack:
            self._stack.pop()
        super()._pop(module, args, output)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = activation_call(func, args, kwargs)
        if hit is not None and self.path != _WHOLE:
            key = (self.path, hit[1], hit[0])
            self.sites[key] = self.sites.get(key, 0) + 1
        elif func is OP or func is OP.overloadpacket:
            self.sugar += 1
        return func(*args, **kwargs)

    def calls(self, kind: str = "relu") -> int:
        return sum(n for (_, _, k), n in self.sites.items() if k == kind)

    @property
    def relu_calls(self) -> int:
        return self.calls("relu")

    @property
    def relu(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, spelling, kind), n in self.sites.items():
            if kind == "relu":
                out[spelling] = out.get(spelling, 0) + n
        return out


ReluCounter = ActivationCounter  # the name earlier releases exported


def count_relu_calls(model: nn.Module, args=(), kwargs=None) -> ActivationCounter:
    """Runs ``model(*args, **kwargs)`` once in eval mode without grad and counts its calls."""
    counter = ActivationCounter(model)
    with torch.no_grad(), eval_mode(model), counter:
        model(*args, **(kwargs or {}))
    return counter


class _SugarMode(_ModuleStack):
    """Turns each selected activation call into the SUGAR op, by the module it runs in."""

    def __init__(self, root: nn.Module, config: SugarConfig):
        # Module paths matter only when the config selects by path or relufies; without them no
        # module hooks are installed (the cheapest path, and the one torch.compile traces best).
        by_path = bool(config.include or config.exclude or config.relufy)
        super().__init__(root if by_path else None)
        self.config = config
        self._options: dict[tuple[str, str], tuple | None] = {}

    def options_for(self, kind: str, path: str) -> tuple | None:
        """The SUGAR op's options for a site, or None where the config leaves it alone."""
        key = (kind, path)
        if key not in self._options:
            convert, _ = self.config.decide(kind, path)
            surrogate, params = self.config.surrogate_for(kind) if convert else (None, None)
            self._options[key] = (surrogate, list(params), bool(self.config.negative_only),
                                  self.config.save) if convert else None
        return self._options[key]

    def _push(self, module, args):
        super()._push(module, args)
        kind = HF_ACTIVATIONS.get(type(module).__name__)
        if kind is not None and self.options_for(kind, self.path) is not None:
            self._stack.append(_WHOLE)  # converted whole in _pop: its inner calls stay as they are

    def _pop(self, module, args, output):
        kind = HF_ACTIVATIONS.get(type(module).__name__)
        replaced = None
        if kind is not None and self._stack and self._stack[-1] == _WHOLE:
            self._stack.pop()
            replaced = self._activation(args[0], self.options_for(kind, self.path))
        super()._pop(module, args, output)
        return replaced

    def _activation(self, x: torch.Tensor, options: tuple) -> torch.Tensor:
        """What a converted site computes: the SUGAR op."""
        return OP(x, *options)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = activation_call(func, args, kwargs)
        if hit is not None and self.path != _WHOLE:
            options = self.options_for(hit[0], self.path)
            if options is not None:
                x = args[0] if args else kwargs["input"]
                y = self._activation(x, options)
                return x.copy_(y) if hit[2] else y
        return func(*args, **kwargs)


class RuntimeSugar:
    """Forward pre-hook and hook pair (picklable) that run the root's forward under SUGAR."""

    mode = _SugarMode

    def __init__(self, config: SugarConfig):
        self.config = config
        self._modes: list[_SugarMode] = []

    def __getstate__(self):
        return {"config": self.config.to_dict()}

    def __setstate__(self, state):
        self.config, self._modes = SugarConfig.from_dict(state["config"]), []

    def enter(self, module, args):
        mode = self.mode(module, self.config)
        mode.__enter__()
        self._modes.append(mode)

    def exit(self, module, args, output):
        if self._modes:
            self._modes.pop().__exit__(None, None, None)


_ATTR = "_sugarize_runtime"


def attach(model: nn.Module, config: SugarConfig) -> RuntimeSugar:
    """In place: ``model``'s forward runs with every activation call ``config`` selects as SUGAR."""
    hooks = RuntimeSugar(config)
    model.register_forward_pre_hook(hooks.enter)
    model.register_forward_hook(hooks.exit, always_call=True)
    object.__setattr__(model, _ATTR, hooks)
    return hooks


def is_runtime(model: nn.Module) -> bool:
    """Whether ``model`` computes SUGAR on the runtime path (not a stripped model's ReLU hooks)."""
    hooks = getattr(model, _ATTR, None)
    return isinstance(hooks, RuntimeSugar) and not isinstance(hooks, RuntimeRelu)


class _ReluMode(_SugarMode):
    """What strip leaves of a relufied runtime model: the relufied calls stay plain ReLU."""

    def options_for(self, kind: str, path: str) -> tuple | None:
        return None if kind == "relu" else super().options_for(kind, path)

    def _activation(self, x: torch.Tensor, options: tuple) -> torch.Tensor:
        return torch.relu(x)


class RuntimeRelu(RuntimeSugar):
    """Hooks of a stripped relufied model: its relufied activations compute plain ReLU (no SUGAR)."""

    mode = _ReluMode


def detach(model: nn.Module) -> bool:
    """In place: removes the runtime SUGAR hooks; False if there were none. Relufied sites stay
    ReLU (``RuntimeRelu`` hooks take their place): their forward was changed on purpose."""
    hooks = getattr(model, _ATTR, None)
    if not isinstance(hooks, RuntimeSugar) or isinstance(hooks, RuntimeRelu):
        return False
    for registry in (model._forward_pre_hooks, model._forward_hooks):
        for key, fn in list(registry.items()):
            if getattr(fn, "__self__", None) is hooks:
                del registry[key]
                model._forward_hooks_always_called.pop(key, None)
    object.__delattr__(model, _ATTR)
    if hooks.config.relufy:
        relu = RuntimeRelu(hooks.config)
        model.register_forward_pre_hook(relu.enter)
        model.register_forward_hook(relu.exit, always_call=True)
        object.__setattr__(model, _ATTR, relu)
    return True

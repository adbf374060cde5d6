"""Run-time call capture: functional activation calls (``F.relu(x)``, ``x.clamp(min=0)``...) made
inside a forward that no tracer can capture, converted as they run; and activation call counting.

Only where a forward makes such calls: ``makes_calls`` reads each module's forward code (and the
plain functions it names) for the rule table's function names, and its attributes for activation
functions (``self.act = F.relu``). Those modules and their submodules get forward hooks of their
own (never process-wide hooks): while one of them runs, a ``TorchFunctionMode`` converts each
activation call by the path of the innermost module running it (``SugarConfig.decide``, the rule
of every path). The state is per thread: two models converted differently, run in two threads at
once, each compute their own.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import threading
import types

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..method.module import SugarActivation
from ..method.op import OP
from ..modes import eval_mode
from .capture import private_copy
from .activations import ACTIVATIONS, FUNCTION_NAMES, call_match, module_match
from .config import SugarConfig
from .report import Site

__all__ = ["NAME", "find", "convert", "convert_", "strip_", "count", "instrument", "makes_calls", "call_roots", "CallCatcher",
           "attach", "detach", "catchers", "ActivationRecorder", "count_calls", "call_sites", "with_calls"]

NAME = "calls"


def _names(code: types.CodeType) -> set[str]:
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _names(const)
    return out


def _code_calls(fn, depth: int, wanted: frozenset, cls: type) -> bool:
    """Whether ``fn``'s code names a function of ``wanted``, or a plain function or a method of
    ``cls`` it names does (``depth`` levels down)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    names = _names(code)
    if names & wanted:
        return True
    scope = getattr(fn, "__globals__", {})
    callees = (scope.get(n, getattr(cls, n, None)) for n in names)
    return depth > 0 and any(
        _code_calls(g, depth - 1, wanted, cls) for g in callees
        if isinstance(g, types.FunctionType) and not (g.__module__ or "").startswith("torch"))


def _activation_function(value, wanted: frozenset) -> bool:
    return callable(value) and getattr(value, "__name__", None) in wanted and \
        (getattr(value, "__module__", None) or "").startswith("torch")


def makes_calls(module: nn.Module, wanted: frozenset = FUNCTION_NAMES) -> bool:
    """Whether ``module``'s own forward may call an activation function: its code (or a plain
    function it names, two levels down) names one of the table's functions, or it holds one as
    an attribute. Activation modules are captured as modules, not here."""
    if isinstance(module, SugarActivation) or module_match(module) is not None:
        return False
    if any(_activation_function(v, wanted) for v in module.__dict__.values()):
        return True
    forward = type(module).forward
    return forward is not nn.Module.forward and _code_calls(forward, 3, wanted, type(module))


def call_roots(model: nn.Module, wanted: frozenset = FUNCTION_NAMES) -> list[str]:
    """Paths of the outermost modules whose forward calls a function named in ``wanted`` ("" is the model)."""
    roots: list[str] = []
    for path, module in model.named_modules():
        if any(path == r or path.startswith(f"{r}.") or r == "" for r in roots):
            continue
        if makes_calls(module, wanted):
            roots.append(path)
    return roots


class _CallMode(TorchFunctionMode):
    def __init__(self, catcher: "CallCatcher", stack: list[str]):
        super().__init__()
        self.catcher, self.stack = catcher, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = call_match(func, args, kwargs)
        if hit is not None and self.stack:
            options = self.catcher.options_for(hit[0], self.stack[-1])
            if options is not None:
                x = args[0] if args else kwargs["input"]
                y = self.catcher.compute(x, options)
                return x.copy_(y) if hit[2] else y
        return func(*args, **kwargs)


class CallCatcher:
    """Hooks (picklable) that run some modules' forwards with their activation calls converted.

    ``relu_only``: what strip leaves of relufied calls: they compute plain ReLU, nothing else."""

    def __init__(self, config: SugarConfig, roots: tuple[str, ...] = (), relu_only: bool = False):
        self.config, self.roots, self.relu_only = config, tuple(roots), relu_only
        self._local = threading.local()
        self._options: dict[tuple[str, str], OpOptions | None] = {}

    def __getstate__(self):
        return {"config": self.config.to_dict(), "roots": list(self.roots), "relu_only": self.relu_only}

    def __setstate__(self, state):
        self.__init__(SugarConfig.from_dict(state["config"]), tuple(state["roots"]), state["relu_only"])

    def options_for(self, kind: str, path: str) -> OpOptions | None:
        """The SUGAR op's options for a call of ``kind`` in module ``path``; None: left as it is."""
        key = (kind, path)
        if key not in self._options:
            convert = self.config.decide(kind, path)[0] and not (self.relu_only and kind == "relu")
            self._options[key] = self.config.op_options(kind) if convert else None
        return self._options[key]

    def compute(self, x: torch.Tensor, options: OpOptions) -> torch.Tensor:
        return torch.relu(x) if self.relu_only else OP(x, *options.args)

    def _state(self):
        local = self._local
        if not hasattr(local, "stack"):
            local.stack, local.mode = [], None
        return local

    def enter(self, path: str, module, args):
        state = self._state()
        if not state.stack:
            state.mode = _CallMode(self, state.stack)
            state.mode.__enter__()
        state.stack.append(path)

    def exit(self, path: str, module, args, output):
        state = self._state()
        if state.stack:
            state.stack.pop()
        if not state.stack and state.mode is not None:
            mode, state.mode = state.mode, None
            mode.__exit__(None, None, None)


def attach(root: nn.Module, config: SugarConfig, roots: list[str], relu_only: bool = False) -> CallCatcher | None:
    """In place: the modules at ``roots`` (and their submodules) run with activation calls converted."""
    if not roots:
        return None
    catcher = CallCatcher(config, tuple(roots), relu_only)
    for path, module in root.named_modules():
        if isinstance(module, SugarActivation) or not any(
                r == "" or path == r or path.startswith(f"{r}.") for r in roots):
            continue
        module.register_forward_pre_hook(functools.partial(catcher.enter, path))
        module.register_forward_hook(functools.partial(catcher.exit, path), always_call=True)
    return catcher


def find(model: nn.Module, cfg: SugarConfig, status: str = "convertible") -> list[Site]:
    """Functional calls are seen only as they run: nothing to list without inputs (``count_calls``
    and ``call_sites`` list them from example inputs)."""
    return []


def convert(model: nn.Module, cfg: SugarConfig, *, copy: bool = True) -> tuple[nn.Module, list[Site]]:
    """``model`` (a deep copy, or with ``copy=False`` a tree clone sharing its tensors) with the
    forwards that make activation calls hooked to convert them as they run. Its sites are listed
    once example inputs are counted (``call_sites``)."""
    root = private_copy(model, copy)
    return root, convert_(root, cfg)


def convert_(root: nn.Module, cfg: SugarConfig) -> list[Site]:
    """In place on a model private to the pass (the module path's result): hooks the forwards
    that make activation calls. An already converted model keeps the catchers it has."""
    if not catchers(root):
        attach(root, cfg, call_roots(root))
    return []


def strip_(model: nn.Module) -> list[Site]:
    """In place: removes the call catchers. Relufied functional calls stay ReLU through a
    ``relu_only`` catcher (their forward was changed on purpose and a Python forward that calls
    ``F.gelu`` cannot be rewritten): a warning names where the user's code must say ``relu``."""
    from ..errors import SugarizeWarning

    sites = []
    for catcher in detach(model):
        if catcher.relu_only:  # a stripped model's, stripped again: it stays (strip is idempotent)
            attach(model, catcher.config, list(catcher.roots), relu_only=True)
            continue
        for root in catcher.roots:
            sites.append(Site(root, "functional calls", "relu", "", "stripped", capture=NAME))
        names = frozenset(n for kind in catcher.config.relufy for n in ACTIVATIONS[kind].names)
        relufied = [r for r in catcher.roots if names and call_roots(model.get_submodule(r), names)]
        if relufied:
            attach(model, catcher.config, relufied, relu_only=True)
            where = ", ".join(r or "<model>" for r in relufied)
            warnings.warn(f"relufied functional calls ({', '.join(catcher.config.relufy)}) in the forward of {where} "
                          "compute ReLU only through a sugarize hook: to ship a standard model, change those calls "
                          "to F.relu in your code (activation modules need no change)", SugarizeWarning, stacklevel=3)
    return sites


def instrument(model: nn.Module, record):
    """``model`` itself, recording each functional activation call (outside activation modules)."""
    return ActivationRecorder(model, record, modules=False).running()


def _hooks(module: nn.Module):
    for registry in (module._forward_pre_hooks, module._forward_hooks):
        for key, fn in list(registry.items()):
            if isinstance(fn, functools.partial) and isinstance(getattr(fn.func, "__self__", None), CallCatcher):
                yield registry, key, fn.func.__self__


def catchers(model: nn.Module) -> list[CallCatcher]:
    """The call catchers hooked anywhere in ``model``, each once."""
    seen: dict[int, CallCatcher] = {}
    for module in model.modules():
        for _, _, catcher in _hooks(module):
            seen.setdefault(id(catcher), catcher)
    return list(seen.values())


def count(model: nn.Module) -> int:
    """SUGAR sites of this path, as ``strip_`` reports them: each hooked forward whose code names
    an activation function its catcher converts (ReLU's spellings, and the relufied kinds'); a
    stripped model's ``relu_only`` catchers compute no SUGAR and count none. Read from the code,
    without running it: a forward that names ``F.relu`` on a path it never takes still counts."""
    n = 0
    for catcher in catchers(model):
        if catcher.relu_only:
            continue
        kinds = ("relu",) + tuple(catcher.config.relufy)
        names = frozenset(name for kind in kinds if kind in ACTIVATIONS for name in ACTIVATIONS[kind].names)
        for root in catcher.roots:
            try:
                module = model.get_submodule(root)
            except AttributeError:  # a catcher of the model this one is part of
                continue
            n += bool(call_roots(module, names))
    return n


def detach(model: nn.Module) -> list[CallCatcher]:
    """In place: removes every call catcher's hooks from ``model``; returns the catchers removed."""
    removed: dict[int, CallCatcher] = {}
    for module in model.modules():
        for registry, key, catcher in list(_hooks(module)):
            del registry[key]
            module._forward_hooks_always_called.pop(key, None)
            removed.setdefault(id(catcher), catcher)
    return list(removed.values())


_WHOLE = object()  # stack marker: inside an activation module, counted whole


class ActivationRecorder(TorchFunctionMode):
    """Counts (and, with ``record``, hands over the input and output of) every activation call and
    activation module run in ``root``'s forward, by module path, in this thread only.

    Changes nothing: its hooks are ``root``'s own and removed on exit. Activation modules
    (``nn.ReLU``, ``SugarActivation``, Hugging Face's classes) count as one site each, whole.
    ``sites`` maps ``(path, spelling, kind, capture)`` to calls; ``sugar`` counts SUGAR calls."""

    def __init__(self, root: nn.Module, record=None, *, modules: bool = True, calls: bool = True):
        super().__init__()
        self.root, self.record = root, record
        self.modules, self.calls_ = modules, calls
        self._names = {id(m): name for name, m in root.named_modules()}
        self._stack: list = []
        self._handles: list = []
        self._pending: list = []
        self.sites: dict[tuple[str, str, str, str], int] = {}
        self.sugar = 0

    @property
    def path(self) -> str:
        return next((p for p in reversed(self._stack) if p is not _WHOLE), "")

    def _hit(self, key, x, y):
        if not (self.modules if key[3] == "modules" else self.calls_):
            return
        self.sites[key] = self.sites.get(key, 0) + 1
        if key[2] == "sugar":
            self.sugar += 1
        if self.record is not None:
            self.record(key[:3], x, y)

    def _push(self, module, args):
        if threading.get_ident() != self._thread:
            return
        if self._stack and self._stack[-1] is _WHOLE:
            self._stack.append(_WHOLE)
            return
        path = self._names.get(id(module), self.path)
        if isinstance(module, SugarActivation):
            key = (path, f"SUGAR {module.options.surrogate}", "sugar", "modules")
        else:
            hit = module_match(module)
            key = (path, hit[1], hit[0], "modules") if hit is not None else None
        self._stack.append(path)
        if key is not None:
            self._pending.append((key, args[0] if args else None))
            self._stack.append(_WHOLE)

    def _pop(self, module, args, output):
        if threading.get_ident() != self._thread or not self._stack:
            return
        if self._stack[-1] is _WHOLE:
            self._stack.pop()
            if self._stack and self._stack[-1] is not _WHOLE:  # the activation module itself ends
                key, x = self._pending.pop()
                self._hit(key, x, output)
            else:
                return
        self._stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._stack and self._stack[-1] is _WHOLE:
            return out
        if func is OP or func is OP.overloadpacket:
            self._hit((self.path, f"SUGAR {args[1]}", "sugar", NAME), args[0], out)
        else:
            hit = call_match(func, args, kwargs)
            if hit is not None:
                self._hit((self.path, hit[1], hit[0], NAME), args[0] if args else kwargs.get("input"), out)
        return out

    def __enter__(self):
        self._thread = threading.get_ident()
        for module in self.root.modules():
            self._handles += [module.register_forward_pre_hook(self._push),
                              module.register_forward_hook(self._pop, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def running(self):
        """The context for an audit: yields the root to run while recording."""
        with self:
            yield self.root

    def calls(self, kind: str = "relu") -> int:
        return sum(n for key, n in self.sites.items() if key[2] == kind)

    def unconverted(self) -> dict[tuple[str, str, str, str], int]:
        return {key: n for key, n in self.sites.items() if key[2] == "relu"}


def count_calls(model: nn.Module, args=(), kwargs=None) -> ActivationRecorder:
    """Runs ``model(*args, **kwargs)`` once in eval mode without grad and counts its activation calls."""
    recorder = ActivationRecorder(model)
    with torch.no_grad(), eval_mode(model), recorder:
        model(*args, **(kwargs or {}))
    return recorder


def with_calls(sites: list[Site], recorder: ActivationRecorder) -> list[Site]:
    """``sites`` (activation modules) with how often each ran in the recorder's forward pass."""
    from dataclasses import replace

    runs: dict[str, int] = {}
    for (path, _, _, capture), n in recorder.sites.items():
        if capture == "modules":
            runs[path] = runs.get(path, 0) + n
    return [replace(s, calls=runs.get(s.path, 0)) if s.capture == "modules" else s for s in sites]


def call_sites(recorder: ActivationRecorder, cfg: SugarConfig, status: str,
               after: ActivationRecorder | None = None) -> list[Site]:
    """One Site per functional call site (path, spelling, kind) a recorder saw, decided by ``cfg``.
    With ``after`` (the converted model's recorder), a selected site the converted model still
    calls is reported skipped, with the reason: what the site says is what the model does."""
    sites = []
    missed = set(after.sites) if after is not None else set()
    for (path, spelling, kind, capture), n in recorder.sites.items():
        if capture != NAME:
            continue
        if kind == "sugar":
            sites.append(Site(path, spelling, "relu", "", "sugar", surrogate=spelling.split(" ", 1)[1], calls=n,
                              capture=NAME))
            continue
        convert, reason = cfg.decide(kind, path)
        if convert and (path, spelling, kind, capture) in missed:
            convert, reason = False, ("not caught at run time: the forward's code does not name the function (called "
                                      "through a variable?); make it an activation module, or call it by name")
        note = ("forward changes: fine-tune needed" if kind != "relu" else "found at run time") if convert else reason
        sites.append(Site(path, spelling, kind, "", status if convert else "skipped", note,
                          cfg.surrogate_for(kind)[0] if convert else "", forward_changed=convert and kind != "relu",
                          calls=n, capture=NAME))
    return sites

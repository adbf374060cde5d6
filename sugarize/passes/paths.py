"""The capture paths and the one interface they share.

A capture path is one module with the same five functions:

- ``find(model, cfg, status="convertible") -> list[Site]``: the sites it sees, nothing changed;
- ``convert(model, cfg, *, copy=True) -> (converted, sites)``: never changes ``model``;
  ``copy=False`` shares its parameters and buffers instead of copying them;
- ``strip_(model) -> list[Site]``: in place, back to standard modules and ops;
- ``count(model) -> int``: the SUGAR sites (or catchers) it left in ``model``;
- ``instrument(model, record)``: a context giving a module to run that calls
  ``record((path, spelling, kind), x, y)`` at each activation, for the audit.

``fx`` (``fxpath``) rewrites a torch.fx graph; ``modules`` (``modulepath``) swaps activation
modules; ``calls`` (``callpath``) converts functional calls as they run, only in the forwards
that make them. ``capture="auto"`` takes fx, and where the model cannot be traced, modules
followed by calls. ``sugarize``, ``inspect``, ``strip``, the audit and export all go through here.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol

import torch.nn as nn

from ..errors import CaptureError
from . import callpath, fusion, fxpath, modulepath
from .match import sugar_options
from .config import SugarConfig
from .report import Site

__all__ = ["CapturePath", "PATHS", "CAPTURES", "convert", "strip_", "count", "holds_sugar", "instrument",
           "op_options", "warmup"]


class CapturePath(Protocol):  # pragma: no cover - the interface, for readers and type checkers
    NAME: str

    def find(self, model: nn.Module, cfg: SugarConfig, status: str = "convertible") -> list[Site]: ...

    def convert(self, model: nn.Module, cfg: SugarConfig, *, copy: bool = True) -> tuple[nn.Module, list[Site]]: ...

    def strip_(self, model: nn.Module) -> list[Site]: ...

    def count(self, model: nn.Module) -> int: ...

    def instrument(self, model: nn.Module, record) -> ContextManager[nn.Module]: ...


PATHS: tuple[CapturePath, ...] = (fxpath, modulepath, callpath)  # type: ignore[assignment]
CAPTURES = ("auto", "fx", "modules")


def convert(model: nn.Module, cfg: SugarConfig, capture: str, *, copy: bool) -> tuple[nn.Module, list[Site], str, str]:
    """``(converted, sites, capture taken, why fx was not)`` for ``capture`` in ``CAPTURES``.

    Raises:
        CaptureError: ``capture="fx"`` and the model cannot be traced.
    """
    why = "capture='modules' was asked for"
    if capture != "modules":
        try:
            out, sites = fxpath.convert(model, cfg, copy=copy)
            return out, sites, fxpath.NAME, ""
        except CaptureError as exc:
            if capture == "fx" or not isinstance(model, nn.Module):
                raise
            why = str(exc).split(". Mark")[0]
    out, sites = modulepath.convert(model, cfg, copy=copy)
    more = callpath.convert_(out, cfg)  # out is already private: hooked in place, not cloned again
    return out, sites + more, modulepath.NAME, why


def strip_(model: nn.Module) -> list[Site]:
    """In place: every path strips what it left in ``model``."""
    return [site for path in PATHS for site in path.strip_(model)]


def count(model: nn.Module) -> int:
    """SUGAR sites in ``model`` on every path: graph nodes, SUGAR modules, and forwards whose
    functional calls a catcher converts."""
    return sum(path.count(model) for path in PATHS)


def holds_sugar(model: nn.Module) -> bool:
    """Whether ``model`` computes SUGAR anywhere: graph nodes, modules, or call catchers."""
    return any(path.count(model) for path in PATHS)


@contextlib.contextmanager
def instrument(model: nn.Module, record):
    """The module to run for the audit: the fx instrumented graph, or, where the model cannot be
    traced, the model itself with its activation modules and calls recorded."""
    with contextlib.ExitStack() as stack:
        try:
            runner = stack.enter_context(fxpath.instrument(model, record))
        except CaptureError:
            runner = stack.enter_context(modulepath.instrument(model, record))
            stack.enter_context(callpath.instrument(model, record))
        yield runner


def op_options(model: nn.Module) -> set[tuple]:
    """The SUGAR op configurations ``(surrogate, params, negative_only, save)`` ``model`` runs."""
    import torch.fx

    from ..method.module import SugarActivation
    from ..method.op import OP

    found: set[tuple] = set()
    for module in model.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.find_nodes(op="call_function", target=OP) + fusion.fused_nodes(module.graph):
                surrogate, params, negative_only, save = sugar_options(node)
                found.add((surrogate, tuple(params), bool(negative_only), save))
        elif isinstance(module, SugarActivation):
            surrogate, params, negative_only, save = module.options
            found.add((surrogate, tuple(params), negative_only, save))
    for catcher in callpath.catchers(model):
        if catcher.relu_only:
            continue
        cfg = catcher.config
        for kind in ("relu",) + cfg.relufy:
            surrogate, params = cfg.surrogate_for(kind)
            found.add((surrogate, tuple(params), bool(cfg.negative_only), cfg.save))
    return found


def warmup(model: nn.Module, dtypes=None, device: str = "cpu") -> dict:
    """Opt-in: compiles the SUGAR op's fused eager kernels for every configuration ``model`` runs,
    now, and turns them on for this process (``sugarize.method.kernels``).

    They are off by default: compiling takes seconds and needs a C++ compiler, and on the CPU
    this project measures on they did not make the steady training step faster
    (``benchmarks/results/first_step.md``). Call this before training if you want them, e.g.
    on a machine where one pass over memory instead of five pays.

    Args:
        model: a converted model (any capture path).
        dtypes: the input dtypes to compile for (default: float32).
        device: "cpu" or "cuda".

    Returns:
        ``{"kernels": configurations compiled, "failed": configurations that could not be,
        "seconds": time taken}``.
    """
    import time

    import torch
    import torch.fx

    from ..method import kernels

    start = time.perf_counter()
    kernels.set_enabled(True)
    done = failed = 0
    for options in sorted(op_options(model), key=repr):
        for dtype in dtypes or (torch.float32,):
            if kernels.compile_for(*options, dtype=dtype, device=device):
                done += 1
            else:
                failed += 1
    fused = {sugar_options(node)[:3] for gm in model.modules() if isinstance(gm, torch.fx.GraphModule)
             for node in fusion.fused_nodes(gm.graph)}
    for surrogate, params, negative_only in sorted(fused, key=repr):  # BatchNorm-fused sites' backward
        for dtype in dtypes or (torch.float32,):
            if kernels.compile_bn_grad_for(surrogate, params, negative_only, dtype=dtype, device=device):
                done += 1
            else:
                failed += 1
    return {"kernels": done, "failed": failed, "seconds": time.perf_counter() - start}


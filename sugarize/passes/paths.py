"""The capture paths: one interface, one ordered registry.

A capture path is an object with a ``NAME`` and these methods:

- ``find(model, cfg, status="convertible") -> list[Site]``: the sites it sees, nothing changed;
- ``inspect(model, cfg, example_args) -> (sites, notes)``: ``find`` with what a user should know;
- ``convert(model, cfg, *, copy=True) -> (converted, sites)``: never changes ``model``;
  ``copy=False`` shares its parameters and buffers instead of copying them;
- ``strip_(model) -> list[Site]``: in place, back to standard modules and ops;
- ``count(model) -> int``: the SUGAR sites it left in ``model``; ``holds(model)``: whether it
  left anything that computes SUGAR;
- ``instrument(model, record)``: a context giving a module to run that calls
  ``record((path, spelling, kind, ...), x, y)`` at each activation, for the audit;
- ``explain(model) -> str | None``: why it does not apply to ``model`` (None: it does).

A path that does not apply raises ``CaptureError`` from ``find``/``convert``/``instrument`` with
its ``reason``: ``capture="auto"`` then takes the next path of the registry (``PATHS``, in order),
and notes read the reason field, never the message. ``fx`` (``fxpath``) rewrites a torch.fx
graph; ``modules`` swaps activation modules (``modulepath``) and converts functional calls as they
run (``callpath``), for models that do not trace. ``sugarize``, ``inspect``, ``strip``,
``count_sugar``, the audit and export all go through here. A new path is one module with one
such object, and ``register_capture_path(obj, before="fx")``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Protocol

import torch.nn as nn

from ..errors import CaptureError, ParameterError
from ..options import OpOptions
from . import callpath, fusion, fxpath, islands, modulepath
from .opnodes import fused_nodes, options_of
from .config import SugarConfig
from .report import Site

__all__ = ["CapturePath", "PATHS", "captures", "register_capture_path", "unregister_capture_path", "get_path",
           "convert", "inspect", "strip_", "count", "holds_sugar", "instrument", "op_options", "warmup"]


class CapturePath(Protocol):  # pragma: no cover - the interface, for readers and type checkers
    NAME: str

    def find(self, model: nn.Module, cfg: SugarConfig, status: str = "convertible") -> list[Site]: ...

    def inspect(self, model: nn.Module, cfg: SugarConfig, example_args) -> tuple[list[Site], list[str]]: ...

    def convert(self, model: nn.Module, cfg: SugarConfig, *, copy: bool = True) -> tuple[nn.Module, list[Site]]: ...

    def strip_(self, model: nn.Module) -> list[Site]: ...

    def count(self, model: nn.Module) -> int: ...

    def holds(self, model: nn.Module) -> bool: ...

    def instrument(self, model: nn.Module, record) -> ContextManager[nn.Module]: ...

    def explain(self, model: nn.Module) -> str | None: ...

    # Optional (a path without them adds no notes, no run-time rows, no op configurations):
    # notes(converted, reasons, capture) -> list[str]: the notes a conversion through it reports;
    # with_calls(report, before, after, cfg) -> (sites, notes): the report once example inputs ran
    #     (``callpath`` counts, ``before`` on the original, ``after`` on the converted model);
    # op_options(model) -> set[OpOptions]: the SUGAR configurations its sites run (for warmup).


class FxCapture:
    """torch.fx: the model traced into one graph, each site a node (``fxpath``)."""

    NAME = fxpath.NAME
    NOT_APPLYING = "not traceable by torch.fx"  # how a report says it did not apply

    def find(self, model, cfg, status="convertible"):
        return fxpath.find(model, cfg, status)

    def inspect(self, model, cfg, example_args):
        return fxpath.find(model, cfg), []

    def convert(self, model, cfg, *, copy=True):
        return fxpath.convert(model, cfg, copy=copy)

    def strip_(self, model):
        return fxpath.strip_(model)

    def count(self, model):
        return fxpath.count(model)

    def holds(self, model):
        return fxpath.count(model) > 0

    def instrument(self, model, record):
        return fxpath.instrument(model, record)

    def op_options(self, model):
        """Every SUGAR node's configuration, fused ones included, in every GraphModule inside
        ``model`` (an fx-converted model, or a module-path model's islands)."""
        import torch.fx

        from ..method.op import OP

        return {options_of(node) for m in model.modules() if isinstance(m, torch.fx.GraphModule)
                for node in m.graph.find_nodes(op="call_function", target=OP) + fused_nodes(m.graph)}

    def explain(self, model):
        from .capture import trace_graph

        try:
            trace_graph(model, copy=False)  # traces the model itself and changes nothing
        except CaptureError as exc:
            return exc.reason
        return None


class ModuleCapture:
    """Any ``nn.Module``: activation modules swapped at their paths (``modulepath``) and
    functional activation calls converted as they run (``callpath``), for models that do not trace."""

    NAME = modulepath.NAME

    def find(self, model, cfg, status="convertible"):
        return modulepath.find(model, cfg, status)

    def inspect(self, model, cfg, example_args):
        self._check(model)
        sites = modulepath.find(model, cfg)
        notes = []
        if example_args is None:
            roots = callpath.call_roots(model)
            if roots:
                notes.append(f"the forward of {', '.join(r or '<model>' for r in roots)} makes functional activation "
                             "calls: they are counted only with example inputs")
        else:
            counts = callpath.count_calls(model, tuple(example_args))
            sites = callpath.with_calls(sites, counts) + callpath.call_sites(counts, cfg, "convertible")
        return sites, notes

    def convert(self, model, cfg, *, copy=True):
        self._check(model)
        out, sites = modulepath.convert(model, cfg, copy=copy)
        found = islands.convert_(out, cfg)  # submodules that trace alone get the fx path's fusions
        sites = [_fusion_of(s, found, cfg) for s in sites]
        return out, sites + callpath.convert_(out, cfg)  # out is private already: hooked in place

    def strip_(self, model):
        islands.restore_(model)  # the original submodules, holding their SUGAR modules, back in place
        return modulepath.strip_(model) + callpath.strip_(model)

    def count(self, model):
        return modulepath.count(model) + callpath.count(model) + sum(
            fxpath.count_nodes(m) for m in model.modules() if islands.is_island(m))

    def holds(self, model):
        return self.count(model) > 0 or any(not c.relu_only for c in callpath.catchers(model))

    @contextlib.contextmanager
    def instrument(self, model, record):
        self._check(model)
        with islands.originals(model), modulepath.instrument(model, record) as runner, \
                callpath.instrument(model, record):
            yield runner

    def explain(self, model):
        return None if isinstance(model, nn.Module) else f"not a torch.nn.Module but a {type(model).__name__}"

    def notes(self, converted, reasons, capture):
        why = reasons.get(fxpath.NAME) or f"capture={capture!r} was asked for"
        notes = [f"not traceable by torch.fx ({why}); activation modules are swapped for SugarActivation at their "
                 "paths" if "asked for" not in why else "module capture, as asked: activation modules are swapped "
                 "for SugarActivation at their paths"]
        roots = [r for c in callpath.catchers(converted) for r in c.roots]
        if roots:
            notes.append(f"functional activation calls in the forward of {', '.join(r or '<model>' for r in roots)} "
                         f"are converted as they run; {_LISTED_LATER}")
        return notes

    def with_calls(self, report, before, after, cfg):
        """The swapped modules with their call counts, then each functional call site the run
        found; the note that said they would be listed is dropped."""
        modules = callpath.with_calls([s for s in report.sites if s.capture == self.NAME], before)
        notes = [n for n in report.notes if not n.endswith(_LISTED_LATER)]
        return modules + callpath.call_sites(before, cfg, "converted", after), notes

    def op_options(self, model):
        from ..method.module import SugarActivation

        found = {m.options for m in model.modules() if isinstance(m, SugarActivation)}
        for catcher in callpath.catchers(model):
            if not catcher.relu_only:
                found.update(catcher.config.op_options(kind) for kind in ("relu",) + catcher.config.relufy)
        return found

    def _check(self, model):
        why = self.explain(model)
        if why is not None:
            raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model instance",
                               reason=why)


def _fusion_of(site: Site, found: dict, cfg: SugarConfig) -> Site:
    """A module-path site with what the islands pass fused it with, or why it was not."""
    from dataclasses import replace

    on = fusion.enabled(cfg)
    if site.status != "converted" or cfg.save != "full" or not on:
        return site
    if site.path in found:  # a BatchNorm fusion is reported with fuse_linear off too
        fused, unfused = found[site.path]
        return replace(site, fused=fused, unfused=unfused)
    if "linear" not in on:
        return site  # no consumer rule ran: nothing to say why not
    return replace(site, unfused="caught by module swap, and no submodule around it and its consumer traces "
                                 "on its own")


_LISTED_LATER = "they are listed once example inputs are given"

PATHS: list[CapturePath] = [FxCapture(), ModuleCapture()]  # the order capture="auto" tries them in


def captures() -> tuple[str, ...]:
    """What ``capture=`` takes: "auto" and each registered path's name."""
    return ("auto",) + tuple(p.NAME for p in PATHS)


def register_capture_path(path: CapturePath, *, before: str | None = None) -> CapturePath:
    """Adds a capture path to the registry (at the end, or before the path named ``before``):
    ``capture="auto"`` tries it in that order, and strip, count, the audit and export see it.

    Raises:
        ParameterError: a path of that name is registered already, or ``before`` names none.
    """
    names = [p.NAME for p in PATHS]
    if path.NAME in names or path.NAME == "auto":
        raise ParameterError(f"a capture path named {path.NAME!r} is registered already ({', '.join(names)})")
    if before is not None and before not in names:
        raise ParameterError(f"no capture path named {before!r} to register before ({', '.join(names)})")
    PATHS.insert(names.index(before) if before is not None else len(PATHS), path)
    return path


def unregister_capture_path(name: str) -> None:
    """Takes a registered path out again (one a plug-in or a test added)."""
    PATHS[:] = [p for p in PATHS if p.NAME != name]


def get_path(name: str) -> CapturePath:
    for p in PATHS:
        if p.NAME == name:
            return p
    raise ParameterError(f"capture={name!r} is not one of {', '.join(captures())}")


def _candidates(capture: str) -> list[CapturePath]:
    return list(PATHS) if capture == "auto" else [get_path(capture)]


def _first_that_applies(candidates: list[CapturePath], call: Callable) -> tuple:
    """``(call(path), path, {name: why it did not apply})`` for the first path of ``candidates``
    whose ``call`` raises no ``CaptureError``; the last one's error propagates."""
    reasons: dict[str, str] = {}
    for i, path in enumerate(candidates):
        try:
            return call(path), path, reasons
        except CaptureError as exc:
            if i == len(candidates) - 1:
                raise
            reasons[path.NAME] = exc.reason
    raise CaptureError("no capture path is registered", reason="no capture path")  # pragma: no cover


def convert(model: nn.Module, cfg: SugarConfig, capture: str, *,
            copy: bool) -> tuple[nn.Module, list[Site], str, dict[str, str]]:
    """``(converted, sites, capture taken, {path: why it did not apply})`` for ``capture`` in
    ``captures()``: "auto" takes the first registered path that applies.

    Raises:
        CaptureError: the path asked for (or, with "auto", the last one) does not apply.
    """
    (out, sites), path, reasons = _first_that_applies(_candidates(capture),
                                                      lambda p: p.convert(model, cfg, copy=copy))
    return out, sites, path.NAME, reasons


def inspect(model: nn.Module, cfg: SugarConfig, example_args=None,
            capture: str = "auto") -> tuple[list[Site], list[str], str, dict]:
    """``(sites, notes, capture taken, {path: why it did not apply})``: what ``convert`` with
    the same ``capture`` would see.

    Raises:
        CaptureError: the path asked for (or, with "auto", the last one) does not apply.
    """
    (sites, notes), path, reasons = _first_that_applies(_candidates(capture),
                                                        lambda p: p.inspect(model, cfg, example_args))
    return sites, notes, path.NAME, reasons


def strip_(model: nn.Module) -> tuple[list[Site], list[str]]:
    """In place: every path strips what it left in ``model``. ``(sites, names of the paths that
    stripped any)``: each path reports for itself."""
    sites, taken = [], []
    for path in PATHS:
        found = path.strip_(model)
        if found:
            sites += found
            taken.append(path.NAME)
    return sites, taken


def count(model: nn.Module) -> int:
    """SUGAR sites in ``model`` on every path: graph nodes, SUGAR modules, and forwards whose
    functional calls a catcher converts."""
    return sum(path.count(model) for path in PATHS)


def holds_sugar(model: nn.Module) -> bool:
    """Whether ``model`` computes SUGAR anywhere: graph nodes, modules, call catchers, any path's."""
    return any(path.holds(model) for path in PATHS)


@contextlib.contextmanager
def instrument(model: nn.Module, record: Callable):
    """The module to run for the audit, from the first registered path that applies (the fx
    instrumented graph; where the model cannot be traced, the model itself with its activation
    modules and calls recorded)."""
    for i, path in enumerate(PATHS):
        with contextlib.ExitStack() as stack:
            try:
                runner = stack.enter_context(path.instrument(model, record))
            except CaptureError:
                if i == len(PATHS) - 1:
                    raise
                continue
            yield runner
            return


def op_options(model: nn.Module) -> set[OpOptions]:
    """The SUGAR op configurations ``model`` runs: each registered path says its own."""
    return {o for path in PATHS if hasattr(path, "op_options") for o in path.op_options(model)}


def notes(name: str, converted: nn.Module, reasons: dict[str, str], capture: str) -> list[str]:
    """The notes the path ``name`` reports for a conversion it made (none for a path without ``notes``)."""
    path = get_path(name)
    return list(path.notes(converted, reasons, capture)) if hasattr(path, "notes") else []


def with_calls(name: str, report, before, after, cfg: SugarConfig) -> tuple[list[Site], list[str]]:
    """The report's sites and notes once example inputs ran, as the path ``name`` tells them."""
    path = get_path(name)
    if hasattr(path, "with_calls"):
        return path.with_calls(report, before, after, cfg)
    return report.sites, report.notes


def warmup(model: nn.Module, dtypes=None, device: str = "cpu") -> dict:
    """Opt-in: compiles the SUGAR op's fused eager kernels for every configuration ``model`` runs,
    now, and turns them on for ``model`` (``kernels.use_kernels``: its forward and the backward of
    what it computed use them; other models keep their own setting, the process's is untouched).

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
    kernels.use_kernels(model)
    done = failed = 0
    for options in sorted(op_options(model), key=repr):
        for dtype in dtypes or (torch.float32,):
            if kernels.compile_for(*options.args, dtype=dtype, device=device):
                done += 1
            else:
                failed += 1
    hooks = {(rule.warm, options_of(node)) for gm in model.modules() if isinstance(gm, torch.fx.GraphModule)
             for node in fused_nodes(gm.graph) for rule in (fusion.rule_of(node),) if rule.warm is not None}
    for warm, options in sorted(hooks, key=repr):  # each fusion rule's own backward kernels
        for dtype in dtypes or (torch.float32,):
            if warm(options, dtype, device):
                done += 1
            else:
                failed += 1
    return {"kernels": done, "failed": failed, "seconds": time.perf_counter() - start}


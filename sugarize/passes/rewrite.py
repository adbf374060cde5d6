"""The sugarize pass: replaces every ReLU call (each spelling) with the SUGAR op."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .config import SugarConfig
from ..errors import CaptureError, InternalError, ParameterError
from ..method.op import OP
from ..options import DEFAULT_SAVE, DEFAULT_SURROGATE
from .capture import capture, graph_module, trace_graph
from .match import Match, is_sugar, match_node, may_alias, module_path, scripted_sites
from .report import Report, Site

__all__ = ["sugarize", "inspect", "plan_sites", "SugarizePass", "convert_graph"]


def plan_sites(graph: torch.fx.Graph, modules: dict[str, nn.Module], cfg: SugarConfig):
    """(node, match, convert?, reason) for each activation node, and the SUGAR nodes."""
    for node in graph.nodes:
        if is_sugar(node):
            yield node, None, False, ""
            continue
        match = match_node(node, modules)
        if match is None:
            continue
        convert, reason = cfg.decide(match.kind, module_path(node))
        yield node, match, convert, reason


def _sugar_site(node: torch.fx.Node) -> Site:
    info = node.meta.get("sugarize", {})
    return Site(
        path=info.get("path", module_path(node)),
        spelling=info.get("spelling", "sugar"),
        kind=info.get("kind", "relu"),
        node=node.name,
        status="sugar",
        surrogate=str(node.args[1]),
        forward_changed=info.get("kind", "relu") != "relu",
    )


def _rewrite_site(graph: torch.fx.Graph, node, match: Match, cfg: SugarConfig, modules, order) -> torch.fx.Node:
    x = match.input
    surrogate, params = cfg.surrogate_for(match.kind)
    info = {"path": module_path(node), "spelling": match.spelling, "kind": match.kind}
    args = (x, surrogate, params, cfg.negative_only, cfg.save)
    if match.inplace and may_alias(x, node, modules, order):
        # Another name may see x: mutate it, exactly as the original in-place call did.
        with graph.inserting_before(node):
            new = graph.call_function(OP, args)
            copied = graph.call_method("copy_", (x, new))
        new.meta = {**node.meta, "sugarize": info}
        order[new], order[copied] = order[node] - 0.5, order[node] - 0.25
        node.replace_all_uses_with(copied)
        graph.erase_node(node)
        return new
    # The node itself becomes the SUGAR call: no node created or erased, no use rewired.
    node.op, node.target, node.args = "call_function", OP, args
    if node.kwargs:
        node.kwargs = {}
    node.meta["sugarize"] = info
    if match.inplace:
        # x is fresh and unaliased: later readers of x read the SUGAR output instead.
        for user in list(x.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(x, node)
    return node


def sugarize(
    model: nn.Module,
    surrogate: str = DEFAULT_SURROGATE,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    negative_only: bool = False,
    save: str = DEFAULT_SAVE,
    relufy: Iterable[str] | str = (),
    config: SugarConfig | None = None,
    example_args: tuple | None = None,
    example_kwargs: dict | None = None,
    capture: str = "auto",
    copy: bool = True,
    **params: float,
) -> nn.Module:
    """Replaces every ReLU of ``model`` with SUGAR (ReLU forward, surrogate gradient backward).

    The user's model is left untouched; the result is a new module whose ``state_dict()``
    has the same keys as the model's, so fine-tuned weights load straight back into the
    original class. Its report is ``result.meta["sugarize"]["report"]``.

    Capture (the report's ``capture`` says which one was taken): ``"fx"``,
    ``torch.fx.symbolic_trace``, gives a ``GraphModule`` with one SUGAR node per site;
    ``"runtime"`` converts every ReLU call as it executes (``sugarize.passes.runtime``),
    whatever the control flow, and keeps the model's class; ``"auto"`` (the default) takes
    fx and falls back to runtime when the model cannot be traced.

    With ``example_args`` (and ``example_kwargs``), the ReLU calls that actually run in one
    forward pass of the original and of the converted model are counted; the report says
    how many were converted and names, in ``notes``, any ReLU call left unconverted.

    Args:
        model: a ``torch.nn.Module`` with ReLUs in any spelling.
        surrogate: registered surrogate name (``sugarize.list_surrogates()``).
        include, exclude: module-path globs selecting the sites to convert.
        negative_only: keep ReLU's gradient 1 for x > 0; use s' only for x <= 0.
        save: what the backward keeps: "full" (default, exact) or the opt-in compressed
            "bfloat16" / "uint8" (their error: ``sugarize.save_error``).
        relufy: also convert these activations ("gelu", "silu") into ReLU + SUGAR.
        config: a ``SugarConfig`` holding the options above, instead of the keywords;
            a keyword that contradicts it is an error, never silently dropped.
        example_args, example_kwargs: example inputs, as ``torch.export`` takes them.
        capture: "auto", "fx" or "runtime" (above).
        copy: work on a deep copy of ``model`` (the default). ``copy=False`` skips the
            copy on every capture path: the result shares ``model``'s submodules,
            parameters and buffers (as ``torch.fx.symbolic_trace``'s result does), so
            fine-tuning it trains ``model``'s weights; ``model`` itself is never changed
            (its forward stays ReLU, it gets no hooks).
        **params: surrogate parameters, e.g. ``alpha=1.67``.

    Returns:
        The converted model: a ``GraphModule`` (fx), or a module of ``model``'s class
        (runtime). Its report: ``sugarize.report_of(result)``.

    Raises:
        CaptureError: the model cannot be traced with ``capture="fx"``.
        UnknownSurrogateError, ParameterError: bad surrogate, parameter or option.

    Example:
        >>> sm = sugarize(model, "bsilu", exclude=["head.*"])
        >>> print(sm.meta["sugarize"]["report"])
    """
    cfg = _options(config, surrogate=surrogate, params=params, negative_only=negative_only, save=save,
                   include=tuple(include or ()), exclude=tuple(exclude or ()), relufy=relufy)
    if capture not in CAPTURES:
        raise ParameterError(f"capture={capture!r} is not one of {', '.join(CAPTURES)}")
    if capture == "runtime":
        gm = _runtime_sugarize(model, cfg, "capture='runtime' was asked for", copy=copy)
    else:
        try:
            root, graph, strategy = trace_graph(model, copy=copy)
        except CaptureError as exc:
            if capture == "fx" or not isinstance(model, nn.Module):
                raise
            gm = _runtime_sugarize(model, cfg, str(exc), copy=copy)
        else:
            report = convert_graph(graph, dict(root.named_modules()), cfg)
            report.capture = strategy
            gm = graph_module(root, graph, model)
            gm.meta["sugarize"] = {"config": cfg.to_dict(), "report": report}
    if example_args is not None or example_kwargs:
        _count_calls(model, gm, tuple(example_args or ()), dict(example_kwargs or {}))
    gm.meta["sugarize"]["report"].sites.extend(scripted_sites(model))
    return gm


CAPTURES = ("auto", "fx", "runtime")


def _options(config: SugarConfig | None, **keywords) -> SugarConfig:
    """The conversion's options: the keywords, or ``config`` when given. A keyword that differs
    from its default and from ``config`` is an error: options are never silently dropped."""
    if config is None:
        return SugarConfig(**keywords)
    defaults = SugarConfig()
    for name, value in keywords.items():
        given = value if name != "relufy" else SugarConfig(relufy=value).relufy
        if name == "params":
            if value and SugarConfig(surrogate=config.surrogate, params=value).params != dict(config.params):
                raise ParameterError(f"surrogate parameters {dict(value)} contradict config.params "
                                     f"{dict(config.params)}: pass options either as keywords or in config=")
            continue
        if given != getattr(defaults, name) and given != getattr(config, name):
            raise ParameterError(f"{name}={value!r} contradicts config.{name}={getattr(config, name)!r}: pass "
                                 "options either as keywords or in config=, not both")
    return config


def _runtime_sugarize(model: nn.Module, cfg: SugarConfig, reason: str, copy: bool = True) -> nn.Module:
    import copy as _copy

    from .runtime import attach

    root = _copy.deepcopy(model) if copy else _shallow_clone(model)
    attach(root, cfg)
    how = "each selected activation call is converted as it runs, by the module it runs in"
    report = Report(sites=_module_sites(root, cfg, "converted"), capture="runtime", notes=[
        f"not traceable ({reason.split('. Mark')[0]}); {how}" if "asked for" not in reason
        else f"runtime capture, as asked: {how}",
        "functional calls (F.relu in a forward) are listed once example inputs are given"])
    object.__setattr__(root, "meta", {"sugarize": {"config": cfg.to_dict(), "report": report}})
    return root


def _runtime_sites(counts, cfg: SugarConfig, status: str) -> list[Site]:
    """One Site per (module path, spelling, kind) an ActivationCounter saw, decided by ``cfg``."""
    sites = []
    for (path, spelling, kind), n in counts.sites.items():
        convert, reason = cfg.decide(kind, path)
        sur = cfg.surrogate_for(kind)[0] if convert else ""
        note = ("forward changes: fine-tune needed" if kind != "relu" else "found at runtime") if convert else reason
        sites.append(Site(path, spelling, kind, "", status if convert else "skipped", note, sur,
                          forward_changed=convert and kind != "relu", calls=n))
    return sites


def _module_sites(model: nn.Module, cfg: SugarConfig, status: str) -> list[Site]:
    """The activation *modules* of a model, found without running it (path, class, decision)."""
    from .match import module_kind

    sites = []
    for path, module in model.named_modules():
        kind = module_kind(module)
        if kind is None:
            continue
        convert, reason = cfg.decide(kind, path)
        sur = cfg.surrogate_for(kind)[0] if convert else ""
        sites.append(Site(path, type(module).__name__, kind, "", status if convert else "skipped", reason, sur,
                          forward_changed=convert and kind != "relu"))
    return sites


def _shallow_clone(model: nn.Module) -> nn.Module:
    """A module of ``model``'s class sharing its submodules, parameters and buffers, with hook
    registries of its own: hooks attached to it leave ``model`` unchanged (``copy=False``)."""
    clone = object.__new__(type(model))
    clone.__dict__.update(model.__dict__)
    for name, value in list(clone.__dict__.items()):
        if "hooks" in name and isinstance(value, dict):
            object.__setattr__(clone, name, type(value)(value))
    clone.__dict__.pop("meta", None)
    return clone


def _count_calls(original: nn.Module, converted: nn.Module, args: tuple, kwargs: dict) -> None:
    """Counts the ReLU calls each model makes at runtime; records the result in the report."""
    from ..errors import InputError, InternalError, first_line
    from .runtime import count_relu_calls

    report: Report = converted.meta["sugarize"]["report"]
    try:  # the original is never changed by the conversion (copy or not): count on it directly
        before = count_relu_calls(original, args, kwargs)
    except Exception as exc:  # the user's forward on the user's inputs
        raise InputError(f"the example inputs do not run through the model: {type(exc).__name__}: "
                         f"{first_line(exc)}") from exc
    try:
        after = count_relu_calls(converted, args, kwargs)
    except Exception as exc:  # the original ran on these inputs: the conversion broke it
        raise InternalError(f"the converted model fails on inputs the original runs: {type(exc).__name__}: "
                            f"{first_line(exc)}") from exc
    report.runtime = {"relu_calls": before.relu_calls, "converted_calls": after.sugar,
                      "unconverted_calls": after.relu_calls, "unconverted": dict(after.relu),
                      "unconverted_sites": [f"{p or '<model>'}: {sp} x{n}" for (p, sp, k), n in after.sites.items()
                                            if k == "relu"]}
    if report.capture == "runtime":
        cfg = SugarConfig.from_dict(converted.meta["sugarize"]["config"])
        report.sites = _runtime_sites(before, cfg, "converted")
        report.notes = [n for n in report.notes if not n.startswith("functional calls")]
    if after.relu_calls:
        names = ", ".join(report.runtime["unconverted_sites"])
        report.notes.append(f"{after.relu_calls} of {before.relu_calls} ReLU calls at runtime are NOT converted "
                            f"({names}): skipped by include/exclude, or outside the traced graph")


def convert_graph(graph: torch.fx.Graph, modules: dict[str, nn.Module], cfg: SugarConfig) -> Report:
    """Rewrites ``graph`` in place: each selected activation call becomes a SUGAR op.

    ``modules`` maps the graph's ``call_module`` targets to modules. The caller generates the
    code afterwards (``capture.graph_module``).
    """
    order: dict[Any, float] = {n: float(i) for i, n in enumerate(graph.nodes)}
    sites, rewired = [], False
    for node, match, convert, reason in list(plan_sites(graph, modules, cfg)):
        if match is None:
            sites.append(_sugar_site(node))
            continue
        if not convert:
            sites.append(Site(module_path(node), match.spelling, match.kind, node.name, "skipped", reason))
            continue
        new = _rewrite_site(graph, node, match, cfg, modules, order)
        rewired = rewired or match.inplace
        note = "forward changes: fine-tune needed" if match.kind != "relu" else match.note
        sites.append(
            Site(new.meta["sugarize"]["path"], match.spelling, match.kind, new.name, "converted", note,
                 surrogate=str(new.args[1]), forward_changed=match.kind != "relu")
        )
    if rewired:  # in-place sites add nodes or move uses; a site rewritten in place cannot break the graph
        graph.lint()
    return Report(sites=sites)


def inspect(
    model: nn.Module,
    surrogate: str = DEFAULT_SURROGATE,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    relufy: Iterable[str] | str = (),
    config: SugarConfig | None = None,
    example_args: tuple | None = None,
) -> Report:
    """Every activation site of ``model`` and what ``sugarize`` would do (or did) with it.

    Works on the original, a converted and a stripped model alike: ReLU sites show as
    "convertible" or "skipped" with a reason, SUGAR sites as "sugar" with their surrogate.
    A model that cannot be traced is run once on ``example_args`` instead, and its ReLU
    calls are listed by spelling (capture "runtime").
    """
    cfg = config or SugarConfig(
        surrogate=surrogate, include=tuple(include or ()), exclude=tuple(exclude or ()), relufy=relufy
    )
    try:
        gm, strategy = capture(model)
    except CaptureError as exc:
        if not isinstance(model, nn.Module):
            raise
        if example_args is None:  # what can be seen without running it: the activation modules
            return Report(sites=_module_sites(model, cfg, "convertible") + scripted_sites(model), capture="runtime",
                          notes=[f"not traceable ({str(exc).split('. Mark')[0]}); activation modules listed by "
                                 "path; functional calls (F.relu in a forward) are counted only with example inputs"])
        from .runtime import count_relu_calls, is_runtime

        counts = count_relu_calls(model, tuple(example_args))
        sites = _runtime_sites(counts, cfg, "convertible")
        if is_runtime(model):
            sites = [Site("", "runtime", "relu", "", "sugar", "converted at runtime", cfg.surrogate,
                          calls=counts.sugar)]
        return Report(sites=sites + scripted_sites(model), capture="runtime",
                      notes=[f"not traceable ({str(exc).split('. Mark')[0]})"])
    sites = []
    for node, match, convert, reason in plan_sites(gm.graph, dict(gm.named_modules()), cfg):
        if match is None:
            sites.append(_sugar_site(node))
        else:
            status = "convertible" if convert else "skipped"
            sur = cfg.surrogate_for(match.kind)[0] if convert else ""
            sites.append(Site(module_path(node), match.spelling, match.kind, node.name, status, reason, sur,
                              forward_changed=convert and match.kind != "relu"))
    return Report(sites=sites + scripted_sites(model), capture=strategy)


class SugarizePass(PassBase):
    """Replaces each selected ReLU call of a GraphModule with the SUGAR op, in place (a torch.fx pass).

    ``SugarizePass(config)(gm)`` returns ``PassResult(gm, modified)``; the report of what it did
    is ``pass.report`` and ``sugarize.report_of(gm)``. ``requires``: a GraphModule.
    ``ensures``: no ReLU site the config selects is left unconverted.

    Example:
        >>> gm = torch.fx.symbolic_trace(model)
        >>> result = SugarizePass(SugarConfig("nelu"))(gm)
        >>> result.modified, sugarize.report_of(result.graph_module).summary()
    """

    def __init__(self, config: SugarConfig | None = None):
        super().__init__()
        self.config = config or SugarConfig()
        self.report: Report | None = None

    def requires(self, graph_module: nn.Module) -> None:
        if not isinstance(graph_module, torch.fx.GraphModule):
            raise ParameterError(f"SugarizePass works on a torch.fx.GraphModule, not {type(graph_module).__name__}; "
                                 "use sugarize.sugarize(model) for any module")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        self.report = convert_graph(graph_module.graph, dict(graph_module.named_modules()), self.config)
        graph_module.recompile()
        graph_module.meta["sugarize"] = {"config": self.config.to_dict(), "report": self.report}
        return PassResult(graph_module, bool(self.report.by_status("converted")))

    def ensures(self, graph_module: nn.Module) -> None:
        left = [node.name for node, match, convert, _ in plan_sites(
            graph_module.graph, dict(graph_module.named_modules()), self.config) if match is not None and convert]
        if left:
            raise InternalError(f"SugarizePass left selected ReLU sites unconverted: {', '.join(left)}")

"""The sugarize pass: replaces every ReLU (each spelling) with SUGAR, through a capture path."""

from __future__ import annotations

from typing import Iterable

import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .config import SugarConfig, resolve_options
from ..errors import CaptureError, InternalError, ParameterError
from ..options import DEFAULT_SAVE, DEFAULT_SURROGATE
from . import callpath, fxpath, paths
from .match import scripted_sites
from .report import Report

__all__ = ["sugarize", "inspect", "SugarizePass", "CAPTURES"]

CAPTURES = paths.captures()  # the built-in ones; paths.captures() has any registered since


def sugarize(
    model: nn.Module,
    surrogate: str = DEFAULT_SURROGATE,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    negative_only: bool = False,
    save: str = DEFAULT_SAVE,
    relufy: Iterable[str] | str = (),
    relufy_surrogate: str | None = None,
    fuse_bn: bool = True,
    fuse_linear: bool = True,
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
    original class. Its report: ``sugarize.report_of(result)``.

    Capture (the report's ``capture`` says which one was taken, each site's ``capture`` which
    path found it): ``"fx"``, ``torch.fx.symbolic_trace``, gives a ``GraphModule`` with one
    SUGAR node per site; ``"modules"`` keeps the model's class and swaps each activation module
    (``nn.ReLU``, Hugging Face's ``ACT2FN`` classes...) for a ``SugarActivation`` at its path,
    and converts functional calls (``F.relu`` in a forward) as they run, only in the forwards
    that make them; ``"auto"`` (the default) takes fx, and modules where the model cannot be
    traced.

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
        relufy_surrogate: the surrogate of relufied sites (default: the replaced activation's own
            derivative, e.g. GELU's for a GELU site).
        fuse_bn: on the fx path, fuse each exact site fed by a BatchNorm (``relu(bn(c))``,
            ``relu(bn(c) + r)``) with it: the same values and gradients, and in eager mode its
            backward rebuilds x from BatchNorm's input instead of keeping it (the report's
            ``Site.fused`` names them). ``False`` keeps every site apart.
        fuse_linear: on the fx path, fuse each exact site whose output only an ``nn.Linear``
            reads (``linear(relu(x))``), or only a product that only a Linear reads (a gated
            MLP's ``down(relu(gate(h)) * up(h))``), with it: the same values and gradients, and
            its backward rebuilds ``relu(x)`` (and the product) from x instead of keeping it,
            eager and compiled (``Site.fused`` names them, ``Site.unfused`` says why a site was
            not). ``False`` keeps every site apart.
        config: a ``SugarConfig`` holding the options above, instead of the keywords;
            a keyword that contradicts it is an error, never silently dropped.
        example_args, example_kwargs: example inputs, as ``torch.export`` takes them.
        capture: "auto", "fx" or "modules" (above).
        copy: work on a deep copy of ``model`` (the default). ``copy=False`` skips the
            copy on every capture path: the result shares ``model``'s submodules,
            parameters and buffers (as ``torch.fx.symbolic_trace``'s result does), so
            fine-tuning it trains ``model``'s weights; ``model`` itself is never changed
            (its forward stays ReLU, it gets no hooks).
        **params: surrogate parameters, e.g. ``alpha=1.67``.

    Returns:
        The converted model: a ``GraphModule`` (fx), or a module of ``model``'s class
        (modules). Its report: ``sugarize.report_of(result)``.

    Raises:
        CaptureError: the model cannot be traced with ``capture="fx"``.
        UnknownSurrogateError, ParameterError: bad surrogate, parameter or option.

    Example:
        >>> sm = sugarize(model, "bsilu", exclude=["head.*"])
        >>> print(sugarize.report_of(sm))
    """
    _check_keywords(params, config.surrogate if config is not None and surrogate == DEFAULT_SURROGATE else surrogate)
    cfg = _options(config, surrogate=surrogate, params=params, negative_only=negative_only, save=save,
                   include=tuple(include or ()), exclude=tuple(exclude or ()), relufy=relufy,
                   relufy_surrogate=relufy_surrogate, fuse_bn=fuse_bn, fuse_linear=fuse_linear)
    if capture not in paths.captures():
        raise ParameterError(f"capture={capture!r} is not one of {', '.join(paths.captures())}")
    out, sites, taken, reasons = paths.convert(model, cfg, capture, copy=copy)
    report = Report(sites=sites, capture=taken, notes=paths.notes(taken, out, reasons, capture))
    meta = {"sugarize": {"config": cfg.to_dict(), "report": report}}
    if isinstance(out, torch.fx.GraphModule):
        out.meta.update(meta)
    else:
        object.__setattr__(out, "meta", meta)
    if example_args is not None or example_kwargs:
        _count_calls(model, out, tuple(example_args or ()), dict(example_kwargs or {}))
    report.sites.extend(scripted_sites(model))
    return out


def _check_keywords(params: dict, surrogate: str) -> None:
    """Extra keywords are the surrogate's parameters; any other is named as an unknown keyword
    (not reported as a parameter the surrogate lacks)."""
    import inspect as pyinspect

    from ..method.surrogates import get_surrogate

    known = [p.name for p in get_surrogate(surrogate).params]
    unknown = [k for k in params if k not in known]
    if unknown:
        options = [n for n, p in pyinspect.signature(sugarize).parameters.items()
                   if p.kind is p.KEYWORD_ONLY]
        raise ParameterError(f"sugarize() got an unknown keyword {unknown[0]!r}: it is none of its options "
                             f"({', '.join(options)}) and no parameter of surrogate {surrogate!r} "
                             f"({', '.join(known) or 'it takes none'})")


def _options(config: SugarConfig | None, **keywords) -> SugarConfig:
    """The conversion's options (``config.resolve_options``: the one keyword/config rule)."""
    return resolve_options(config, **keywords)


def _count_calls(original: nn.Module, converted: nn.Module, args: tuple, kwargs: dict) -> None:
    """Counts the activation calls each model makes in one forward pass; records them in the report."""
    from ..errors import InputError, InternalError, first_line

    report: Report = converted.meta["sugarize"]["report"]
    try:  # the original is never changed by the conversion (copy or not): count on it directly
        before = callpath.count_calls(original, args, kwargs)
    except Exception as exc:  # the user's forward on the user's inputs
        raise InputError(f"the example inputs do not run through the model: {type(exc).__name__}: "
                         f"{first_line(exc)}") from exc
    try:
        after = callpath.count_calls(converted, args, kwargs)
    except Exception as exc:  # the original ran on these inputs: the conversion broke it
        raise InternalError(f"the converted model fails on inputs the original runs: {type(exc).__name__}: "
                            f"{first_line(exc)}") from exc
    left = after.unconverted()
    unconverted: dict[str, int] = {}
    for (_, spelling, _, _), n in left.items():
        unconverted[spelling] = unconverted.get(spelling, 0) + n
    report.runtime = {"relu_calls": before.calls("relu"), "converted_calls": after.sugar,
                      "unconverted_calls": sum(left.values()), "unconverted": unconverted,
                      "unconverted_sites": [f"{p or '<model>'}: {sp} x{n}" for (p, sp, _, _), n in left.items()]}
    cfg = SugarConfig.from_dict(converted.meta["sugarize"]["config"])
    report.sites, report.notes = paths.with_calls(report.capture, report, before, after, cfg)
    if left:
        names = ", ".join(report.runtime["unconverted_sites"])
        report.notes.append(f"{sum(left.values())} of {before.calls('relu')} ReLU calls at runtime are NOT converted "
                            f"({names}): skipped by include/exclude, or outside the traced graph")


def inspect(
    model: nn.Module,
    surrogate: str = DEFAULT_SURROGATE,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    relufy: Iterable[str] | str = (),
    config: SugarConfig | None = None,
    example_args: tuple | None = None,
    capture: str = "auto",
) -> Report:
    """Every activation site of ``model`` and what ``sugarize`` would do (or did) with it.

    ``capture`` reads the model through one capture path (``sugarize(..., capture=)``'s names:
    "fx", "modules", or a registered one); "auto" takes the first that applies, as ``sugarize``
    does. A path that does not apply raises CaptureError with its reason.

    Works on the original, a converted and a stripped model alike: ReLU sites show as
    "convertible" or "skipped" with a reason, SUGAR sites as "sugar" with their surrogate.
    A model that cannot be traced is read through the module path: its activation modules
    are listed without running it, and its functional calls once ``example_args`` run it.
    """
    cfg = config or SugarConfig(
        surrogate=surrogate, include=tuple(include or ()), exclude=tuple(exclude or ()), relufy=relufy
    )
    sites, notes, taken, reasons = paths.inspect(model, cfg, example_args, capture)
    for name, why in reversed(list(reasons.items())):  # each path that did not apply, in its own words
        said = getattr(paths.get_path(name), "NOT_APPLYING", f"capture {name!r} does not apply")
        notes.insert(0, f"{said} ({why}); sites listed by the {taken} path")
    return Report(sites=sites + scripted_sites(model), capture=taken, notes=notes)


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
        self.report = fxpath.convert_graph(graph_module.graph, dict(graph_module.named_modules()), self.config)
        graph_module.recompile()
        graph_module.meta["sugarize"] = {"config": self.config.to_dict(), "report": self.report}
        return PassResult(graph_module, bool(self.report.by_status("converted")))

    def ensures(self, graph_module: nn.Module) -> None:
        left = [node.name for node, match, convert, _ in fxpath.plan_sites(
            graph_module.graph, dict(graph_module.named_modules()), self.config) if match is not None and convert]
        if left:
            raise InternalError(f"SugarizePass left selected ReLU sites unconverted: {', '.join(left)}")

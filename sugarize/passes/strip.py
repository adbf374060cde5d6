"""The strip pass: every SUGAR site back to the standard module or op it replaced."""

from __future__ import annotations

import copy as _copy

import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import StripError
from . import paths
from .capture import keep_non_persistent
from .report import Report

__all__ = ["strip", "strip_", "count_sugar", "has_sugar", "StripPass"]


def count_sugar(model: nn.Module) -> int:
    """SUGAR sites in ``model``: SUGAR nodes in its graphs (every GraphModule inside it),
    ``SugarActivation`` modules, and each module whose forward's functional activation calls are
    converted as they run (one site per such forward, as ``strip`` reports it)."""
    return paths.count(model)


def has_sugar(model: nn.Module) -> bool:
    """Whether ``model`` computes SUGAR anywhere: graph nodes, SUGAR modules or call catchers."""
    return paths.holds_sugar(model)


def strip_(model: nn.Module) -> Report:
    """In place: every SUGAR site of ``model`` becomes the standard module or op it replaced
    (``nn.ReLU``, ``torch.relu``; a relufied site ``nn.ReLU``), on every capture path, and a
    Hugging Face config says ``relu`` where every site it governs was relufied. Returns the
    report, which ``sugarize.report_of(model)`` gives back too.

    Raises:
        StripError: if SUGAR is left (postcondition).
    """
    sites, taken = paths.strip_(model)
    # the report's capture: the first registered path that stripped anything, by its own name
    report = Report(sites=sites, capture=taken[0] if taken else "modules")
    for m in model.modules():  # a converted model's record, and any converted submodel's, as plain data
        meta = getattr(m, "meta", None)
        if isinstance(meta, dict) and "sugarize" in meta:
            meta["sugarize"] = {"stripped": True, "report": report.to_dict()}
    if has_sugar(model):
        raise StripError(f"strip left SUGAR in the model ({count_sugar(model)} site(s))")
    return report


def strip(model: nn.Module, *, copy: bool = True) -> nn.Module:
    """``model`` with every SUGAR site back to standard ReLU.

    The result computes exactly what the SUGAR model computes, bit for bit, holds no sugarize
    class or hook (but for relufied functional calls, see ``callpath.strip_``), and exports to
    ONNX with the op types of the original ReLU model. Its report: ``sugarize.report_of(result)``.

    Args:
        model: a model from ``sugarize`` (or one that contains such models).
        copy: strip a deep copy and leave ``model`` untouched (the default); with
            ``copy=False``, ``model`` itself is stripped and returned (``strip_``).

    Raises:
        StripError: if SUGAR is left (postcondition).
    """
    out = _copy.deepcopy(model) if copy else model
    if copy:
        keep_non_persistent(out, model)
    strip_(out)
    return out


class StripPass(PassBase):
    """Replaces every SUGAR node of a GraphModule with ``torch.relu``, in place (a torch.fx pass).

    ``StripPass()(gm)`` returns ``PassResult(gm, modified)``; ``pass.report`` lists the stripped
    sites. ``ensures``: no SUGAR node is left (``StripError``, a bug of ours, otherwise).
    """

    def __init__(self):
        super().__init__()
        self.report: Report | None = None

    def call(self, graph_module: nn.Module) -> PassResult:
        self.report = strip_(graph_module)
        return PassResult(graph_module, bool(self.report.sites))

    def ensures(self, graph_module: nn.Module) -> None:
        if has_sugar(graph_module):
            raise StripError(f"StripPass left SUGAR in the model ({count_sugar(graph_module)} site(s))")

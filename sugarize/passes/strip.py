"""The strip pass: replaces every SUGAR op with a standard ReLU."""

from __future__ import annotations

import copy as _copy

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import StripError
from ..method.op import OP
from .capture import keep_non_persistent
from .match import module_path
from .report import Report, Site

__all__ = ["strip", "strip_", "count_sugar", "has_sugar", "StripPass"]


def count_sugar(model: nn.Module) -> int:
    """SUGAR op nodes in the graphs of ``model`` (every GraphModule inside it).

    A model converted on the runtime path has no graph: its ReLU calls become SUGAR as they
    run (``has_sugar`` tells whether a model holds SUGAR of either kind)."""
    return sum(len(_sugar_nodes(m)) for m in model.modules() if isinstance(m, torch.fx.GraphModule))


def has_sugar(model: nn.Module) -> bool:
    """Whether ``model`` computes SUGAR anywhere: graph nodes, or runtime-path hooks."""
    from .runtime import is_runtime

    return count_sugar(model) > 0 or any(is_runtime(m) for m in model.modules())


def _sugar_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return gm.graph.find_nodes(op="call_function", target=OP)  # an indexed lookup, not a scan


def strip_(model: nn.Module) -> Report:
    """In place: every SUGAR node of ``model`` becomes ``torch.relu``. Returns the report.

    Raises:
        StripError: if a SUGAR node is left (postcondition).
    """
    from .runtime import detach

    sites = []
    modules = list(model.modules())
    for m in modules:
        if detach(m):
            sites.append(Site(module_path_of(model, m), "runtime", "relu", "", "stripped"))
            if isinstance(getattr(m, "meta", None), dict) and isinstance(m.meta.get("sugarize"), dict):
                m.meta["sugarize"] = {**m.meta["sugarize"], "stripped": True}
    for gm in [m for m in modules if isinstance(m, torch.fx.GraphModule)]:
        changed = False
        for node in _sugar_nodes(gm):
            # The node itself becomes the relu call: nothing created, erased or rewired, so
            # the graph stays well-formed (no lint needed).
            info = node.meta.pop("sugarize", {})
            node.target, node.args = torch.relu, (node.args[0],)
            if node.kwargs:
                node.kwargs = {}
            changed = True
            sites.append(
                Site(info.get("path", module_path(node)), info.get("spelling", "sugar"),
                     info.get("kind", "relu"), node.name, "stripped")
            )
        if changed:
            gm.recompile()
        if isinstance(gm.meta.get("sugarize"), dict):
            gm.meta["sugarize"] = {**gm.meta["sugarize"], "stripped": True}
    if has_sugar(model):
        raise StripError(f"strip left SUGAR in the model ({count_sugar(model)} graph node(s))")
    return Report(sites=sites, capture="graph")


def module_path_of(root: nn.Module, target: nn.Module) -> str:
    return next((name for name, m in root.named_modules() if m is target), "")


def strip(model: nn.Module, *, copy: bool = True) -> nn.Module:
    """``model`` with every SUGAR op back to standard ReLU.

    The result computes exactly what the SUGAR model computes, bit for bit, and exports to
    ONNX with the op types of the original ReLU model. Its report is
    ``result.meta["sugarize_strip"]`` when the result is a GraphModule.

    Args:
        model: a model from ``sugarize`` (or one that contains such models).
        copy: strip a deep copy and leave ``model`` untouched (the default); with
            ``copy=False``, ``model`` itself is stripped and returned (``strip_``).

    Raises:
        StripError: if a SUGAR node is left (postcondition).
    """
    out = _copy.deepcopy(model) if copy else model
    if copy:
        keep_non_persistent(out, model)
    report = strip_(out)
    if isinstance(getattr(out, "meta", None), dict):
        out.meta["sugarize_strip"] = report
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
            raise StripError(f"StripPass left SUGAR in the model ({count_sugar(graph_module)} graph node(s))")

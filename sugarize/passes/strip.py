"""The strip pass: replaces every SUGAR op with a standard ReLU."""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn as nn

from ..errors import StripError
from .match import is_sugar, module_path
from .report import Report, Site

__all__ = ["strip", "strip_", "count_sugar"]


def count_sugar(model: nn.Module) -> int:
    """SUGAR nodes in every GraphModule inside ``model``, plus one per runtime-path module."""
    from .runtime import is_runtime

    return sum(
        1
        for m in model.modules()
        if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
        if is_sugar(n)
    ) + sum(1 for m in model.modules() if is_runtime(m))


def strip_(model: nn.Module) -> Report:
    """In place: every SUGAR node of ``model`` becomes ``torch.relu``. Returns the report.

    Raises:
        StripError: if a SUGAR node is left (postcondition).
    """
    from .runtime import detach

    sites = []
    for m in model.modules():
        if detach(m):
            sites.append(Site(module_path_of(model, m), "runtime", "relu", "", "stripped"))
            if isinstance(getattr(m, "meta", None), dict) and isinstance(m.meta.get("sugarize"), dict):
                m.meta["sugarize"] = {**m.meta["sugarize"], "stripped": True}
    for gm in [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]:
        changed = False
        for node in list(gm.graph.nodes):
            if not is_sugar(node):
                continue
            info = node.meta.get("sugarize", {})
            with gm.graph.inserting_before(node):
                relu = gm.graph.call_function(torch.relu, (node.args[0],))
            relu.meta = {k: v for k, v in node.meta.items() if k != "sugarize"}
            node.replace_all_uses_with(relu)
            gm.graph.erase_node(node)
            changed = True
            sites.append(
                Site(info.get("path", module_path(relu)), info.get("spelling", "sugar"),
                     info.get("kind", "relu"), relu.name, "stripped")
            )
        if changed:
            gm.graph.lint()
            gm.recompile()
        if isinstance(gm.meta.get("sugarize"), dict):
            gm.meta["sugarize"] = {**gm.meta["sugarize"], "stripped": True}
    left = count_sugar(model)
    if left:
        raise StripError(f"strip left {left} SUGAR node(s) in the model; please report this as a bug")
    return Report(sites=sites, capture="graph")


def module_path_of(root: nn.Module, target: nn.Module) -> str:
    return next((name for name, m in root.named_modules() if m is target), "")


def strip(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every SUGAR op back to standard ReLU (the model is untouched).

    The result computes exactly what the SUGAR model computes, bit for bit, and exports to
    ONNX with the op types of the original ReLU model. Its report is
    ``result.meta["sugarize_strip"]`` when the result is a GraphModule.

    Raises:
        StripError: if a SUGAR node is left (postcondition).
    """
    out = copy.deepcopy(model)
    report = strip_(out)
    if isinstance(getattr(out, "meta", None), dict):
        out.meta["sugarize_strip"] = report
    return out

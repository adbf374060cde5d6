"""The fx path: the model traced by ``torch.fx.symbolic_trace``, each selected activation node
rewritten into one SUGAR node in place, and back by strip.

The capture-path interface (``paths.py``): ``find``, ``convert``, ``strip_``, ``count``,
``instrument``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..method.op import OP
from .capture import capture, graph_module, trace_graph
from .config import SugarConfig
from . import fusion
from .islands import is_island
from .match import Match, match_node, may_alias, module_path
from .opnodes import fused_nodes, input_of, is_sugar, options_of, sugar_args
from .report import Report, Site

__all__ = ["NAME", "find", "convert", "strip_", "count", "count_nodes", "instrument", "plan_sites", "convert_graph"]

NAME = "fx"


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
        surrogate=options_of(node).surrogate,
        forward_changed=info.get("kind", "relu") != "relu",
        capture=NAME,
        fused=record.what if (record := fusion.record_of(node)) is not None else "",
    )


_X = "<sugarize: the site's input>"  # stands for the input node in a recorded call (meta holds no Node)


def _spelling_of(node: torch.fx.Node, match: Match):
    """``(op, target, args, kwargs)`` that calls the ReLU as the user spelled it, its input as ``_X``,
    for strip to put back; None where it cannot be recorded (strip then writes ``torch.relu``).

    A module call is recorded as ``F.relu`` (with its ``inplace``): the GraphModule keeps no
    submodule its graph does not call, and both export the same ``Relu``."""
    if match.kind != "relu":
        return None  # relufied: its forward changed on purpose, strip writes ReLU
    if node.op == "call_module":
        return "call_function", F.relu, (_X,), ({"inplace": True} if match.inplace else {})
    others = []
    args = torch.fx.node.map_arg(node.args, lambda n: _X if n is match.input else others.append(n) or n)
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: _X if n is match.input else others.append(n) or n)
    return None if others else (node.op, node.target, tuple(args), dict(kwargs))


def _rewrite_site(graph: torch.fx.Graph, node, match: Match, cfg: SugarConfig, modules, order) -> torch.fx.Node:
    x = match.input
    info = {"path": module_path(node), "spelling": match.spelling, "kind": match.kind,
            "call": _spelling_of(node, match)}
    args = sugar_args(x, cfg.op_options(match.kind))
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
            sites.append(Site(module_path(node), match.spelling, match.kind, node.name, "skipped", reason, capture=NAME))
            continue
        new = _rewrite_site(graph, node, match, cfg, modules, order)
        rewired = rewired or match.inplace
        note = "forward changes: fine-tune needed" if match.kind != "relu" else match.note
        sites.append(
            Site(new.meta["sugarize"]["path"], match.spelling, match.kind, new.name, "converted", note,
                 surrogate=options_of(new).surrogate, forward_changed=match.kind != "relu", capture=NAME)
        )
    if rewired:  # in-place sites add nodes or move uses; a site rewritten in place cannot break the graph
        graph.lint()
    if fusion.enabled(cfg):
        done = fusion.fuse(graph, modules, fusion.enabled(cfg))
        sites = [replace(s, fused=done.fused.get(s.node, ""), unfused=done.unfused.get(s.node, ""))
                 if s.status == "converted" else s for s in sites]
    return Report(sites=sites)


def find(model: nn.Module, cfg: SugarConfig, status: str = "convertible") -> list[Site]:
    """Every activation node of ``model``'s graph and what ``cfg`` does with it (nothing changes).

    Raises:
        CaptureError: the model cannot be traced.
    """
    gm, _ = capture(model, copy=False)
    sites = []
    for node, match, convert_, reason in plan_sites(gm.graph, dict(gm.named_modules()), cfg):
        if match is None:
            sites.append(_sugar_site(node))
        else:
            sur = cfg.surrogate_for(match.kind)[0] if convert_ else ""
            sites.append(Site(module_path(node), match.spelling, match.kind, node.name,
                              status if convert_ else "skipped", reason, sur,
                              forward_changed=convert_ and match.kind != "relu", capture=NAME))
    return sites


def convert(model: nn.Module, cfg: SugarConfig, *, copy: bool = True) -> tuple[nn.Module, list[Site]]:
    """A GraphModule of ``model`` with each selected activation node a SUGAR node, and its sites.

    Raises:
        CaptureError: the model cannot be traced.
    """
    root, graph, _ = trace_graph(model, copy=copy)
    report = convert_graph(graph, dict(root.named_modules()), cfg)
    return graph_module(root, graph, model), report.sites


def _graph_modules(model: nn.Module) -> list[torch.fx.GraphModule]:
    """The GraphModules this path left in ``model`` (the module path's traced islands are that
    path's to strip: ``islands.py``)."""
    return [m for m in model.modules() if isinstance(m, torch.fx.GraphModule) and not is_island(m)]


def _sugar_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The SUGAR op nodes (indexed lookups, not a scan), fused ones unfused first."""
    fusion.unfuse_all(gm.graph)
    return gm.graph.find_nodes(op="call_function", target=OP)


def strip_(model: nn.Module) -> list[Site]:
    """In place: every SUGAR node of every GraphModule in ``model`` becomes the ReLU call the user
    wrote (``clamp(min=0)`` stays clamp, ``x.relu_()`` stays in place: the export is op for op
    the original's); a relufied site, or one whose call was not recorded, ``torch.relu``."""
    sites = []
    for gm in _graph_modules(model):
        changed = False
        for node in _sugar_nodes(gm):
            # The node itself becomes the relu call: nothing created, erased or rewired, so
            # the graph stays well-formed (no lint needed).
            info = node.meta.pop("sugarize", {})
            x = input_of(node)
            call = info.get("call")
            if call is None:
                node.target, node.args, node.kwargs = torch.relu, (x,), {}
            else:
                op, target, args, kwargs = call
                node.op, node.target = op, target
                node.args = torch.fx.node.map_aggregate(args, lambda a: x if isinstance(a, str) and a == _X else a)
                node.kwargs = torch.fx.node.map_aggregate(kwargs, lambda a: x if isinstance(a, str) and a == _X else a)
            changed = True
            sites.append(Site(info.get("path", module_path(node)), info.get("spelling", "sugar"),
                              info.get("kind", "relu"), node.name, "stripped", capture=NAME))
        if changed:
            gm.recompile()
    return sites


def count(model: nn.Module) -> int:
    """SUGAR nodes in the graphs of ``model`` (every GraphModule inside it), fused ones included."""
    return sum(count_nodes(gm) for gm in _graph_modules(model))


def count_nodes(gm: torch.fx.GraphModule) -> int:
    """SUGAR nodes in one GraphModule's graph, fused ones included."""
    return len(gm.graph.find_nodes(op="call_function", target=OP)) + len(fused_nodes(gm.graph))


@contextlib.contextmanager
def instrument(model: nn.Module, record):
    """A GraphModule over ``model``'s own submodules that calls ``record((path, spelling, kind, node),
    x, y)`` after each activation and SUGAR node (``x`` its input, ``y`` its output).

    Raises:
        CaptureError: the model cannot be traced.
    """
    gm, _ = capture(model, copy=False)  # over a copy of the graph: unfusing it leaves the model's alone
    fusion.unfuse_all(gm.graph)  # the audit reads x, which a fused node never holds
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if is_sugar(node):
            info = node.meta.get("sugarize", {})
            key = (info.get("path", module_path(node)), "SUGAR " + options_of(node).surrogate, info.get("kind", "relu"),
                   node.name)
            x = input_of(node)
        else:
            match = match_node(node, modules)
            if match is None or match.input is None:
                continue
            key, x = (module_path(node), match.spelling, match.kind, node.name), match.input
        with gm.graph.inserting_after(node):
            gm.graph.call_function(record, (key, x, node))
    gm.recompile()
    yield gm

"""The fx path's BatchNorm fusion: ``bn -> SUGAR``, ``bn -> add(residual) -> SUGAR`` and
``bn -> add(bn_s(shortcut input)) -> SUGAR`` become one ``bn_sugar`` node (``method/fused.py``),
which keeps no copy of x in eager mode; and back.

``fuse`` runs after the SUGAR rewrite, on exact (``save="full"``) SUGAR nodes whose input is
a BatchNorm module's output (or that output plus another tensor, itself possibly a second
BatchNorm's output: a downsampling shortcut's) read by nothing else.
The BatchNorm stays in the module tree (a ``get_attr`` node reads it), so ``state_dict``
keys do not change. ``unfuse`` puts the BatchNorm call and the add back, with the nodes'
names, before the SUGAR node: strip and the audit's instrumented graph see the plain form.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn

from ..method.fused import bn_sugar, fusable_module
from ..method.op import OP

__all__ = ["fuse", "unfuse", "is_fused", "fused_nodes", "FUSED"]

FUSED = bn_sugar


def is_fused(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is FUSED


def fused_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return graph.find_nodes(op="call_function", target=FUSED)


def _bn(node, modules) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.users) == 1
            and fusable_module(modules.get(node.target)) and len(node.args) == 1 and not node.kwargs)


def _add_operands(node):
    """The two tensors a plain two-operand add sums (``a + b``, ``torch.add(a, b)``, ``a.add(b)``)."""
    if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2 \
            and not node.kwargs:
        return node.args
    if node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def fuse(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Fuses each exact SUGAR node fed by a BatchNorm (directly or through a residual add), in place.

    Returns ``{SUGAR node name: what was fused}`` ("BatchNorm2d", "BatchNorm2d + add",
    "BatchNorm2d + add + shortcut BatchNorm2d")."""
    fused: dict[str, str] = {}
    for node in list(graph.find_nodes(op="call_function", target=OP)):
        x, surrogate, params, negative_only, save = node.args
        if save != "full" or not isinstance(x, torch.fx.Node) or len(x.users) != 1:
            continue
        add, residual, order = None, None, None
        if _bn(x, modules):
            bn = x
        else:
            operands = _add_operands(x)
            if operands is None:
                continue
            index = next((i for i, a in enumerate(operands) if _bn(a, modules)), None)
            if index is None or not isinstance(operands[1 - index], torch.fx.Node):
                continue
            add, bn, residual, order = x, operands[index], operands[1 - index], index
        # a downsampling shortcut's BatchNorm on the other side: fused too, so that its output
        # (kept by no layer of the ReLU model) is rebuilt rather than kept
        shortcut = residual if add is not None and _bn(residual, modules) else None
        c = bn.args[0]
        with graph.inserting_before(node):
            module = graph.get_attr(bn.target)
            module2 = graph.get_attr(shortcut.target) if shortcut is not None else None
        info = dict(node.meta.get("sugarize", {}))
        kind = type(modules[bn.target]).__name__
        # where each node stood: unfuse puts it back there, so the code (and an export) runs
        # the ops in the original order
        info["fused"] = {"bn": (bn.target, bn.name, bn.prev.name, dict(bn.meta)),
                         "add": None if add is None else (add.op, add.target, order, add.name, add.prev.name,
                                                          dict(add.meta)),
                         "shortcut": None if shortcut is None else (shortcut.target, shortcut.name,
                                                                    shortcut.prev.name, dict(shortcut.meta)),
                         "what": kind + (" + add" if add is not None else "")
                         + (f" + shortcut {type(modules[shortcut.target]).__name__}" if shortcut is not None else "")}
        node.meta["sugarize"] = info
        node.target = FUSED
        if shortcut is not None:
            node.args = (module, c, shortcut.args[0], surrogate, params, negative_only, save, module2)
        else:
            node.args = (module, c, residual, surrogate, params, negative_only, save)
        if add is not None:
            graph.erase_node(add)
        if shortcut is not None:
            graph.erase_node(shortcut)
        graph.erase_node(bn)
        fused[node.name] = info["fused"]["what"]
    return fused


def _place(graph, names, after: str, default: torch.fx.Node):
    """Inserting after the node named ``after`` if it still exists, else before ``default``."""
    prev = names.get(after)
    return graph.inserting_after(prev) if prev is not None else graph.inserting_before(default)


def _named(node, name: str, names, meta: dict):
    if name and name not in names:
        node.name = name  # the original's node name: exported graphs name their values after it
    names[node.name] = node
    node.meta.update(meta)
    return node


def unfuse(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """In place: the fused ``node`` becomes the BatchNorm call, the add (as written) and a SUGAR node,
    which is ``node`` itself (same name and metadata, less the fusion's record)."""
    module, c, residual, surrogate, params, negative_only, save, *rest = node.args
    module2 = rest[0] if rest else None
    info = dict(node.meta.get("sugarize", {}))
    record = info.pop("fused", None) or {}
    target, bn_name, bn_after, bn_meta = record.get("bn") or (module.target, "", "", {})
    names = {n.name: n for n in graph.nodes}
    with _place(graph, names, bn_after, node):
        x = _named(graph.call_module(target, (c,)), bn_name, names, bn_meta)
    if module2 is not None:  # the shortcut's BatchNorm call, on its input
        target2, name2, after2, meta2 = record.get("shortcut") or (module2.target, "", "", {})
        with _place(graph, names, after2, node):
            residual = _named(graph.call_module(target2, (residual,)), name2, names, meta2)
    if residual is not None:
        op, add_target, order, add_name, add_after, add_meta = record.get("add") or (
            "call_function", operator.add, 0, "", "", {})
        args = (x, residual) if order == 0 else (residual, x)
        with _place(graph, names, add_after, node):
            x = _named(graph.create_node(op, add_target, args, {}), add_name, names, add_meta)
    node.target, node.args = OP, (x, surrogate, params, negative_only, save)
    node.meta["sugarize"] = info
    for attr in (module, module2):
        if attr is not None and not attr.users:
            graph.erase_node(attr)
    return node

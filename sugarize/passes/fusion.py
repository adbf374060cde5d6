"""The fx path's fusions of an exact SUGAR node with its producer or its consumer; and back.

Each rule turns a SUGAR node into one call of a fused function of ``method/`` that keeps less
for the backward, with the same values and gradients:

- **BatchNorm** (``method/fused.py``): ``bn -> SUGAR``, ``bn -> add(residual) -> SUGAR`` and
  ``bn -> add(bn_s(shortcut input)) -> SUGAR`` become one ``bn_sugar`` node, which keeps no
  copy of x in eager mode.
- **Consumer** (``method/fused_linear.py``): ``SUGAR -> Linear`` and ``SUGAR -> mul(u) -> Linear``
  (a gated MLP) become one ``linear_sugar`` node, which keeps x (and u) but not ``relu(x)`` or the
  product, eager and compiled. Any other module read alone by the site (a Conv, a pooling, a LoRA
  wrapper: "Conv2d (output rebuilt)") becomes the same node; there the consumer keeps what it
  keeps, but its copy of ``relu(x)`` (or the product) is rebuilt from x (``method/rebuild.py``).

The rules are one table, ``RULES``: each ``FusionRule`` holds its match-and-rewrite, its undo, the
``SugarConfig`` switch that turns it on (``fuse_bn``, ``fuse_linear``) and its warm-up hook.
``fuse(graph, modules, enabled)`` runs the table at each SUGAR node, in order (a producer rule
before a consumer rule); ``unfuse`` finds a fused node's rule by its call target.

``fuse`` runs after the SUGAR rewrite, on exact (``save="full"``) SUGAR nodes. The fused node is
the SUGAR node itself (its name and report record), moved to where the consumer was for the
Linear rule. The modules stay in the module tree (a ``get_attr`` node reads them), so
``state_dict`` keys do not change. ``unfuse`` puts every erased node back, with its name,
metadata and place in the graph: strip and the audit's instrumented graph see the plain form,
and an export of the stripped model runs the ops in the original order.

The node layouts are ``opnodes``' (``FusedBN``, ``FusedLinear``); what was fused, and where
each erased node stood, is a ``FusedRecord`` in the node's ``meta["sugarize"]["fused"]``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.fx
import torch.nn as nn

from ..method.fused import fusable_module
from ..method.fused_linear import fusable_linear
from ..method.op import OP
from ..options import OpOptions
from .opnodes import FusedBN, FusedLinear, fused_nodes, fused_of, is_fused, options_of, sugar_args

__all__ = ["fuse", "unfuse", "unfuse_all", "is_fused", "fused_nodes", "FusedRecord", "Fusion", "record_of",
           "FusionRule", "RULES", "enabled", "rule_of"]


@dataclass(frozen=True)
class Erased:
    """A node a fusion erased, as ``unfuse`` puts it back: its call, name, the name of the node
    it followed, and its metadata. ``order`` is the fused input's operand index in a two-operand
    call (an add or a mul)."""

    op: str
    target: object
    name: str
    after: str
    meta: dict
    order: int = 0

    @classmethod
    def of(cls, node: torch.fx.Node, order: int = 0) -> "Erased":
        return cls(node.op, node.target, node.name, node.prev.name, dict(node.meta), order)


@dataclass(frozen=True)
class FusedRecord:
    """What a fused node fused (``what``, e.g. "BatchNorm2d + add", "mul + Linear"), and the nodes
    it erased, each by role ("bn", "add", "shortcut", "mul", "linear"; "sugar" is where the SUGAR
    node itself stood, for the Linear rule that moves it). Places are named as the graph stood
    when this fusion was made: undoing fusions in the reverse order (``unfuse_all``) puts every
    node back where it was."""

    what: str
    erased: tuple[tuple[str, Erased], ...]
    step: int = 0  # the order fusions were made in: unfuse_all undoes them last first

    def get(self, role: str) -> Erased | None:
        return dict(self.erased).get(role)


@dataclass(frozen=True)
class Fusion:
    """The outcome of ``fuse`` for a graph: ``{SUGAR node name: what was fused}`` and, for the other
    exact SUGAR nodes a consumer rule looked at, ``{name: why not fused}``."""

    fused: dict[str, str]
    unfused: dict[str, str]


def record_of(node: torch.fx.Node) -> FusedRecord | None:
    record = node.meta.get("sugarize", {}).get("fused")
    return record if isinstance(record, FusedRecord) else None


def _bn(node, modules) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.users) == 1
            and fusable_module(modules.get(node.target)) and len(node.args) == 1 and not node.kwargs)


def _operands(node, names: tuple) -> tuple | None:
    """The two tensors a plain two-operand call of ``names`` takes (``a + b``, ``torch.add(a, b)``,
    ``a.add(b)``)."""
    functions = {"add": (operator.add, torch.add), "mul": (operator.mul, torch.mul)}[names]
    if node.op == "call_function" and node.target in functions and len(node.args) == 2 and not node.kwargs:
        return node.args
    if node.op == "call_method" and node.target == names and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _fuse_bn(graph, node, x, modules, options: OpOptions, step: int) -> tuple[str | None, str]:
    if len(x.users) != 1:
        return None, ""
    add, residual, order = None, None, 0
    if _bn(x, modules):
        bn = x
    else:
        operands = _operands(x, "add")
        if operands is None:
            return None, ""
        index = next((i for i, a in enumerate(operands) if _bn(a, modules)), None)
        if index is None or not isinstance(operands[1 - index], torch.fx.Node):
            return None, ""
        add, bn, residual, order = x, operands[index], operands[1 - index], index
    # a downsampling shortcut's BatchNorm on the other side: fused too, so that its output
    # (kept by no layer of the ReLU model) is rebuilt rather than kept
    shortcut = residual if add is not None and _bn(residual, modules) else None
    with graph.inserting_before(node):
        module = graph.get_attr(bn.target)
        module2 = graph.get_attr(shortcut.target) if shortcut is not None else None
    what = (type(modules[bn.target]).__name__ + (" + add" if add is not None else "")
            + (f" + shortcut {type(modules[shortcut.target]).__name__}" if shortcut is not None else ""))
    erased = [("bn", Erased.of(bn))]
    if add is not None:
        erased.append(("add", Erased.of(add, order)))
    if shortcut is not None:
        erased.append(("shortcut", Erased.of(shortcut)))
    parts = FusedBN(module, bn.args[0], shortcut.args[0] if shortcut is not None else residual, options, module2)
    node.target, node.args = FusedBN.TARGET, parts.args
    for gone in (add, shortcut, bn):
        if gone is not None:
            graph.erase_node(gone)
    return _recorded(node, FusedRecord(what, tuple(erased), step)), ""


def _linear_consumer(node, modules) -> tuple[torch.fx.Node | None, torch.fx.Node | None, str]:
    """``(mul, module, "")`` where ``node``'s output reaches one module call alone, as its one argument
    (``mul`` None without a product), else ``(None, None, why not)``."""

    def reader(n) -> str:
        if n.op == "call_module":
            return type(modules.get(n.target)).__name__
        return n.op if n.op == "output" else str(getattr(n.target, "__name__", n.target))

    users = list(node.users)
    if len(users) != 1:
        return None, None, f"its output is read by {len(users)} nodes"
    user = users[0]
    mul = None
    operands = _operands(user, "mul")
    if operands is not None and sum(a is node for a in operands) == 1 \
            and isinstance(operands[1 - operands.index(node)], torch.fx.Node):
        if len(user.users) != 1:
            return None, None, f"its product is read by {len(user.users)} nodes"
        mul, user = user, next(iter(user.users))
    if user.op != "call_module" or not isinstance(modules.get(user.target), nn.Module):
        return None, None, f"read by {reader(user)}, not a module"
    if user.args != ((mul or node),) or user.kwargs:
        return None, None, f"the {reader(user)} takes other arguments"
    return mul, user, ""


def _fuse_linear(graph, node, x, modules, options: OpOptions, step: int) -> tuple[str | None, str]:
    mul, linear, why = _linear_consumer(node, modules)
    if linear is None:
        return None, why
    other = None
    erased = [("sugar", Erased.of(node))]
    if mul is not None:
        index = mul.args.index(node)
        other = mul.args[1 - index]
        erased.append(("mul", Erased.of(mul, index)))
    erased.append(("linear", Erased.of(linear)))
    linear.prepend(node)  # the fused node computes the Linear's output: it stands where the Linear stood
    with graph.inserting_before(node):
        module = graph.get_attr(linear.target)
    site = node.meta.get("sugarize", {}).get("path") or node.name
    node.target, node.args = FusedLinear.TARGET, FusedLinear(x, module, other, options, site).args
    consumer = modules[linear.target]
    linear.replace_all_uses_with(node)
    graph.erase_node(linear)
    if mul is not None:
        graph.erase_node(mul)
    what = ("mul + " if mul is not None else "") + _kind(consumer) + (
        "" if fusable_linear(consumer) else " (output rebuilt)")
    return _recorded(node, FusedRecord(what, tuple(erased), step)), ""


def _kind(module: nn.Module) -> str:
    """A module's class name, with its package where that is not torch ("peft Linear")."""
    package = type(module).__module__.split(".")[0]
    return type(module).__name__ if package == "torch" else f"{package} {type(module).__name__}"


def _recorded(node, record: FusedRecord) -> str:
    info = dict(node.meta.get("sugarize", {}))
    info["fused"] = record
    node.meta["sugarize"] = info
    return record.what


def fuse(graph: torch.fx.Graph, modules: dict[str, nn.Module], enabled: Iterable[str] | None = None) -> Fusion:
    """Runs the rules of ``RULES`` named in ``enabled`` (default: all), in place, at each exact
    SUGAR node: the first rule that matches fuses it.

    Returns what was fused at each fused node ("BatchNorm2d", "BatchNorm2d + add",
    "BatchNorm2d + add + shortcut BatchNorm2d", "Linear", "mul + Linear") and why each other
    exact node was not fused (a rule that looked at it and said why)."""
    on = [r for r in RULES if enabled is None or r.name in set(enabled)]
    fused: dict[str, str] = {}
    unfused: dict[str, str] = {}
    # each fusion's step, after those a graph holds already (unfuse_all undoes them last first)
    step = max((r.step for n in fused_nodes(graph) if (r := record_of(n)) is not None), default=0)
    for node in list(graph.find_nodes(op="call_function", target=OP)):
        options = options_of(node)
        x = node.args[0]
        if options.save != "full" or not isinstance(x, torch.fx.Node):
            continue
        for rule in on:
            what, why = rule.apply(graph, node, x, modules, options, step + 1)
            if what is not None:
                fused[node.name] = what
                unfused.pop(node.name, None)
                step += 1
                break
            if why:
                unfused[node.name] = why
    return Fusion(fused, unfused)


def unfuse_all(graph: torch.fx.Graph) -> None:
    """In place: every fused node of ``graph`` unfused, the last fusion made first."""
    nodes = fused_nodes(graph)
    names = {n.name: n for n in graph.nodes}  # kept up to date by each unfuse: one scan, not one per node
    for node in sorted(nodes, key=lambda n: -(r.step if (r := record_of(n)) is not None else 0)):
        unfuse(graph, node, names)


def _place(graph, names, after: str, default: torch.fx.Node):
    """Inserting after the node named ``after`` if it still exists, else before ``default``."""
    prev = names.get(after)
    return graph.inserting_after(prev) if prev is not None else graph.inserting_before(default)


def _restore(graph, names, gone: Erased, target, args, default: torch.fx.Node) -> torch.fx.Node:
    with _place(graph, names, gone.after, default):
        node = graph.create_node(gone.op, target, args, {})
    if gone.name and gone.name not in names:
        node.name = gone.name  # the original's node name: exported graphs name their values after it
    names[node.name] = node
    node.meta.update(gone.meta)
    return node


def unfuse(graph: torch.fx.Graph, node: torch.fx.Node, names: dict | None = None) -> torch.fx.Node:
    """In place: the fused ``node`` becomes a SUGAR node again (same name and metadata, less the
    fusion's record), with the nodes the fusion erased put back where they stood. ``names``: the
    graph's ``{name: node}``, if the caller keeps one (it is updated here)."""
    parts = fused_of(node)
    info = dict(node.meta.get("sugarize", {}))
    record = info.pop("fused", None)
    record = record if isinstance(record, FusedRecord) else FusedRecord("", ())
    names = {n.name: n for n in graph.nodes} if names is None else names
    return rule_of(node).undo(graph, node, parts, record, names, info)


def _unfuse_bn(graph, node, parts: FusedBN, record: FusedRecord, names, info) -> torch.fx.Node:
    gone = record.get("bn") or Erased("call_module", parts.bn.target, "", "", {})
    x = _restore(graph, names, gone, parts.bn.target, (parts.c,), node)
    residual = parts.residual
    if parts.shortcut is not None:  # the shortcut's BatchNorm call, on its input
        gone = record.get("shortcut") or Erased("call_module", parts.shortcut.target, "", "", {})
        residual = _restore(graph, names, gone, parts.shortcut.target, (residual,), node)
    if residual is not None:
        gone = record.get("add") or Erased("call_function", operator.add, "", "", {})
        x = _restore(graph, names, gone, gone.target, (x, residual) if gone.order == 0 else (residual, x), node)
    node.target, node.args = OP, sugar_args(x, parts.options)
    node.meta["sugarize"] = info
    for attr in (parts.bn, parts.shortcut):
        if attr is not None and not attr.users:
            names.pop(attr.name, None)
            graph.erase_node(attr)
    return node


def _unfuse_linear(graph, node, parts: FusedLinear, record: FusedRecord, names, info) -> torch.fx.Node:
    readers = list(node.users)
    node.target, node.args = OP, sugar_args(parts.x, parts.options)
    node.meta["sugarize"] = info
    sugar = record.get("sugar")
    if sugar is not None and sugar.after in names:
        names[sugar.after].append(node)  # back where the SUGAR call stood
    y = node
    gone = record.get("mul")
    if parts.other is not None:
        gone = gone or Erased("call_function", operator.mul, "", "", {})
        args = (node, parts.other) if gone.order == 0 else (parts.other, node)
        y = _restore(graph, names, gone, gone.target, args, readers[0] if readers else graph.output_node())
    gone = record.get("linear") or Erased("call_module", parts.linear.target, "", "", {})
    out = _restore(graph, names, gone, parts.linear.target, (y,), readers[0] if readers else graph.output_node())
    for reader in readers:
        reader.replace_input_with(node, out)
    if not parts.linear.users:
        names.pop(parts.linear.name, None)
        graph.erase_node(parts.linear)
    return node


def _warm_bn(options: OpOptions, dtype, device: str) -> bool:
    """The BatchNorm-fused backward's kernel (``kernels.compile_bn_grad_for``)."""
    from ..method import kernels

    return kernels.compile_bn_grad_for(options.surrogate, options.params, options.negative_only, dtype=dtype,
                                       device=device)


@dataclass(frozen=True)
class FusionRule:
    """One fusion, as ``fuse``, ``unfuse``, the config and ``warmup`` see it.

    ``apply(graph, node, x, modules, options, step)`` fuses the SUGAR ``node`` (its input ``x``) in
    place and returns ``(what was fused, "")``, or ``(None, why not)`` (``""``: not its kind of
    site). ``undo(graph, node, parts, record, names, info)`` puts it back. ``config_key`` is the
    ``SugarConfig`` field (and ``sugarize()`` keyword) that turns it on. ``warm(options, dtype,
    device)`` compiles the kernels its fused op's backward uses (None: the op's own)."""

    name: str
    config_key: str
    target: object  # the fused node's call target (a key of ``opnodes.FUSED_TARGETS``)
    apply: Callable
    undo: Callable
    warm: Callable | None = None


RULES: tuple[FusionRule, ...] = (
    FusionRule("bn", "fuse_bn", FusedBN.TARGET, _fuse_bn, _unfuse_bn, _warm_bn),
    FusionRule("linear", "fuse_linear", FusedLinear.TARGET, _fuse_linear, _unfuse_linear),
)


def enabled(cfg) -> frozenset[str]:
    """The names of the rules ``cfg`` (a ``SugarConfig``) turns on."""
    return frozenset(r.name for r in RULES if getattr(cfg, r.config_key))


def rule_of(node: torch.fx.Node) -> FusionRule:
    """The rule that made a fused node, by its call target."""
    return next(r for r in RULES if r.target is node.target)

"""How a SUGAR site is laid out in an fx node: written and read here, and nowhere else.

A SUGAR node calls ``OP(x, *options.args)`` (``OpOptions``, the op schema's order). A fused
node (``fusion.py``) calls a fused function of ``method/`` with its parts, then the same four
option arguments; its parts are a typed record (``FusedBN``, ``FusedLinear``). Every pass
builds and reads nodes through ``sugar_args``, ``options_of``, ``input_of`` and the records'
``args``/``of_node``: changing a layout is one edit here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx
from torch.fx import Node

from ..method.fused import bn_sugar
from ..method.fused_linear import linear_sugar
from ..method.op import OP
from ..options import OpOptions

__all__ = ["sugar_args", "options_of", "input_of", "is_sugar", "is_fused", "FusedBN", "FusedLinear",
           "FUSED_TARGETS", "fused_of", "fused_nodes"]


def sugar_args(x, options: OpOptions) -> tuple:
    """The arguments of a SUGAR node on input ``x``."""
    return (x, *options.args)


def is_fused(node: Node) -> bool:
    return node.op == "call_function" and node.target in FUSED_TARGETS


def is_sugar(node: Node) -> bool:
    """A SUGAR node: the op, or the op fused with its producer or its consumer (``fusion.py``)."""
    return node.op == "call_function" and (node.target is OP or node.target in FUSED_TARGETS)


def options_of(node: Node) -> OpOptions:
    """The SUGAR op's options of a SUGAR node, fused or not."""
    if node.target is OP:
        return OpOptions.of_args(node.args[1:5])
    return fused_of(node).options


def input_of(node: Node):
    """The input ``x`` of an (unfused) SUGAR node."""
    return node.args[0]


@dataclass(frozen=True)
class FusedBN:
    """A ``bn_sugar`` node: ``sugar(bn(c) + residual)``, or ``sugar(bn(c) + shortcut(residual))``.

    ``bn``/``shortcut`` are ``get_attr`` nodes of the BatchNorm modules; ``residual`` is None
    for ``sugar(bn(c))``."""

    bn: Node
    c: Node
    residual: Node | None
    options: OpOptions
    shortcut: Node | None = None

    TARGET = staticmethod(bn_sugar)

    @property
    def args(self) -> tuple:
        base = (self.bn, self.c, self.residual, *self.options.args)
        return base + (self.shortcut,) if self.shortcut is not None else base

    @classmethod
    def of_node(cls, node: Node) -> "FusedBN":
        bn, c, residual, surrogate, params, negative_only, save, *rest = node.args
        return cls(bn, c, residual, OpOptions.of_args((surrogate, params, negative_only, save)),
                   rest[0] if rest else None)


@dataclass(frozen=True)
class FusedLinear:
    """A ``linear_sugar`` node: ``linear(sugar(x))``, or ``linear(sugar(x) * other)`` (a gated MLP).

    ``linear`` is a ``get_attr`` node of the consumer module (an ``nn.Linear``, or any module whose
    saved copy of the output is rebuilt); ``other`` is None without the product; ``site`` is the
    site's path (for the note where it runs unfused)."""

    x: Node
    linear: Node
    other: Node | None
    options: OpOptions
    site: str = ""

    TARGET = staticmethod(linear_sugar)

    @property
    def args(self) -> tuple:
        return (self.x, self.linear, self.other, *self.options.args, self.site)

    @classmethod
    def of_node(cls, node: Node) -> "FusedLinear":
        x, linear, other, surrogate, params, negative_only, save, *site = node.args
        return cls(x, linear, other, OpOptions.of_args((surrogate, params, negative_only, save)), *site)


FUSED_TARGETS = {FusedBN.TARGET: FusedBN, FusedLinear.TARGET: FusedLinear}


def fused_of(node: Node) -> FusedBN | FusedLinear:
    """The typed parts of a fused node."""
    return FUSED_TARGETS[node.target].of_node(node)


def fused_nodes(graph: torch.fx.Graph) -> list[Node]:
    """The fused nodes of ``graph``, in graph order."""
    found = [n for target in FUSED_TARGETS for n in graph.find_nodes(op="call_function", target=target)]
    if len(found) < 2:
        return found
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(found, key=order.__getitem__)

"""A SUGAR site feeding any module keeps ``x`` alone: what its consumer saves of the SUGAR output is
rebuilt from ``x`` at the backward.

The exact SUGAR op keeps ``s'(x)``, and the module that reads the op's output keeps that output (or
a product with it, in a gated MLP): two tensors of x's size where ReLU keeps one (its output, shared
with the consumer). ``sugar_into`` runs the site as one call: the SUGAR output from an autograd
function that saves ``x`` (its backward is ``grad * s'(x)``, the exact op's values), then the product
and the consumer under ``torch.autograd.graph.saved_tensors_hooks`` that pack the output (or the
product, or a view of either) as a reference to ``x`` (and ``other``) and rebuild it on unpack. So
any consumer: a LoRA wrapper (with or without dropout), a Conv, a subclass with its own forward, a
module with hooks, and autocast (where the consumer's inputs are already in the autocast dtype, as
after a Linear; a cast copy is kept as ReLU's model keeps it). The hooks are scoped to that one
call: nothing process-wide changes.

It applies in plain eager execution with gradients, for plain tensors and the exact ``save="full"``:
elsewhere (a tracer, ``torch.compile``, a tensor subclass such as DTensor, a compressed mode) the
site runs the op and the consumer as they are (``why_not`` says why).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .kernels import enabled, fused_grad, scoped, traced
from .op import OP
from .saved import derivative_times

__all__ = ["sugar_into", "why_not", "input_grad", "TRACED"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def input_grad(g: torch.Tensor, x: torch.Tensor, formula: tuple, kernels: bool) -> torch.Tensor:
    """``g * s'(x)`` exactly as the unfused op computes it (``formula``: surrogate, params,
    negative_only), in eager mode; the fused kernels where the model turned them on."""
    with scoped(kernels):
        out = fused_grad(g, x, *formula)
    return out if out is not None else derivative_times(g, x, *formula)


class _KeepX(torch.autograd.Function):
    """``relu(x)`` forward, ``grad * s'(x)`` backward, keeping ``x`` (not ``s'(x)``)."""

    @staticmethod
    def forward(ctx, x, formula, kernels):
        ctx.save_for_backward(x)
        ctx.formula, ctx.kernels = formula, kernels
        # the SUGAR op itself (relu's value; nothing recorded for autograd in here): call counters and
        # the audit's recorder see a SUGAR call, as on the unfused path
        return OP(x, *formula, "full")

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return input_grad(grad, x, ctx.formula, ctx.kernels), None, None


TRACED = "traced or compiled (the compiler decides what is kept)"


def why_not(x: torch.Tensor, other: torch.Tensor | None, save: str) -> str:
    """Why the site cannot keep ``x`` alone here ("" where it can; ``TRACED`` under a tracer or
    compiler, which is no loss)."""
    if save != "full":
        return f"save={save!r} keeps its own compressed form"
    if not torch.is_grad_enabled():
        return ""  # nothing is kept without gradients: the plain calls cost nothing more
    if isinstance(x, torch.fx.Proxy) or isinstance(other, torch.fx.Proxy) or torch.compiler.is_compiling():
        return TRACED
    for t in (x, other):
        if t is not None and type(t) not in _PLAIN:
            return f"a {type(t).__name__} input"
    return TRACED if traced(x) else ""


class _Rebuilt:
    """What a consumer's saved copy of the site's output is packed as: ``x`` (and ``other``) as the
    outer hooks packed them, and the layout of the view that was saved."""

    __slots__ = ("x", "other", "size", "stride", "offset")

    def __init__(self, x, other, t):
        self.x, self.other = x, other
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def value(self, unpack) -> torch.Tensor:
        with torch.no_grad():
            y = torch.relu(unpack(self.x))
            if self.other is not None:
                y = y * unpack(self.other)
        if y.size() == self.size and y.stride() == self.stride and self.offset == 0:
            return y
        return y.as_strided(self.size, self.stride, self.offset)


class _Plain:
    """Any other saved tensor, as the outer hooks packed it."""

    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


def _same(t):
    return t


def _outer_hooks() -> tuple[Callable, Callable]:
    """The saved-tensor hooks already in force (activation checkpointing, CPU offload, a counter): the
    site's hooks hand every tensor on to them, so they see ``x`` where the output was saved."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _: None)(False)
    return top if top is not None else (_same, _same)


def _layout(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.dtype, t.device


def sugar_into(consumer: Callable, x: torch.Tensor, other: torch.Tensor | None, surrogate: str,
               params: Sequence[float], negative_only: bool) -> torch.Tensor:
    """``consumer(sugar(x))``, or ``consumer(sugar(x) * other)``, keeping ``x`` (and ``other``) where the
    unfused calls keep ``s'(x)``, the output and the product too. Same values and gradients as the
    unfused calls (the caller checks ``why_not`` first)."""
    formula = (surrogate, list(params), bool(negative_only))
    y = _KeepX.apply(x, formula, enabled())
    if not y.requires_grad or not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return consumer(y if other is None else y * other)
    outer_pack, outer_unpack = _outer_hooks()
    rebuilt: dict[tuple, tuple] = {_layout(y): (x, None)}

    def pack(t):
        if type(t) in _PLAIN and t.numel() > 0:
            found = rebuilt.get(_layout(t))
            if found is not None:  # x (and other) handed on once per saved copy: checkpointing unpacks each once
                x_, other_ = found
                return _Rebuilt(outer_pack(x_), None if other_ is None else outer_pack(other_), t)
        return _Plain(outer_pack(t))

    def unpack(v):
        return v.value(outer_unpack) if isinstance(v, _Rebuilt) else outer_unpack(v.packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        if other is not None:
            y = y * other
            rebuilt[_layout(y)] = (x, other)
        return consumer(y)

"""SUGAR + the Linear that reads it (``linear(sugar(x))``, or ``linear(sugar(x) * u)`` in a gated MLP)
as one op that keeps ``x`` (and ``u``) but not ``relu(x)`` or the product.

The exact SUGAR op keeps ``s'(x)`` (or ``x``) for its backward, and the Linear after it keeps its
own input, ``relu(x)`` (or the product ``relu(x) * u``): two tensors of x's size per site where
ReLU keeps one (its output, which the Linear shares). Both are cheap to rebuild from ``x``:
``relu(x)`` is one pass, and the Linear only reads it for its weight gradient. ``linear_sugar``
runs ``torch.ops.sugarize.sugar_linear``, a custom op whose forward is the unfused computation
(the same ATen calls, so the output is bit for bit the unfused one's) and whose backward rebuilds
``relu(x)`` (and the product) from the saved ``x`` and ``u``: it keeps what the ReLU model keeps at
a plain site, and one tensor less at a gated one (ReLU keeps ``relu(x)``, ``u`` and the product).

Being one opaque op with its own autograd formula, it keeps the same tensors under
``torch.compile`` (AOTAutograd saves the op's saved inputs; nothing for the partitioner to
re-decide) and decomposes to ``linear(relu(x) [* u])`` for exporters.

Everywhere else the function is the SUGAR op, the product and the module call, unfused: with no
gradient needed, under an fx trace, for a consumer that is not a plain ``nn.Linear`` (a LoRA
wrapper swapped in after conversion, a subclass with its own forward), a module with hooks
(tensor parallel's input/output hooks among them), a tensor subclass (DTensor), autocast, or
operands whose shape, dtype or device differ.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import sharding
from .fused import has_hooks
from .kernels import enabled, fused_grad, scoped, traced
from .op import GRAD_OP, OP
from .saved import decode_mul, encode_saved, surrogate_derivative

__all__ = ["linear_sugar", "fusable_linear", "LINEAR_OP"]

_PLAIN = (torch.Tensor, nn.Parameter)


def fusable_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is ``nn.Linear.forward`` (not a LoRA wrapper, not a subclass
    with its own forward, not a lazy one before its first call)."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and not isinstance(module.weight, nn.parameter.UninitializedParameter))


def _fuse_now(x, other, linear: nn.Module) -> bool:
    if not torch.is_grad_enabled() or isinstance(x, torch.fx.Proxy) or isinstance(other, torch.fx.Proxy):
        return False
    if not fusable_linear(linear) or has_hooks(linear):
        return False
    tensors = [x, linear.weight] + [t for t in (other, linear.bias) if t is not None]
    if any(type(t) not in _PLAIN for t in tensors) or torch.is_autocast_enabled(x.device.type):
        return False
    if other is not None and (other.shape != x.shape or other.dtype != x.dtype or other.device != x.device):
        return False
    w = linear.weight
    if x.dim() == 0 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype or x.device != w.device:
        return False
    return any(t.requires_grad for t in tensors)


def linear_sugar(x: torch.Tensor, linear: nn.Module, other: torch.Tensor | None, surrogate: str,
                 params: Sequence[float], negative_only: bool, save: str) -> torch.Tensor:
    """``linear(sugar(x))``, or ``linear(sugar(x) * other)``, fused where it can be (module docstring).

    The value is exactly the unfused one's. The call target of a fused fx node (``passes/fusion.py``)."""
    if save != "full" or not _fuse_now(x, other, linear):
        y = OP(x, surrogate, params, negative_only, save)
        if other is not None:
            y = y * other
        return linear(y)
    return LINEAR_OP(x, other, linear.weight, linear.bias, surrogate, list(params), bool(negative_only))


def _product(x, other):
    y = torch.relu(x)
    return y if other is None else y * other


@torch.library.custom_op("sugarize::sugar_linear", mutates_args=())
def _sugar_linear_op(x: torch.Tensor, other: torch.Tensor | None, weight: torch.Tensor,
                     bias: torch.Tensor | None, surrogate: str, params: Sequence[float],
                     negative_only: bool) -> torch.Tensor:
    return F.linear(_product(x, other), weight, bias)


@_sugar_linear_op.register_fake
def _(x, other, weight, bias, surrogate, params, negative_only):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, other, weight, bias, surrogate, params, negative_only = inputs
    if type(x) is not torch.Tensor:
        sharding.register_for(x, other, weight)  # a DTensor: rules for the ops (once per process)
    ctx.formula = (surrogate, list(params), bool(negative_only))
    ctx.has_bias = bias is not None
    ctx.kernels = enabled()  # the running model's setting, for the backward
    ctx.save_for_backward(x, other, weight)


def _backward(ctx, grad):
    x, other, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    rows = grad.reshape(-1, grad.shape[-1])
    gw = gb = gx = gother = None
    y = torch.relu(x)  # rebuilt: the one tensor of x's size this op holds that the unfused one kept
    if needs[2]:  # the Linear's weight gradient g^T p, laid out as the weight is (row-major)
        p = y if other is None else y * other
        gw = rows.t().mm(p.reshape(-1, p.shape[-1]))
        del p
    if needs[3] and ctx.has_bias:
        gb = rows.sum(0)
    if needs[0] or needs[1]:
        gp = grad.matmul(weight)
        if other is not None:
            gother = gp * y if needs[1] else None
            gp = gp * other
        del y
        if needs[0]:
            gx = _input_grad(gp, x, ctx)
    return gx, gother, gw, gb, None, None, None


def _input_grad(gp, x, ctx):
    """``gp * s'(x)``, as the exact op computes it."""
    if traced(x):  # one elementwise op of x for a compiler (method/compiled.py)
        return GRAD_OP(gp, x, *ctx.formula)
    with scoped(ctx.kernels):  # the model's own setting (kernels.use_kernels)
        gx = fused_grad(gp, x, *ctx.formula)
    if gx is not None:
        return gx
    d = surrogate_derivative(x, *ctx.formula)
    if d.dtype == gp.dtype and d.shape == gp.shape:
        return d.mul_(gp)  # gp * s'(x) in s'(x)'s own buffer (the unfused op's value: x * y == y * x)
    return decode_mul(gp, encode_saved(d, x.dtype, "full", None), "full", None)


_sugar_linear_op.register_autograd(_backward, setup_context=_setup_context)

LINEAR_OP = torch.ops.sugarize.sugar_linear.default


def _decomposition(x, other, weight, bias, surrogate, params, negative_only):
    return F.linear(_product(x, other), weight, bias)


# After autograd: SUGAR is ReLU, and the fused op the ReLU, the product and the Linear.
torch._decomp.register_decomposition(LINEAR_OP)(_decomposition)

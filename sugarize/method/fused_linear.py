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

Where this op does not apply, the site still keeps ``x`` alone (``rebuild.py``): for a consumer that
is not a plain ``nn.Linear`` (a LoRA wrapper, before or after conversion; a Conv; a subclass with
its own forward), a module with hooks (tensor parallel's input/output hooks among them), autocast,
or operands whose shape, dtype or device differ. Only under a tracer or compiler (which decide what
is kept), for a tensor subclass (DTensor) or a compressed ``save`` mode does it run the SUGAR op, the
product and the module call unfused; a site reported fused that runs so says it once, naming itself
and why.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import sharding
from ..errors import SugarizeWarning
from .fused import fusable_call, same_layout
from .kernels import enabled, traced
from .op import GRAD_OP, OP
from .rebuild import TRACED, input_grad, sugar_into, why_not

__all__ = ["linear_sugar", "fusable_linear", "LINEAR_OP"]

_PLAIN = (torch.Tensor, nn.Parameter)


def fusable_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is ``nn.Linear.forward`` (not a LoRA wrapper, not a subclass
    with its own forward, not a lazy one before its first call)."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and not isinstance(module.weight, nn.parameter.UninitializedParameter))


def _fuse_now(x, other, linear: nn.Module) -> bool:
    if not fusable_call((x, other), (linear,), fusable_linear):
        return False
    tensors = [x, linear.weight] + [t for t in (other, linear.bias) if t is not None]
    if any(type(t) not in _PLAIN for t in tensors) or torch.is_autocast_enabled(x.device.type):
        return False
    if other is not None and not same_layout(other, x):
        return False
    w = linear.weight
    if x.dim() == 0 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype or x.device != w.device:
        return False
    return any(t.requires_grad for t in tensors)


_SAID: set[tuple[str, str]] = set()  # (site, why) said once


def linear_sugar(x: torch.Tensor, linear: nn.Module, other: torch.Tensor | None, surrogate: str,
                 params: Sequence[float], negative_only: bool, save: str, site: str = "") -> torch.Tensor:
    """``linear(sugar(x))``, or ``linear(sugar(x) * other)``, fused where it can be (module docstring);
    ``linear`` may be any module (its output is then rebuilt, ``rebuild.py``).

    The value is exactly the unfused one's. The call target of a fused fx node (``passes/fusion.py``);
    ``site`` is the site's path, for the one note where it runs unfused."""
    if save == "full" and _fuse_now(x, other, linear):
        return LINEAR_OP(x, other, linear.weight, linear.bias, surrogate, list(params), bool(negative_only))
    why = why_not(x, other, save)
    if not why:
        return sugar_into(linear, x, other, surrogate, params, negative_only)
    if site and why != TRACED and (site, why) not in _SAID:
        _SAID.add((site, why))
        warnings.warn(f"SUGAR site {site} is reported fused with its {type(linear).__name__} but runs unfused "
                      f"here ({why}): it keeps s'(x) beside what the {type(linear).__name__} keeps",
                      SugarizeWarning, stacklevel=2)
    y = OP(x, surrogate, params, negative_only, save)
    if other is not None:
        y = y * other
    return linear(y)


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
    return input_grad(gp, x, ctx.formula, ctx.kernels)  # the model's own kernel setting (kernels.use_kernels)


_sugar_linear_op.register_autograd(_backward, setup_context=_setup_context)

LINEAR_OP = torch.ops.sugarize.sugar_linear.default


def _decomposition(x, other, weight, bias, surrogate, params, negative_only):
    return F.linear(_product(x, other), weight, bias)


# After autograd: SUGAR is ReLU, and the fused op the ReLU, the product and the Linear.
torch._decomp.register_decomposition(LINEAR_OP)(_decomposition)

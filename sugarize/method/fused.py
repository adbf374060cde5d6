"""BatchNorm (+ a residual add) + SUGAR as one eager op that keeps no copy of x.

The exact SUGAR op keeps ``s'(x)`` for its backward: one tensor of x's size per site that
ReLU does not keep (ReLU's output is kept by the next layer anyway). Where x is a
BatchNorm's output (``relu(bn(c))``) or that output plus a residual (``relu(bn(c) + r)``),
x is cheap to rebuild from what BatchNorm keeps anyway: its input ``c``, the batch mean and
inverse std, and its affine parameters. ``bn_sugar`` does that in eager mode: the forward
runs BatchNorm exactly as ``nn.BatchNorm*d.forward`` does (same ATen call, so the output,
the running statistics and ``num_batches_tracked`` are bit for bit BatchNorm's), the add,
and ``relu``; the backward rebuilds ``x``, takes ``grad * s'(x)`` and runs BatchNorm's own
backward on it. It saves ``c``, the statistics and ``r``: what the ReLU model keeps. Where
``r`` is a downsampling shortcut's BatchNorm output (kept by no layer of the ReLU model),
that BatchNorm is fused too (``relu(bn(c) + bn_s(c_s))``): ``r`` is rebuilt from ``c_s``, which
the shortcut's BatchNorm keeps anyway.

Everywhere else the function is BatchNorm, the add and the SUGAR op, unfused: under any
tracer or compiler (``torch.compile`` recomputes x by itself, and its partitioner must see
BatchNorm), without gradients, with a compressed ``save`` mode, with hooks on the
BatchNorm module, or for a residual that broadcasts or has another dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .kernels import enabled, fused_bn_grad, scoped, traced
from .op import OP
from .saved import derivative_times

__all__ = ["bn_sugar", "fusable_module", "has_hooks"]


def fusable_module(module: nn.Module) -> bool:
    """A BatchNorm whose forward is ``_BatchNorm.forward`` (BatchNorm1d/2d/3d and subclasses that
    keep it); not SyncBatchNorm, LazyBatchNorm before its first call, or a user's own forward."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return (isinstance(module, _BatchNorm) and type(module).forward is _BatchNorm.forward
            and not isinstance(module, nn.SyncBatchNorm)
            and not any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()))


def has_hooks(module: nn.Module) -> bool:
    """Forward hooks on ``module``, or the process's global module hooks
    (``register_module_forward_hook``): a fused call would skip them. Torch has no public way to
    ask for the global ones, so its module tables are read (read only)."""
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks or getattr(m, "_global_forward_hooks_always_called", None))


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a second operand (a residual, a gate) has the first's shape, dtype and device."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def fusable_call(tensors, modules, fusable) -> bool:
    """The gate every fused eager op shares before it fuses: gradients on (nothing is kept
    without them), no fx tracer's Proxy among ``tensors``, and each of ``modules`` one that
    ``fusable`` accepts (its forward the stock one) and free of hooks (a fused call skips them).
    Where it says no, the op runs its unfused calls."""
    if not torch.is_grad_enabled() or any(isinstance(t, torch.fx.Proxy) for t in tensors):
        return False
    return all(fusable(m) and not has_hooks(m) for m in modules)


def _fuse_now(bn: nn.Module, c, residual, save: str, shortcut: nn.Module | None) -> bool:
    tensors = (c,) if residual is None else (c, residual)
    modules = (bn,) if shortcut is None else (bn, shortcut)
    if torch.compiler.is_compiling() or save != "full" or not fusable_call(tensors, modules, fusable_module):
        return False
    if traced(*tensors) or (residual is not None and not same_layout(residual, c)):
        return False
    return any(t.requires_grad for t in tensors) or any(
        p.requires_grad for m in modules for p in (m.weight, m.bias) if p is not None)


def _prelude(bn: nn.Module, c: torch.Tensor) -> tuple:
    """``_BatchNorm.forward`` up to its ``F.batch_norm`` call, step for step: the arguments of that
    call (``num_batches_tracked`` counted as it counts it)."""
    bn._check_input_dim(c)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    if training:
        torch.nn.functional._verify_batch_size(c.size())
    return (c, bn.weight, bn.bias, bn.running_mean if keep else None, bn.running_var if keep else None,
            training, factor, bn.eps)


def bn_sugar(bn: nn.Module, c: torch.Tensor, residual: torch.Tensor | None, surrogate: str,
             params: Sequence[float], negative_only: bool, save: str,
             shortcut: nn.Module | None = None) -> torch.Tensor:
    """``sugar(bn(c) + residual)`` (``residual`` None: ``sugar(bn(c))``), fused in eager mode. With
    ``shortcut`` (a downsampling shortcut's BatchNorm), ``residual`` is that BatchNorm's input:
    ``sugar(bn(c) + shortcut(residual))``.

    The value is exactly the unfused one's; the BatchNorms' running statistics change exactly as
    calling them changes them. The call target of a fused fx node (``passes/fusion.py``)."""
    if not _fuse_now(bn, c, residual, save, shortcut):
        x = bn(c)
        if residual is not None:
            x = x + (residual if shortcut is None else shortcut(residual))
        return OP(x, surrogate, params, negative_only, save)
    args = dict(zip(_BN_ARGS, _prelude(bn, c)))
    if shortcut is not None:
        args.update(zip((f"{n}2" for n in _BN_ARGS), _prelude(shortcut, residual)))
    args.update(residual=residual if shortcut is None else None, surrogate=surrogate, params=tuple(params),
                negative_only=bool(negative_only))
    return _BNSugar.apply(*(args.get(name) for name in _INPUTS))


def _affine(weight, bias, mean, invstd):
    """Per channel ``(alpha, beta)`` with BatchNorm's output ``c * alpha + beta``, as ATen's CPU
    kernel computes it (in float32 or better)."""
    alpha = invstd if weight is None else invstd * weight
    beta = -mean * alpha if bias is None else bias - mean * alpha
    return alpha, beta


def _rebuild(c, alpha, beta, dtype):
    """BatchNorm's output from its input, rounded to the output's dtype."""
    shape = [1, -1] + [1] * (c.dim() - 2)
    return torch.addcmul(beta.view(shape), c, alpha.view(shape)).to(dtype)


def _bn_forward(c, weight, bias, running_mean, running_var, training, momentum, eps):
    out, mean, invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
        c, weight, bias, running_mean, running_var, training, momentum, eps, torch.backends.cudnn.enabled)
    # Training mode: the batch statistics; the running ones change with every forward and the
    # backward does not read them. Eval mode: the running ones.
    saved = (c, weight, bias, None if training else running_mean, None if training else running_var,
             mean, invstd, reserve)
    return out, saved, (training, eps, impl)


def _bn_rebuild(saved, meta, dtype):
    c, weight, bias, running_mean, running_var, mean, invstd, _ = saved
    training, eps, _ = meta
    if training:
        return _affine(weight, bias, mean, invstd)
    return _affine(weight, bias, running_mean, torch.rsqrt(running_var.float() + eps))


def _bn_backward(saved, meta, g, needs):
    c, weight, bias, running_mean, running_var, mean, invstd, reserve = saved
    training, eps, impl = meta
    return torch.ops.aten._batch_norm_impl_index_backward(
        impl, c, g, weight, running_mean, running_var, mean, invstd, training, eps, list(needs), reserve)


_BN_ARGS = ("c", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
# The autograd function's inputs by name, in order: BatchNorm 1's arguments, the plain residual,
# BatchNorm 2's (the shortcut's, suffixed 2), then the surrogate's options. forward and backward
# read them through this one list, never by position.
_INPUTS = _BN_ARGS + ("residual",) + tuple(f"{n}2" for n in _BN_ARGS) + ("surrogate", "params", "negative_only")


def _bn_inputs(args: dict, suffix: str = "") -> tuple:
    return tuple(args[n + suffix] for n in _BN_ARGS)


class _BNSugar(torch.autograd.Function):
    """``relu(bn(c) + residual)`` (or ``+ bn2(c2)``) keeping what BatchNorm keeps: inputs ``_INPUTS``."""

    @staticmethod
    def forward(ctx, *inputs):
        args = dict(zip(_INPUTS, inputs, strict=True))
        out, saved, meta = _bn_forward(*_bn_inputs(args))
        saved2, meta2 = (), None
        residual = args["residual"]
        if args["c2"] is not None:
            out2, saved2, meta2 = _bn_forward(*_bn_inputs(args, "2"))
            out = out + out2
            del out2
        elif residual is not None:
            out = out + residual
        out = out.relu_()
        ctx.save_for_backward(*saved, residual, *saved2)
        ctx.options = (meta, meta2, args["surrogate"], list(args["params"]), args["negative_only"], out.dtype)
        ctx.kernels = enabled()  # the running model's setting (kernels.use_kernels), for the backward
        return out

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        n = len(_BN_ARGS)  # _bn_forward saves as many tensors as BatchNorm takes arguments
        saved, residual, saved2 = tensors[:n], tensors[n], tensors[n + 1:]
        meta, meta2, surrogate, params, negative_only, dtype = ctx.options
        needs = dict(zip(_INPUTS, ctx.needs_input_grad, strict=True))
        grads: dict[str, torch.Tensor | None] = {}
        with torch.no_grad():
            alpha, beta = _bn_rebuild(saved, meta, dtype)
            if meta2 is not None:  # the shortcut's BatchNorm output: rebuilt too, not kept
                residual = _rebuild(saved2[0], *_bn_rebuild(saved2, meta2, dtype), dtype)
            with scoped(ctx.kernels):  # the setting of the model whose forward saved this
                g = fused_bn_grad(grad, saved[0], alpha, beta, residual, surrogate, params, negative_only)
            if g is None:  # the eager formulas (the default): a few passes over memory
                x = _rebuild(saved[0], alpha, beta, dtype)
                if residual is not None:
                    x = x.add_(residual)
                g = derivative_times(grad, x, surrogate, params, negative_only)
                del x
            del residual
            grads["c"], grads["weight"], grads["bias"] = _bn_backward(
                saved, meta, g, (needs["c"], needs["weight"], needs["bias"]))
            if meta2 is not None:
                grads["c2"], grads["weight2"], grads["bias2"] = _bn_backward(
                    saved2, meta2, g, (needs["c2"], needs["weight2"], needs["bias2"]))
            if needs["residual"]:
                grads["residual"] = g
        return tuple(grads.get(name) for name in _INPUTS)

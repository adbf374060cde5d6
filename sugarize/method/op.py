"""The SUGAR op: forward ``relu`` bit for bit, backward ``grad * s'(x)``.

It is a ``torch.library`` custom op (``torch.ops.sugarize.sugar``), so it stays one opaque
node when a converted model is traced again by ``torch.fx.symbolic_trace``,
``torch.export`` or ``torch.compile`` (a plain ``autograd.Function`` would be inlined and
its surrogate gradient silently lost). A post-autograd decomposition to ``aten.relu``
makes ``torch.onnx.export`` emit a plain ``Relu`` even when a model was not stripped.

What the op keeps for the backward pass is chosen by ``save``:

- ``"full"`` (the default): exact. In eager mode ``s'(x)`` is computed in the forward, in
  float32 or better, and kept in the input's dtype: one extra tensor of x's size and dtype
  per site (GELU's cost). Under ``torch.compile`` nothing is kept beyond what ReLU keeps:
  ``x`` is recomputed in the backward from what the backward holds anyway (compiled.py).
- ``"bfloat16"`` (opt-in): half the memory; relative error 2**-9 (0.2 %) on every value.
- ``"uint8"`` (opt-in): a quarter; a uniform grid of step 1/k per surrogate (0 and 1
  exact), absolute error half a step. Refused for a surrogate whose derivative on
  x <= 0 the grid cannot represent (``save_error`` states each mode's worst case).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import compiled, sharding
from ..options import DEFAULT_SAVE, DEFAULT_SURROGATE
from .kernels import enabled, fused_decode, fused_encode, scoped, traced
from .saved import decode_mul, surrogate_derivative, encode_saved, grad_math, saved_grid, plain_saved, saved_dtype, check_options
from .surrogates import resolve_params

__all__ = ["sugar", "surrogate_grad", "OP", "FORWARD_OP", "GRAD_OP"]


def _eager_saved(x, surrogate, params, negative_only, save, grid):
    """The saved form of ``s'(x)`` in plain eager execution: the fused kernel where it applies."""
    saved = fused_encode(x, surrogate, params, negative_only, save, grid)
    if saved is None:
        saved = encode_saved(surrogate_derivative(x, surrogate, params, negative_only), x.dtype, save, grid)
    return saved


def _forward_math(x, surrogate, params, negative_only, save):
    """``(relu(x), saved form of s'(x))`` with the plain formula: what a compiler fuses."""
    return torch.relu(x), plain_saved(x, surrogate, params, negative_only, save,
                                       saved_grid(surrogate, params, negative_only, save))


@torch.library.custom_op("sugarize::sugar_forward", mutates_args=())
def _sugar_forward_op(
    x: torch.Tensor, surrogate: str, params: Sequence[float], negative_only: bool, save: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal: ``relu(x)`` and the saved form of ``s'(x)`` in one op, for compilers (compiled.py).

    It has no backward formula: only the SUGAR op's decomposition and ``setup_context``
    call it, below autograd."""
    return torch.relu(x), _eager_saved(x, surrogate, params, negative_only, save,
                                       saved_grid(surrogate, params, negative_only, save))


@_sugar_forward_op.register_fake
def _(x, surrogate, params, negative_only, save):
    return torch.empty_like(x), torch.empty_like(x, dtype=saved_dtype(x.dtype, save))


@torch.library.custom_op("sugarize::sugar_grad", mutates_args=())
def _sugar_grad_op(
    grad: torch.Tensor, x: torch.Tensor, surrogate: str, params: Sequence[float], negative_only: bool
) -> torch.Tensor:
    """Internal: the exact backward ``grad * s'(x)`` as one op of ``x``, for compilers.

    The SUGAR op's backward calls it when traced with ``save="full"``. Inductor lowers it to
    one elementwise expression (compiled.py), so the recomputed ``x`` and ``s'(x)`` stay in
    registers instead of being written to memory between kernels."""
    return grad_math(grad, x, surrogate, params, negative_only)


@_sugar_grad_op.register_fake
def _(grad, x, surrogate, params, negative_only):
    return torch.empty_like(grad)


@torch.library.custom_op("sugarize::sugar", mutates_args=())
def _sugar_op(
    x: torch.Tensor, surrogate: str, params: Sequence[float], negative_only: bool, save: str
) -> torch.Tensor:
    return torch.relu(x)


@_sugar_op.register_fake
def _(x, surrogate, params, negative_only, save):
    if torch.compiler.is_compiling():  # Dynamo's first look at the op: Inductor compiles next
        compiled.register(OP, FORWARD_OP, _forward_math, GRAD_OP, grad_math)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, surrogate, params, negative_only, save = inputs
    if type(x) is not torch.Tensor:
        sharding.register_for(x)  # a DTensor: the backward's op needs its rule (once per process)
    ctx.kernels = enabled()  # the running model's setting: its backward decodes the same way
    ctx.save = save
    ctx.grid = saved_grid(surrogate, params, negative_only, save)
    ctx.formula = None
    if save == "full" and traced(x):
        # exact and traced: keep x itself, and let the backward's formula be seen as one
        # elementwise op of x (compiled.py): a compiler recomputes x from what it keeps
        # anyway (BatchNorm's input and statistics, a residual's operands) and saves nothing
        ctx.formula = (surrogate, list(params), negative_only)
        # a copy, because the model may overwrite x in place after this op (relu_ on the
        # runtime path): free under a compiler, which recomputes both
        saved = x.clone()
        compiled.prefer_recompute(x)
        compiled.prefer_recompute(saved)
        ctx.save_for_backward(saved)
        return
    if traced(x) and _get_current_dispatch_mode() is not None and compiled.lowered():
        # traced for Inductor: the forward is sugar_forward(x)[0] (compiled.py); this second
        # call is merged with it by CSE, so the saved form is computed in the forward
        saved = FORWARD_OP(x, surrogate, params, negative_only, save)[1]
    elif traced(x):  # another tracer: the plain formula, for it to fuse
        saved = plain_saved(x, surrogate, params, negative_only, save, ctx.grid)
    else:
        saved = _eager_saved(x, surrogate, params, negative_only, save, ctx.grid)
    ctx.save_for_backward(saved)


def _backward(ctx, grad):
    (saved,) = ctx.saved_tensors
    if ctx.formula is not None:  # traced, exact: saved is x
        return GRAD_OP(grad, saved, *ctx.formula), None, None, None, None
    with scoped(ctx.kernels):
        out = fused_decode(grad, saved, ctx.save, ctx.grid)
    if out is None:
        out = decode_mul(grad, saved, ctx.save, ctx.grid)
    return out, None, None, None, None


_sugar_op.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.sugarize.sugar.default
FORWARD_OP = torch.ops.sugarize.sugar_forward.default
GRAD_OP = torch.ops.sugarize.sugar_grad.default


def _relu_decomposition(x, surrogate, params, negative_only, save):
    return torch.relu(x)


# After autograd has been handled, SUGAR is ReLU: exporters and compilers that decompose
# (torch.onnx's dynamo exporter does) see a plain relu.
torch._decomp.register_decomposition(OP)(_relu_decomposition)


def sugar(
    x: torch.Tensor,
    surrogate: str = DEFAULT_SURROGATE,
    *,
    negative_only: bool = False,
    save: str = DEFAULT_SAVE,
    **params: float,
) -> torch.Tensor:
    """SUGAR activation: ``relu(x)`` forward, ``grad * s'(x)`` backward.

    Args:
        x: input tensor of any floating dtype, shape and layout.
        surrogate: a registered surrogate name (see ``sugarize.list_surrogates()``).
        negative_only: keep ReLU's exact gradient 1 for x > 0, use s' only for x <= 0.
        save: what the backward keeps: "full" (default, exact), or the opt-in compressed
            forms "bfloat16" and "uint8" (their error: ``save_error``).
        **params: surrogate parameters, e.g. ``alpha=1.67`` for B-SiLU.

    Returns:
        ``torch.relu(x)``, bit for bit.

    Raises:
        UnknownSurrogateError, ParameterError: for a bad surrogate, parameter or option.

    Example:
        >>> y = sugar(torch.randn(4, requires_grad=True), "nelu", alpha=0.05)
    """
    values = check_options(surrogate, params, negative_only, save)
    if type(x) is not torch.Tensor:
        sharding.register_for(x)  # a DTensor: its rules for the op (once per process)
    return OP(x, surrogate, values, bool(negative_only), save)


def surrogate_grad(
    x: torch.Tensor, surrogate: str = DEFAULT_SURROGATE, *, negative_only: bool = False, **params: float
) -> torch.Tensor:
    """The reference gradient of SUGAR w.r.t. its input for an upstream gradient of ones."""
    values = list(resolve_params(surrogate, params).values())
    return surrogate_derivative(x, surrogate, values, negative_only).to(x.dtype)

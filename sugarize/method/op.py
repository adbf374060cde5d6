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

import functools
import math
from typing import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import compiled
from .errors import ParameterError
from .options import DEFAULT_SAVE, DEFAULT_SURROGATE, SAVE_MODES
from .kernels import fused_decode, fused_encode, traced
from .surrogates import get_surrogate, keep_positive_one, resolve_params

__all__ = ["sugar", "surrogate_grad", "save_error", "SAVE_MODES", "DEFAULT_SAVE", "OP"]

# A compressed mode is refused where its worst error on x <= 0 exceeds this share of the
# largest |s'(x)| there: it would no longer carry the surrogate's negative side.
MAX_NEGATIVE_SIDE_ERROR = 0.10


def _derivative(x: torch.Tensor, surrogate: str, params: Sequence[float], negative_only: bool,
                fast: bool = True):
    """s'(x) evaluated in float32 or better, with ReLU's exact 1 for x > 0 if asked.

    ``fast`` picks the entry's eager-optimised form (fused ATen kernels, in-place); a
    compiler fuses the plain formula better, so compiled kernels pass ``fast=False``.
    """
    entry = get_surrogate(surrogate)
    kwargs = {p.name: v for p, v in zip(entry.params, params)}
    xc = x if x.dtype in (torch.float32, torch.float64) else x.float()
    d = entry.fast_derivative(xc, **kwargs) if fast else entry.derivative(xc, **kwargs)
    if negative_only:
        d = keep_positive_one(d, xc)
    return d


@functools.lru_cache(maxsize=256)
def _uint8_grid(surrogate: str, params: tuple[float, ...], negative_only: bool) -> tuple[float, int]:
    """(k, zero_point) such that code = round(d * k) + zp covers s' on the real line in 0..255."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch.no_grad():
        x = torch.linspace(-64.0, 64.0, 200_001, dtype=torch.float64)
        d = _derivative(x, surrogate, params, negative_only)
        lo, hi = min(float(d.min()), 0.0), max(float(d.max()), 1.0)
    k = math.floor(255.0 / (hi - lo) * (1 - 1e-9))
    if k < 1:
        raise ParameterError(
            f"surrogate {surrogate!r} with parameters {list(params)}: its derivative spans "
            f"[{lo:.3g}, {hi:.3g}], too wide for save='uint8'; use save='full' (exact) or 'bfloat16'"
        )
    with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch.no_grad():
        negative = d[x <= 0].abs().max().item()
    share = (0.5 / k) / negative if negative > 0 else 0.0
    if share > MAX_NEGATIVE_SIDE_ERROR:
        raise ParameterError(
            f"save='uint8' cannot carry surrogate {surrogate!r} with parameters {list(params)}: its "
            f"derivative on x <= 0 is at most {negative:.3g} in magnitude, and the 1-byte grid's error "
            f"is {0.5 / k:.3g} ({share:.0%} of it); use save='full' (exact, the default) or 'bfloat16'"
        )
    return float(k), int(math.ceil(-lo * k - 1e-9))


def save_error(surrogate: str, save: str, *, negative_only: bool = False, **params: float) -> dict[str, float]:
    """Worst-case error of the gradient a ``save`` mode gives, against the exact ``s'(x)``.

    Measured on a dense grid of float32 inputs over [-64, 64] against s' in float64, per unit
    of upstream gradient:
    ``abs``: the largest absolute error; ``rel_negative``: that error on x <= 0 as a share of
    the largest ``|s'(x)|`` there (what decides whether a mode carries the negative side).
    ``"full"`` is exact: both are 0.

    Raises:
        ParameterError: if the mode cannot carry the surrogate (``uint8`` for NeLU a=0.01).
    """
    values = check_options(surrogate, params, negative_only, save)
    x = torch.linspace(-64.0, 64.0, 400_001, dtype=torch.float64).float()  # what a float32 model gives
    exact = _derivative(x.double(), surrogate, values, negative_only)
    grid = _grid(surrogate, values, negative_only, save)
    saved = _encode(_derivative(x, surrogate, values, negative_only), x.dtype, save, grid)
    got = _decode_mul(torch.ones_like(x), saved, save, grid).double()
    err = (got - exact).abs()
    neg = x <= 0
    scale = exact[neg].abs().max().item()
    return {"abs": err.max().item(), "rel_negative": err[neg].max().item() / scale if scale else 0.0}


def _encode(d: torch.Tensor, dtype: torch.dtype, save: str, grid: tuple[float, int] | None):
    """The saved form of ``d`` (which this function may overwrite)."""
    if save == "full":
        return d.to(dtype)
    if save == "bfloat16":
        return d.to(torch.bfloat16)
    k, zp = grid
    # round(d * k) + zp, in place: truncation of a value >= 0 plus 0.5 rounds half up
    return d.mul_(k).add_(zp + 0.5).clamp_(0.0, 255.0).to(torch.uint8)


def _decode_mul(grad: torch.Tensor, saved: torch.Tensor, save: str, grid) -> torch.Tensor:
    if save == "uint8":
        k, zp = grid
        # grad * (code - zp) / k, in the gradient's dtype
        return (saved.to(grad.dtype) - zp).mul_(grad).div_(k)
    return grad * saved.to(grad.dtype) if save == "bfloat16" else grad * saved


def _saved_dtype(dtype: torch.dtype, save: str) -> torch.dtype:
    return {"full": dtype, "bfloat16": torch.bfloat16, "uint8": torch.uint8}[save]


def _grid(surrogate: str, params, negative_only: bool, save: str) -> tuple[float, int] | None:
    return _uint8_grid(surrogate, tuple(params), negative_only) if save == "uint8" else None


def _plain_saved(x, surrogate, params, negative_only, save, grid):
    """The saved form of ``s'(x)`` by the plain formula: what a tracer or compiler fuses."""
    return _encode(_derivative(x, surrogate, params, negative_only, fast=False), x.dtype, save, grid)


def _eager_saved(x, surrogate, params, negative_only, save, grid):
    """The saved form of ``s'(x)`` in plain eager execution: the fused kernel where it applies."""
    saved = fused_encode(x, surrogate, params, negative_only, save, grid)
    if saved is None:
        saved = _encode(_derivative(x, surrogate, params, negative_only), x.dtype, save, grid)
    return saved


def _forward_math(x, surrogate, params, negative_only, save):
    """``(relu(x), saved form of s'(x))`` with the plain formula: what a compiler fuses."""
    return torch.relu(x), _plain_saved(x, surrogate, params, negative_only, save,
                                       _grid(surrogate, params, negative_only, save))


@torch.library.custom_op("sugarize::sugar_forward", mutates_args=())
def _sugar_forward_op(
    x: torch.Tensor, surrogate: str, params: Sequence[float], negative_only: bool, save: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal: ``relu(x)`` and the saved form of ``s'(x)`` in one op, for compilers (compiled.py).

    It has no backward formula: only the SUGAR op's decomposition and ``setup_context``
    call it, below autograd."""
    return torch.relu(x), _eager_saved(x, surrogate, params, negative_only, save,
                                       _grid(surrogate, params, negative_only, save))


@_sugar_forward_op.register_fake
def _(x, surrogate, params, negative_only, save):
    return torch.empty_like(x), torch.empty_like(x, dtype=_saved_dtype(x.dtype, save))


def _grad_math(grad, x, surrogate, params, negative_only):
    """``grad * s'(x)``, s' by the plain formula in float32 or better, in the gradient's dtype."""
    return grad * _derivative(x, surrogate, params, negative_only, fast=False).to(grad.dtype)


@torch.library.custom_op("sugarize::sugar_grad", mutates_args=())
def _sugar_grad_op(
    grad: torch.Tensor, x: torch.Tensor, surrogate: str, params: Sequence[float], negative_only: bool
) -> torch.Tensor:
    """Internal: the exact backward ``grad * s'(x)`` as one op of ``x``, for compilers.

    The SUGAR op's backward calls it when traced with ``save="full"``. Inductor lowers it to
    one elementwise expression (compiled.py), so the recomputed ``x`` and ``s'(x)`` stay in
    registers instead of being written to memory between kernels."""
    return _grad_math(grad, x, surrogate, params, negative_only)


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
        compiled.register(OP, FORWARD_OP, _forward_math, GRAD_OP, _grad_math)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, surrogate, params, negative_only, save = inputs
    ctx.save = save
    ctx.grid = _grid(surrogate, params, negative_only, save)
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
        saved = _plain_saved(x, surrogate, params, negative_only, save, ctx.grid)
    else:
        saved = _eager_saved(x, surrogate, params, negative_only, save, ctx.grid)
    ctx.save_for_backward(saved)


def _backward(ctx, grad):
    (saved,) = ctx.saved_tensors
    if ctx.formula is not None:  # traced, exact: saved is x
        return GRAD_OP(grad, saved, *ctx.formula), None, None, None, None
    out = fused_decode(grad, saved, ctx.save, ctx.grid)
    if out is None:
        out = _decode_mul(grad, saved, ctx.save, ctx.grid)
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


def check_options(surrogate: str, params, negative_only: bool, save: str) -> list[float]:
    """Validated parameter list for the op, in the surrogate's declaration order."""
    if save not in SAVE_MODES:
        raise ParameterError(f"save={save!r} is not one of {', '.join(SAVE_MODES)}")
    values = list(resolve_params(surrogate, params).values())
    if save == "uint8" and not torch.compiler.is_compiling():
        # (under Dynamo the op's setup_context computes the grid and raises the same error)
        _uint8_grid(surrogate, tuple(values), bool(negative_only))
    return values


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
    return OP(x, surrogate, values, bool(negative_only), save)


def surrogate_grad(
    x: torch.Tensor, surrogate: str = DEFAULT_SURROGATE, *, negative_only: bool = False, **params: float
) -> torch.Tensor:
    """The reference gradient of SUGAR w.r.t. its input for an upstream gradient of ones."""
    values = list(resolve_params(surrogate, params).values())
    return _derivative(x, surrogate, values, negative_only).to(x.dtype)

"""The SUGAR op: forward ``relu`` bit for bit, backward ``grad * s'(x)``.

It is a ``torch.library`` custom op (``torch.ops.sugarize.sugar``), so it stays one opaque
node when a converted model is traced again by ``torch.fx.symbolic_trace``,
``torch.export`` or ``torch.compile`` (a plain ``autograd.Function`` would be inlined and
its surrogate gradient silently lost). A post-autograd decomposition to ``aten.relu``
makes ``torch.onnx.export`` emit a plain ``Relu`` even when a model was not stripped, and
(``compiled.py``) lets Inductor fuse the forward, and the saved derivative with it, into the
producer's kernel as it fuses ReLU.

For the backward pass the op saves only ``s'(x)`` (never ``x``), in the precision chosen by
``save``:

- ``"full"``: the input's dtype, exact.
- ``"bfloat16"``: half the memory; 0 and 1 stay exact, other values to ~0.4 %.
- ``"uint8"`` (the default, chosen by measurement in benchmarks/results/perf.md): a
  quarter; a fixed grid of step 1/k chosen per surrogate so that 0 and 1 are
  exact, other values to half a step (~0.003 for B-SiLU).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import compiled
from .errors import ParameterError
from .kernels import fused_decode, fused_encode, traced
from .surrogates import get_surrogate, keep_positive_one, resolve_params

__all__ = ["sugar", "surrogate_grad", "SAVE_MODES", "DEFAULT_SAVE", "OP"]

SAVE_MODES = ("full", "bfloat16", "uint8")
DEFAULT_SAVE = "uint8"  # measured: benchmarks/results/perf.md (memory 1.11x ReLU, fastest step)


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
            f"[{lo:.3g}, {hi:.3g}], too wide for save='uint8'; use save='bfloat16' or 'full'"
        )
    return float(k), int(math.ceil(-lo * k - 1e-9))


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


@torch.library.custom_op("sugarize::sugar", mutates_args=())
def _sugar_op(
    x: torch.Tensor, surrogate: str, params: Sequence[float], negative_only: bool, save: str
) -> torch.Tensor:
    return torch.relu(x)


@_sugar_op.register_fake
def _(x, surrogate, params, negative_only, save):
    if torch.compiler.is_compiling():  # Dynamo's first look at the op: Inductor compiles next
        compiled.register(OP, FORWARD_OP, _forward_math)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, surrogate, params, negative_only, save = inputs
    ctx.save = save
    ctx.grid = _grid(surrogate, params, negative_only, save)
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
    out = fused_decode(grad, saved, ctx.save, ctx.grid)
    if out is None:
        out = _decode_mul(grad, saved, ctx.save, ctx.grid)
    return out, None, None, None, None


_sugar_op.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.sugarize.sugar.default
FORWARD_OP = torch.ops.sugarize.sugar_forward.default


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
    surrogate: str = "bsilu",
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
        save: precision of the saved derivative: "full", "bfloat16" or "uint8".
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
    x: torch.Tensor, surrogate: str = "bsilu", *, negative_only: bool = False, **params: float
) -> torch.Tensor:
    """The reference gradient of SUGAR w.r.t. its input for an upstream gradient of ones."""
    values = list(resolve_params(surrogate, params).values())
    return _derivative(x, surrogate, values, negative_only).to(x.dtype)

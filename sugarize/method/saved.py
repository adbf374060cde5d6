"""What the SUGAR op keeps for the backward pass, and the error of each form.

One module for both users of the saved forms: the eager op (``op.py``) and the fused eager
kernels (``kernels.py``), so neither imports the other's internals.

- ``"full"`` (the default): exact; ``s'(x)`` in the input's dtype (eager), or ``x`` itself
  under a compiler (``compiled.py``).
- ``"bfloat16"`` (opt-in): relative error 2**-9 on every value.
- ``"uint8"`` (opt-in): a uniform grid of step 1/k per surrogate (0 and 1 exact), absolute
  error half a step; refused where it cannot carry the surrogate's negative side.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from ..errors import ParameterError
from ..options import SAVE_MODES, OpOptions
from .surrogates import get_surrogate, keep_positive_one, resolve_params

__all__ = ["save_error", "check_options", "op_options", "MAX_NEGATIVE_SIDE_ERROR", "derivative_times"]


# A compressed mode is refused where its worst error on x <= 0 exceeds this share of the
# largest |s'(x)| there: it would no longer carry the surrogate's negative side.
MAX_NEGATIVE_SIDE_ERROR = 0.10


def surrogate_derivative(x: torch.Tensor, surrogate: str, params: Sequence[float], negative_only: bool,
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
        d = surrogate_derivative(x, surrogate, params, negative_only)
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
    exact = surrogate_derivative(x.double(), surrogate, values, negative_only)
    grid = saved_grid(surrogate, values, negative_only, save)
    saved = encode_saved(surrogate_derivative(x, surrogate, values, negative_only), x.dtype, save, grid)
    got = decode_mul(torch.ones_like(x), saved, save, grid).double()
    err = (got - exact).abs()
    neg = x <= 0
    scale = exact[neg].abs().max().item()
    return {"abs": err.max().item(), "rel_negative": err[neg].max().item() / scale if scale else 0.0}


def encode_saved(d: torch.Tensor, dtype: torch.dtype, save: str, grid: tuple[float, int] | None):
    """The saved form of ``d`` (which this function may overwrite)."""
    if save == "full":
        return d.to(dtype)
    if save == "bfloat16":
        return d.to(torch.bfloat16)
    k, zp = grid
    # round(d * k) + zp, in place: truncation of a value >= 0 plus 0.5 rounds half up
    return d.mul_(k).add_(zp + 0.5).clamp_(0.0, 255.0).to(torch.uint8)


def decode_mul(grad: torch.Tensor, saved: torch.Tensor, save: str, grid) -> torch.Tensor:
    if save == "uint8":
        k, zp = grid
        # grad * (code - zp) / k, in the gradient's dtype
        return (saved.to(grad.dtype) - zp).mul_(grad).div_(k)
    return grad * saved.to(grad.dtype) if save == "bfloat16" else grad * saved


def saved_dtype(dtype: torch.dtype, save: str) -> torch.dtype:
    return {"full": dtype, "bfloat16": torch.bfloat16, "uint8": torch.uint8}[save]


def saved_grid(surrogate: str, params, negative_only: bool, save: str) -> tuple[float, int] | None:
    return _uint8_grid(surrogate, tuple(params), negative_only) if save == "uint8" else None


def plain_saved(x, surrogate, params, negative_only, save, grid):
    """The saved form of ``s'(x)`` by the plain formula: what a tracer or compiler fuses."""
    return encode_saved(surrogate_derivative(x, surrogate, params, negative_only, fast=False), x.dtype, save, grid)


def grad_math(grad, x, surrogate, params, negative_only):
    """``grad * s'(x)``, s' by the plain formula in float32 or better, in the gradient's dtype."""
    return grad * surrogate_derivative(x, surrogate, params, negative_only, fast=False).to(grad.dtype)


def check_options(surrogate: str, params, negative_only: bool, save: str) -> list[float]:
    """Validated parameter list for the op, in the surrogate's declaration order."""
    if save not in SAVE_MODES:
        raise ParameterError(f"save={save!r} is not one of {', '.join(SAVE_MODES)}")
    values = list(resolve_params(surrogate, params).values())
    if save == "uint8" and not torch.compiler.is_compiling():
        # (under Dynamo the op's setup_context computes the grid and raises the same error)
        _uint8_grid(surrogate, tuple(values), bool(negative_only))
    return values


def op_options(surrogate: str, params, negative_only: bool, save: str) -> OpOptions:
    """The validated record (``params``: a name -> value mapping, or values in declaration order)."""
    if not isinstance(params, dict):
        from .surrogates import get_surrogate as _get

        params = dict(zip([p.name for p in _get(surrogate).params], params))
    return OpOptions(surrogate, tuple(check_options(surrogate, params, negative_only, save)), negative_only, save)


def derivative_times(g: torch.Tensor, x: torch.Tensor, surrogate: str, params, negative_only: bool) -> torch.Tensor:
    """``g * s'(x)`` as the exact op's backward computes it with the eager formulas: ``s'(x)`` in
    its own buffer, multiplied by ``g`` in place (or through the saved form where dtypes differ).
    Every fused op's backward ends here (``fused.py``, ``rebuild.py``), so their gradients are the
    unfused op's bit for bit."""
    d = surrogate_derivative(x, surrogate, params, negative_only)
    if d.dtype == g.dtype and d.shape == g.shape:
        return d.mul_(g)  # g * s'(x) in s'(x)'s own buffer (the unfused op's value: x * y == y * x)
    return decode_mul(g, encode_saved(d, x.dtype, "full", None), "full", None)

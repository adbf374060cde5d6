"""Surrogate registry: name -> primitive s(x), hand-written derivative s'(x), parameters.

SUGAR keeps ``relu`` in the forward pass and multiplies the incoming gradient by ``s'(x)``
in the backward pass. Every entry states its formula, its defaults and its source; its
hand-written derivative is tested against autograd of its primitive in float64.

Add your own::

    @register_surrogate("softsign", params=[Param("scale", 1.0, low=0.0)])
    class SoftSign(Surrogate):
        '''s(x) = x / (1 + |x|) * scale.'''
        @staticmethod
        def primitive(x, scale): return scale * x / (1 + x.abs())
        @staticmethod
        def derivative(x, scale): return scale / (1 + x.abs()) ** 2
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..errors import ParameterError, UnknownSurrogateError

__all__ = [
    "Param",
    "Surrogate",
    "register_surrogate",
    "get_surrogate",
    "list_surrogates",
    "resolve_params",
    "unit_dims",
    "dead_units",
]


@dataclass(frozen=True)
class Param:
    """A surrogate parameter: its default and the open/closed lower bound it must respect."""

    name: str
    default: float
    low: float | None = None
    low_inclusive: bool = False
    doc: str = ""

    def check(self, value: float, surrogate: str) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ParameterError(
                f"surrogate {surrogate!r}: parameter {self.name}={value!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise ParameterError(
                f"surrogate {surrogate!r}: parameter {self.name}={value} must be a finite number "
                f"(default {self.default})"
            )
        if self.low is not None:
            ok = value >= self.low if self.low_inclusive else value > self.low
            if not ok:
                bound = ">=" if self.low_inclusive else ">"
                raise ParameterError(
                    f"surrogate {surrogate!r}: parameter {self.name}={value} must be {bound} "
                    f"{self.low} (default {self.default})"
                )
        return value


class Surrogate:
    """Base class of registry entries. Subclasses define ``primitive`` and ``derivative``.

    Both take ``x`` and the parameters as keyword arguments, in the order of ``params``.
    ``derivative`` must be finite for finite and infinite ``x`` (it is evaluated on the
    whole input of a SUGAR op, which may hold +-inf); it may be NaN where ``x`` is NaN.
    """

    name: str = ""
    params: tuple[Param, ...] = ()
    source: str = ""
    # False where s'(x) at one element depends on others (``bsilu_dead`` reads each unit's batch):
    # such an entry is evaluated on the whole tensor, never on a flattened or 0-d stand-in (the opt-in
    # fused kernels and Inductor's generated formula skip it; it runs as an eager kernel there).
    elementwise: bool = True

    @staticmethod
    def primitive(x: torch.Tensor, **params: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def derivative(x: torch.Tensor, **params: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def fast_derivative(cls, x: torch.Tensor, **params: float) -> torch.Tensor:
        """``derivative`` as the SUGAR op evaluates it: a fresh tensor the caller may overwrite.

        Entries override it with fewer memory passes (fused ATen backward kernels, in-place
        arithmetic); tests hold every override to ``derivative``'s values.
        """
        return cls.derivative(x, **params)

    @classmethod
    def defaults(cls) -> dict[str, float]:
        return {p.name: p.default for p in cls.params}

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


_REGISTRY: dict[str, type[Surrogate]] = {}


def register_surrogate(
    name: str, *, params: list[Param] | tuple[Param, ...] = (), source: str = ""
) -> Callable[[type[Surrogate]], type[Surrogate]]:
    """Class decorator that adds a surrogate to the registry under ``name``.

    Raises:
        ParameterError: if ``name`` is already registered (a ``ValueError`` too).
    """

    def deco(cls: type[Surrogate]) -> type[Surrogate]:
        if name in _REGISTRY:
            from ..errors import ParameterError

            raise ParameterError(f"surrogate {name!r} is already registered; register yours under another name")
        cls.name = name
        cls.params = tuple(params)
        cls.source = source
        _REGISTRY[name] = cls
        return cls

    return deco


def list_surrogates() -> list[str]:
    """Names of all registered surrogates, in registration order."""
    return list(_REGISTRY)


def get_surrogate(name: str) -> type[Surrogate]:
    """The registry entry for ``name``.

    Raises:
        UnknownSurrogateError: naming the known surrogates.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise UnknownSurrogateError(
            f"unknown surrogate {name!r}; known surrogates: {known}"
        ) from None


def resolve_params(name: str, params: Mapping[str, float] | None = None) -> dict[str, float]:
    """Defaults of ``name`` overridden by ``params``, validated, in declaration order.

    Raises:
        UnknownSurrogateError: for an unknown surrogate.
        ParameterError: for an unknown parameter name or a bad value.
    """
    entry = get_surrogate(name)
    params = dict(params or {})
    known = {p.name for p in entry.params}
    unknown = sorted(set(params) - known)
    if unknown:
        expected = ", ".join(sorted(known)) or "none"
        raise ParameterError(
            f"surrogate {name!r} has no parameter {unknown[0]!r}; its parameters: {expected}"
        )
    return {p.name: p.check(params.get(p.name, p.default), name) for p in entry.params}


# Arguments beyond this magnitude change no derivative below by more than float64 rounding;
# clamping keeps 0 * inf out of the formulas at +-inf.
_CLAMP = 60.0


def _finite(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_CLAMP, _CLAMP)


def _step(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x > 0, else 0.0 (NaN included), in one fused pass (ReLU's own derivative)."""
    return torch.ops.aten.threshold_backward(_ones_like(x), x, 0.0)


def keep_positive_one(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``where(x > 0, 1, d)`` in place on ``d``, without a boolean mask (masked ops are slow on CPU)."""
    return d.add_(torch.ops.aten.threshold_backward(torch.rsub(d, 1.0), x, 0.0))


def _ones_like(x: torch.Tensor) -> torch.Tensor:
    """A broadcast 1 (no memory) to feed ATen's fused backward kernels as the gradient."""
    return x.new_ones(()).expand_as(x)


_PAPER = "Horuz et al., The Resurrection of the ReLU, arXiv 2505.22074 (2025)"


@register_surrogate(
    "bsilu",
    params=[Param("alpha", 1.67, low=0.0, doc="shift a")],
    source=_PAPER + ", eq. B-SiLU; the paper's best surrogate",
)
class BSiLU(Surrogate):
    """Bounded SiLU: s(x) = (x + a) * sigmoid(x) - a/2, a = 1.67.

    s'(x) = sigmoid(x) + (x + a) * sigmoid(x) * (1 - sigmoid(x)); s'(0) ~ 0.92, peaks near
    1.29 at x ~ 1.5, slightly negative (min ~ -0.024) for x < ~ -2.7.
    """

    @staticmethod
    def primitive(x, alpha):
        return (x + alpha) * torch.sigmoid(x) - alpha / 2

    @staticmethod
    def derivative(x, alpha):
        x = _finite(x)
        s = torch.sigmoid(x)
        return s + (x + alpha) * s * (1 - s)

    @classmethod
    def fast_derivative(cls, x, alpha):
        # s'(x) = s * (1 + (x + a) * (1 - s)): five passes, one exp, two buffers (measured on
        # 2^19 float32 elements, 2 CPU threads: 0.41 ms; silu_backward + sigmoid_backward 0.55 ms)
        t = _finite(x)
        s = torch.sigmoid(t)
        t.add_(alpha)
        t.addcmul_(t, s, value=-1.0)  # (x + a) * (1 - s)
        return s.addcmul_(s, t)


def unit_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions one unit spans: all but its channel (dim 1 of a 4-D or 5-D activation, a
    convolution's) or its feature (the last dim otherwise: a Linear's, a transformer's). The same
    rule as the dead-unit audit's (``training/deadunits.py``). A 1-D tensor: each element a unit."""
    keep = 1 if x.dim() in (4, 5) else x.dim() - 1
    return tuple(d for d in range(x.dim()) if d != keep)


def dead_units(x: torch.Tensor) -> torch.Tensor:
    """Where ``x`` belongs to a unit that fires for no element of the batch (its largest value across
    ``unit_dims`` is <= 0), broadcastable to ``x``; one reduction pass. A NaN makes its unit count as
    firing (ReLU's gradient stays there)."""
    dims = unit_dims(x)
    if not dims or x.numel() == 0:
        return x <= 0
    return x.amax(dim=dims, keepdim=True) <= 0


@register_surrogate(
    "bsilu_dead",
    params=[Param("alpha", 1.67, low=0.0, doc="shift a of B-SiLU")],
    source="sugarize's default, chosen by benchmarks/study.py: B-SiLU (" + _PAPER + ") at dead units only",
)
class DeadUnitBSiLU(Surrogate):
    """B-SiLU at dead units only (the default): s'(x) = B-SiLU's s'(x) at a unit that fires for no sample
    of the batch, ReLU's exact 1 (x > 0) / 0 at every other unit; a = 1.67.

    A unit is a channel of a 4-D/5-D activation, else a feature (the last dim); "fires" means x > 0
    anywhere in the batch. A healthy model gets ReLU's own gradient, so fine-tuning it behaves as with
    ReLU; a unit dead over the whole batch gets B-SiLU's gradient and can come back. Its primitive is
    B-SiLU at dead units and ReLU elsewhere, the mask held fixed. Not elementwise: the mask is the
    local batch's (a batch-sharded DTensor: each shard's own).
    """

    elementwise = False

    @staticmethod
    def primitive(x, alpha):
        dead = dead_units(x.detach())
        return torch.where(dead, BSiLU.primitive(x, alpha), torch.relu(x))

    @staticmethod
    def derivative(x, alpha):
        dead = dead_units(x)
        return torch.where(dead, BSiLU.derivative(x, alpha), (x > 0).to(x.dtype))

    @classmethod
    def fast_derivative(cls, x, alpha):
        dead = dead_units(x)
        if x.device.type == "cpu" and not bool(dead.any()):  # a healthy batch: ReLU's step, one pass
            return _step(x)
        return torch.where(dead, BSiLU.fast_derivative(x, alpha), _step(x))


@register_surrogate(
    "nelu",
    params=[Param("alpha", 0.01, low=0.0, doc="scale a of the negative side")],
    source=_PAPER + ", NeLU; a in {0.01, 0.05, 0.1} swept, 0.01 best on ResNet-18",
)
class NeLU(Surrogate):
    """NeLU, defined by its derivative: s'(x) = 1 for x > 0, 2ax/(1+x^2)^2 for x <= 0; a = 0.01.

    s(x) = x for x > 0, a*x^2/(1 + x^2) for x <= 0 (= a - a/(1+x^2), continuous at 0): s >= 0.
    Its derivative is negative for x < 0, minimum s' ~ -0.65a at x = -1/sqrt(3).
    """

    @staticmethod
    def primitive(x, alpha):
        return torch.where(x > 0, x, alpha * x * x / (1 + x * x))

    @staticmethod
    def derivative(x, alpha):
        x = _finite(x)
        return torch.where(x > 0, torch.ones_like(x), 2 * alpha * x / (1 + x * x) ** 2)

    @classmethod
    def fast_derivative(cls, x, alpha):
        # (negative side at min(x, 0), which is 0 for x > 0) + (1 where x > 0)
        xn = x.clamp(-_CLAMP, 0.0)
        d = torch.mul(xn, xn).add_(1).square_()
        torch.div(xn, d, out=d).mul_(2 * alpha)
        return d.add_(_step(x))


@register_surrogate(
    "leaky_relu",
    params=[Param("negative_slope", 0.01, low=0.0, low_inclusive=True)],
    source="Maas et al. 2013; torch.nn.LeakyReLU default slope",
)
class LeakyReLU(Surrogate):
    """Leaky ReLU: s(x) = x for x > 0, slope * x else; s'(x) = 1 or slope (slope 0.01)."""

    @staticmethod
    def primitive(x, negative_slope):
        return torch.where(x > 0, x, negative_slope * x)

    @staticmethod
    def derivative(x, negative_slope):
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope))

    @classmethod
    def fast_derivative(cls, x, negative_slope):
        return torch.ops.aten.leaky_relu_backward(_ones_like(x), x, negative_slope, False)


@register_surrogate(
    "elu",
    params=[Param("alpha", 1.0, low=0.0)],
    source="Clevert et al. 2016; torch.nn.ELU default",
)
class ELU(Surrogate):
    """ELU: s(x) = x for x > 0, alpha * (exp(x) - 1) else; s'(x) = 1 or alpha * exp(x)."""

    @staticmethod
    def primitive(x, alpha):
        return torch.where(x > 0, x, alpha * torch.expm1(x.clamp(max=0)))

    @staticmethod
    def derivative(x, alpha):
        return torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x.clamp(max=0)))

    @classmethod
    def fast_derivative(cls, x, alpha):
        return torch.ops.aten.elu_backward(_ones_like(x), alpha, 1.0, 1.0, False, x)


_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


@register_surrogate(
    "selu",
    params=[Param("alpha", _SELU_ALPHA, low=0.0), Param("scale", _SELU_SCALE, low=0.0)],
    source="Klambauer et al. 2017; torch.nn.SELU constants",
)
class SELU(Surrogate):
    """SELU: s(x) = scale * (x for x > 0, alpha * (exp(x) - 1) else); s'(x) = scale * (1 or alpha*exp(x))."""

    @staticmethod
    def primitive(x, alpha, scale):
        return scale * torch.where(x > 0, x, alpha * torch.expm1(x.clamp(max=0)))

    @staticmethod
    def derivative(x, alpha, scale):
        return scale * torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x.clamp(max=0)))

    @classmethod
    def fast_derivative(cls, x, alpha, scale):
        return torch.ops.aten.elu_backward(_ones_like(x), alpha, scale, 1.0, False, x)


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


@register_surrogate("gelu", source="Hendrycks & Gimpel 2016; torch.nn.GELU (erf form)")
class GELU(Surrogate):
    """GELU: s(x) = x * Phi(x); s'(x) = Phi(x) + x * phi(x) (Phi, phi: normal cdf, pdf)."""

    @staticmethod
    def primitive(x):
        return F.gelu(x)

    @staticmethod
    def derivative(x):
        x = _finite(x)
        cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT2))
        return cdf + x * _INV_SQRT2PI * torch.exp(-0.5 * x * x)

    @classmethod
    def fast_derivative(cls, x):
        # ATen's own GELU backward: one pass (the plain formula takes about ten)
        return torch.ops.aten.gelu_backward(_ones_like(x), _finite(x))


_GELU_K = math.sqrt(2.0 / math.pi)


@register_surrogate(
    "gelu_tanh", source="Hendrycks & Gimpel 2016; torch.nn.GELU(approximate='tanh')"
)
class GELUTanh(Surrogate):
    """GELU, tanh form: s(x) = x/2 * (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi).

    s'(x) = (1 + t)/2 + x/2 * (1 - t^2) * k * (1 + 3 * 0.044715 x^2), t = tanh(k (x + 0.044715 x^3)).
    """

    @staticmethod
    def primitive(x):
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def derivative(x):
        x = _finite(x)
        t = torch.tanh(_GELU_K * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_K * (1 + 3 * 0.044715 * x * x)
    # (no fast_derivative: ATen's tanh-form gelu_backward flushes the tail below x ~ -5 to 0,
    # 1.4e-6 off the exact derivative, beyond float32 rounding of it)


@register_surrogate("silu", source="Elfwing et al. 2018, Ramachandran et al. 2017 (Swish-1)")
class SiLU(Surrogate):
    """SiLU / Swish: s(x) = x * sigmoid(x); s'(x) = sigmoid(x) * (1 + x * (1 - sigmoid(x)))."""

    @staticmethod
    def primitive(x):
        return F.silu(x)

    @staticmethod
    def derivative(x):
        x = _finite(x)
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))

    @classmethod
    def fast_derivative(cls, x):
        x = _finite(x)
        return torch.ops.aten.silu_backward(_ones_like(x), x)


@register_surrogate("mish", source="Misra 2019")
class Mish(Surrogate):
    """Mish: s(x) = x * tanh(softplus(x)); s'(x) = tanh(sp) + x * sigmoid(x) * (1 - tanh(sp)^2)."""

    @staticmethod
    def primitive(x):
        return x * torch.tanh(F.softplus(x))

    @staticmethod
    def derivative(x):
        x = _finite(x)
        t = torch.tanh(F.softplus(x))
        return t + x * torch.sigmoid(x) * (1 - t * t)

    @classmethod
    def fast_derivative(cls, x):
        return torch.ops.aten.mish_backward(_ones_like(x), _finite(x))

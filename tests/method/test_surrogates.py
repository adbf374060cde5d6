"""Every registry entry: its hand-written derivative against autograd of its primitive."""

from __future__ import annotations

import math

import pytest
import torch

import sugarize
from sugarize.errors import ParameterError, UnknownSurrogateError
from sugarize.method.surrogates import get_surrogate, list_surrogates, resolve_params

# Hand-computed s'(x) at a few points, with default parameters. A new registry entry
# without a row here fails test_every_surrogate_has_reference_values.
_sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
_phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
_Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
REFERENCE = {
    "bsilu": {0.0: 0.5 + 1.67 * 0.25, 1.5: _sig(1.5) + 3.17 * _sig(1.5) * (1 - _sig(1.5)),
              -4.0: _sig(-4) + (-4 + 1.67) * _sig(-4) * (1 - _sig(-4))},
    # one element: its own unit, dead where x <= 0 (B-SiLU's s'), ReLU's 1 where it fires
    "bsilu_dead": {0.0: 0.5 + 1.67 * 0.25, 1.5: 1.0, -4.0: _sig(-4) + (-4 + 1.67) * _sig(-4) * (1 - _sig(-4))},
    "nelu": {2.0: 1.0, -1 / math.sqrt(3): 2 * 0.01 * (-1 / math.sqrt(3)) / (4 / 3) ** 2, -1.0: -0.005},
    "leaky_relu": {3.0: 1.0, -3.0: 0.01},
    "elu": {2.0: 1.0, -1.0: math.exp(-1)},
    "selu": {2.0: 1.0507009873554805, -1.0: 1.0507009873554805 * 1.6732632423543772 * math.exp(-1)},
    "gelu": {0.0: 0.5, 1.0: _Phi(1) + _phi(1), -2.0: _Phi(-2) - 2 * _phi(-2)},
    "gelu_tanh": {0.0: 0.5},
    "silu": {0.0: 0.5, 2.0: _sig(2) * (1 + 2 * (1 - _sig(2)))},
    "mish": {0.0: math.tanh(math.log(2))},
}

ALL = list_surrogates()


def test_every_surrogate_has_reference_values():
    assert set(REFERENCE) == set(ALL), "add hand-computed values for new surrogates"


def test_the_papers_bsilu_matches_paper_numbers():
    d = lambda x: sugarize.surrogate_grad(torch.tensor([x], dtype=torch.float64), "bsilu")[0].item()  # noqa: E731
    assert abs(d(0.0) - 0.92) < 0.005
    xs = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    ds = sugarize.surrogate_grad(xs, "bsilu")
    assert abs(ds.max().item() - 1.29) < 0.01 and abs(xs[ds.argmax()].item() - 1.5) < 0.2
    assert abs(ds.min().item() - (-0.024)) < 0.002


@pytest.mark.parametrize("name", ALL)
def test_reference_values(name):
    entry = get_surrogate(name)
    for x, expected in REFERENCE[name].items():
        got = entry.derivative(torch.tensor([x], dtype=torch.float64), **entry.defaults())
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, x)


def _points(name):
    x = torch.randn(2000, dtype=torch.float64) * 4
    return x[x.abs() > 1e-3]  # stay off the kink at 0 for piecewise entries


@pytest.mark.parametrize("name", ALL)
def test_derivative_matches_autograd_of_primitive(name):
    entry = get_surrogate(name)
    x = _points(name).requires_grad_()
    (g,) = torch.autograd.grad(entry.primitive(x, **entry.defaults()).sum(), x)
    expected = entry.derivative(x.detach(), **entry.defaults())
    torch.testing.assert_close(expected, g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_gradcheck_primitive_with_handwritten_derivative(name):
    entry = get_surrogate(name)
    params = entry.defaults()

    class Manual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return entry.primitive(x, **params)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * entry.derivative(x, **params)

    x = _points(name)[:64].clone().requires_grad_()
    assert torch.autograd.gradcheck(Manual.apply, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_derivative_is_finite_at_infinities(name):
    entry = get_surrogate(name)
    x = torch.tensor([-math.inf, math.inf, -1e30, 1e30])
    assert torch.isfinite(entry.derivative(x, **entry.defaults())).all()


@pytest.mark.parametrize("name", ALL)
def test_every_entry_is_documented(name):
    entry = get_surrogate(name)
    doc = entry.__doc__ or ""
    assert "s(x)" in doc or "s'(x)" in doc
    assert entry.source


def test_unknown_surrogate_lists_known_ones():
    with pytest.raises(UnknownSurrogateError, match="known surrogates: bsilu, bsilu_dead, nelu"):
        get_surrogate("bslu")


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 0.0, "abc"])
def test_bad_alpha_is_a_clear_error(value):
    with pytest.raises(ParameterError, match="alpha"):
        resolve_params("bsilu", {"alpha": value})


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(ParameterError, match="has no parameter 'beta'; its parameters: alpha"):
        resolve_params("nelu", {"beta": 1})


def test_register_surrogate_and_duplicate_name():
    from sugarize.method.surrogates import _REGISTRY, Param, Surrogate, register_surrogate

    @register_surrogate("test_softsign", params=[Param("scale", 1.0, low=0.0)], source="test")
    class SoftSign(Surrogate):
        """s(x) = scale * x / (1 + |x|)."""

        @staticmethod
        def primitive(x, scale):
            return scale * x / (1 + x.abs())

        @staticmethod
        def derivative(x, scale):
            return scale / (1 + x.abs()) ** 2

    try:
        x = torch.tensor([-1.0, 1.0], requires_grad=True)
        sugarize.sugar(x, "test_softsign", scale=2.0).sum().backward()
        assert x.grad.tolist() == [0.5, 0.5]
        with pytest.raises(ValueError, match="already registered"):
            register_surrogate("test_softsign")(SoftSign)
    finally:
        _REGISTRY.pop("test_softsign")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list_surrogates())
def test_fast_derivative_equals_the_reference_formula(name, dtype):
    """The op evaluates fast_derivative (fused ATen kernels); it must be derivative's values."""
    special = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30, 1e-40, -1e-40, 60.0, -60.0])
    x = torch.cat([torch.randn(20_000, dtype=torch.float64) * 4, special.double()]).to(dtype)
    entry = get_surrogate(name)
    ref = entry.derivative(x, **entry.defaults())
    fast = entry.fast_derivative(x.clone(), **entry.defaults())
    tol = {torch.float64: 1e-13, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)

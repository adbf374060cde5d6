"""The SUGAR op: relu forward bit for bit, surrogate backward, opaque to every tracer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sugarize
from sugarize.op import OP, SAVE_MODES
from sugarize.surrogates import list_surrogates

from helpers import same_bits

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.tiny, -info.tiny,
         info.tiny / 4, -info.tiny / 4, info.max, -info.max, info.eps, -info.eps, 1.0, -1.0],
        dtype=dtype,
    )
    rand = torch.randn(997, dtype=torch.float64).to(dtype) * 3
    return torch.cat([specials, rand])


@pytest.mark.parametrize("name", list_surrogates())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("negative_only", [False, True])
def test_forward_is_relu_bit_for_bit(name, dtype, negative_only):
    x = special_values(dtype)
    assert (x[7] != 0) and (x[7].abs() < torch.finfo(dtype).tiny)  # a subnormal is in there
    assert same_bits(sugarize.sugar(x, name, negative_only=negative_only), torch.relu(x))
    xg = x.clone().requires_grad_()
    assert same_bits(sugarize.sugar(xg, name, negative_only=negative_only).detach(), torch.relu(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last),
        lambda: torch.randn(6, 8).t(),
        lambda: torch.randn(4, 10)[:, ::3],
        lambda: torch.randn(()),
        lambda: torch.randn(0, 3),
    ],
    ids=["channels_last", "transposed", "strided", "scalar", "empty"],
)
def test_forward_any_shape_and_layout(make):
    x = make().requires_grad_()
    y = sugarize.sugar(x)
    assert same_bits(y.detach(), torch.relu(x.detach()))
    assert y.stride() == torch.relu(x.detach()).stride()
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", list_surrogates())
@pytest.mark.parametrize("negative_only", [False, True])
def test_backward_is_grad_times_derivative(name, negative_only):
    x = (torch.randn(513, dtype=torch.float64) * 4).requires_grad_()
    upstream = torch.randn(513, dtype=torch.float64)
    sugarize.sugar(x, name, negative_only=negative_only, save="full").backward(upstream)
    entry = sugarize.get_surrogate(name)
    d = entry.derivative(x.detach(), **entry.defaults())
    if negative_only:
        d = torch.where(x.detach() > 0, torch.ones_like(d), d)
    torch.testing.assert_close(x.grad, upstream * d, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", list_surrogates())
def test_negative_only_gives_exactly_one_for_positive_inputs(name):
    x = torch.linspace(-5, 5, 1001).requires_grad_()
    sugarize.sugar(x, name, negative_only=True, save="full").sum().backward()
    pos = x.detach() > 0
    assert torch.equal(x.grad[pos], torch.ones(int(pos.sum())))
    assert torch.equal(x.grad[~pos], sugarize.surrogate_grad(x.detach(), name)[~pos])


def test_params_reach_the_gradient():
    x = torch.tensor([-1.0], requires_grad=True)
    sugarize.sugar(x, "nelu", alpha=0.1, save="full").sum().backward()
    assert x.grad.item() == pytest.approx(2 * 0.1 * -1 / 4)


@pytest.mark.parametrize("save", SAVE_MODES)
def test_saved_tensor_bytes_are_exact(save):
    """Pins the memory the op keeps for backward: only s'(x), in the chosen precision."""
    x = torch.randn(64, 32, 8, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sugarize.sugar(x, save=save)
    per_element = {"full": 4, "bfloat16": 2, "uint8": 1}[save]
    assert [t.numel() * t.element_size() for t in saved] == [x.numel() * per_element]
    assert saved[0].data_ptr() != x.data_ptr()
    y.sum().backward()


@pytest.mark.parametrize("save", ["bfloat16", "uint8"])
@pytest.mark.parametrize("name", list_surrogates())
def test_compact_saving_is_close_and_keeps_zero_and_one(name, save):
    x = torch.cat([torch.linspace(-80, 80, 4001), torch.tensor([0.0])]).requires_grad_()
    sugarize.sugar(x, name, save=save).sum().backward()
    exact = sugarize.surrogate_grad(x.detach(), name)
    tol = {"bfloat16": 0.004 * exact.abs().max().item(), "uint8": 0.5 / 145}[save]
    assert (x.grad - exact).abs().max().item() <= tol
    assert torch.equal(x.grad[exact == 0], exact[exact == 0])
    assert torch.equal(x.grad[exact == 1], exact[exact == 1])


def test_no_saving_without_grad():
    x = torch.randn(100)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sugarize.sugar(x)
    assert saved == []


def test_bad_options_are_clear_errors():
    with pytest.raises(sugarize.SugarizeError, match="save='int4' is not one of full, bfloat16, uint8"):
        sugarize.sugar(torch.randn(3), save="int4")
    with pytest.raises(sugarize.SugarizeError, match="unknown surrogate 'relu'"):
        sugarize.sugar(torch.randn(3), "relu")


class _Act(nn.Module):
    def forward(self, x):
        return sugarize.sugar(x * 2.0, "bsilu", save="full")


def _grad_of(module, x):
    x = x.clone().requires_grad_()
    module(x).sum().backward()
    return x.grad


def test_opaque_to_symbolic_trace():
    gm = torch.fx.symbolic_trace(_Act())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][-1] is OP
    x = torch.randn(50)
    assert torch.equal(_grad_of(gm, x), 2 * sugarize.surrogate_grad(2 * x))


def test_opaque_to_torch_export():
    x = torch.randn(50)
    ep = torch.export.export(_Act(), (x,))
    assert OP in [n.target for n in ep.graph.nodes]
    assert torch.equal(_grad_of(ep.module(), x), 2 * sugarize.surrogate_grad(2 * x))


def test_a_plain_autograd_function_loses_the_surrogate_when_retraced():
    """Why the op is a torch.library custom op: tracers inline autograd.Functions."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.relu()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * sugarize.surrogate_grad(x)

    class M(nn.Module):
        def forward(self, x):
            return Fn.apply(x)

    x = torch.randn(50)
    eager = _grad_of(M(), x)
    assert torch.equal(eager, sugarize.surrogate_grad(x))
    for traced in (torch.fx.symbolic_trace(M()), torch.export.export(M(), (x,)).module()):
        assert torch.equal(_grad_of(traced, x), (x > 0).float())  # surrogate silently lost


@pytest.mark.parametrize("save", SAVE_MODES)
def test_torch_compile_without_graph_breaks_same_gradients(save):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    sm = sugarize.sugarize(model, save=save)
    compiled = torch.compile(sm, fullgraph=True, backend="inductor")
    x = torch.randn(32, 8)
    sm(x).pow(2).sum().backward()
    eager = [p.grad.clone() for p in sm.parameters()]
    sm.zero_grad()
    compiled(x).pow(2).sum().backward()
    for a, p in zip(eager, sm.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


def _compiled_code(fn):
    """(result, forward code, backward code) of one fresh Inductor compile of ``fn``."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    # Compile afresh: a cached artifact would not show what this process's Inductor does.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        result, (forward_code, backward_code) = run_and_get_code(fn)
    return result, forward_code, backward_code


def test_torch_compile_fuses_the_op_like_relu_and_saves_the_code():
    """Inductor computes relu and the 1-byte code in BatchNorm's kernel; the backward reads the
    code and never evaluates the surrogate again (compiled.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1))
    sm = sugarize.sugarize(model)
    x = torch.randn(4, 3, 8, 8)
    sm(x).square().sum().backward()
    eager = [p.grad.clone() for p in sm.parameters()]
    sm.zero_grad()
    sm_compiled = torch.compile(sm, fullgraph=True)
    _, forward_code, backward_code = _compiled_code(lambda: sm_compiled(x).square().sum().backward())
    assert "torch.ops.sugarize" not in forward_code + backward_code, "SUGAR ran as an opaque fallback kernel"
    assert "torch.uint8" in forward_code  # the code, computed in the forward and saved
    assert "sigmoid" not in backward_code and "exp(" not in backward_code  # ... and only read back
    for a, p in zip(eager, sm.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)


def _forward_backward(fn, x, upstream):
    y = fn(x)
    y.backward(upstream)
    return y.detach()


@pytest.mark.parametrize("save", SAVE_MODES)
def test_every_surrogate_lowers_to_generated_code_with_eager_gradients(save):
    """One compile over all registered surrogates, plain and negative_only: Inductor generates
    every formula (no extern kernel) and the gradients are eager's."""
    from sugarize.op import _uint8_grid

    cases = [(name, neg) for name in list_surrogates() for neg in (False, True)]
    x = (torch.randn(len(cases), 257, dtype=torch.float64) * 3).float()

    def f(x):
        return torch.stack([sugarize.sugar(x[i], name, negative_only=neg, save=save)
                            for i, (name, neg) in enumerate(cases)])

    upstream = torch.randn_like(x)
    x_eager = x.clone().requires_grad_()
    f(x_eager).backward(upstream)
    x_compiled = x.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    y, forward_code, backward_code = _compiled_code(lambda: _forward_backward(compiled, x_compiled, upstream))
    assert "torch.ops.sugarize" not in forward_code + backward_code
    assert same_bits(y, torch.relu(x))
    for i, (name, neg) in enumerate(cases):
        # eager evaluates s' with its fast formula, Inductor with the plain one: the same
        # to float rounding, which may move a uint8 code by one step of its grid
        step = 1 / _uint8_grid(name, tuple(sugarize.surrogates.resolve_params(name, {}).values()), neg)[0]
        atol = (step + 1e-6) * upstream[i].abs().max() if save == "uint8" else 1e-5
        torch.testing.assert_close(x_compiled.grad[i], x_eager.grad[i], rtol=1e-2 if save == "bfloat16" else 1e-5,
                                   atol=atol, msg=f"{name}, negative_only={neg}")


def test_a_surrogate_inductor_cannot_generate_runs_as_an_extern_kernel(monkeypatch):
    """The lowering's fallback: the op's eager kernel, called from the generated code, same gradients."""
    from sugarize import compiled

    monkeypatch.setattr(compiled, "_formula", lambda *args: None)
    x = torch.randn(64, requires_grad=True)
    upstream = torch.randn(64)
    eager = torch.autograd.grad(sugarize.sugar(x), x, upstream)[0]
    fn = torch.compile(lambda x: sugarize.sugar(x), fullgraph=True)
    (grad,), forward_code, _ = _compiled_code(lambda: torch.autograd.grad(fn(x), x, upstream))
    assert "torch.ops.sugarize.sugar_forward" in forward_code
    assert torch.equal(grad, eager)


def test_default_save_is_uint8_one_byte_per_element():
    x = torch.randn(4, 100, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sugarize.sugar(x)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, 400)]


@pytest.mark.parametrize(("name", "save", "negative_only"),
                         [("bsilu", "uint8", False), ("nelu", "full", True)])
def test_fused_kernels_match_the_eager_formulas(name, save, negative_only):
    """Large tensors take the torch.compile kernels; they must give the eager path's gradient."""
    from sugarize import kernels

    if not kernels.enabled():
        pytest.skip("fused kernels are turned off (SUGARIZE_FUSED=0 or no compiler)")
    x = torch.randn(kernels.MIN_NUMEL + 17) * 4
    upstream = torch.randn_like(x)
    grads = {}
    for fused in (True, False):
        kernels.set_enabled(fused)
        try:
            xi = x.clone().requires_grad_()
            sugarize.sugar(xi, name, save=save, negative_only=negative_only).backward(upstream)
            grads[fused] = xi.grad
        finally:
            kernels.set_enabled(True)
    grid = sugarize.op._uint8_grid(name, (sugarize.get_surrogate(name).defaults()["alpha"],), negative_only)
    tol = 1.01 / grid[0] if save == "uint8" else 1e-6  # codes may differ by one grid step at a rounding tie
    assert (grads[True] - grads[False]).abs().div(upstream.abs().clamp(min=1e-3)).max() <= tol
    alpha = sugarize.get_surrogate(name).defaults()["alpha"]
    assert kernels.fused_encode(x, name, [alpha], negative_only, save, grid) is not None, "the fused path was not taken"

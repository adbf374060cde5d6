"""The SUGAR op: relu forward bit for bit, surrogate backward, opaque to every tracer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sugarize
from sugarize.options import DEFAULT_SURROGATE
from sugarize.method.op import OP
from sugarize.method.surrogates import list_surrogates

from helpers import fgi, same_bits

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
    sugarize.sugar(x, name, negative_only=negative_only).backward(upstream)
    entry = sugarize.get_surrogate(name)
    d = entry.derivative(x.detach(), **entry.defaults())
    if negative_only:
        d = torch.where(x.detach() > 0, torch.ones_like(d), d)
    torch.testing.assert_close(x.grad, upstream * d, rtol=1e-13, atol=1e-15)


def reference_input(n: int = 20_000) -> torch.Tensor:
    """Dense float32 inputs over the surrogates' interesting range, their tails and zero."""
    x = torch.cat([torch.linspace(-12, 12, n // 2, dtype=torch.float64),
                   torch.randn(n // 2, dtype=torch.float64) * 4, torch.tensor([0.0, -0.0, 60.0, -60.0], dtype=torch.float64)])
    return x.float()


def assert_exact(grad: torch.Tensor, reference: torch.Tensor, upstream: torch.Tensor, msg: str = "") -> None:
    """Float rounding: relative 1e-5 of the reference, plus 1e-6 of the upstream gradient
    where terms cancel (B-SiLU's s' crosses zero near x = -2.4)."""
    err = (grad.double() - reference.double()).abs()
    bound = 1e-5 * reference.double().abs() + 1e-6 * upstream.double().abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{msg}: |grad - reference| = {err[worst]:.3g} > {bound[worst]:.3g} at "
                                  f"index {int(worst)} (grad {grad[worst]:.6g}, reference {reference[worst]:.6g})")


def fgi_reference_grad(x: torch.Tensor, upstream: torch.Tensor, name: str, negative_only: bool) -> torch.Tensor:
    """The paper's forward gradient injection, in float64: the gradient SUGAR must give."""
    x64 = x.detach().double().requires_grad_()
    fgi(x64, name, negative_only).backward(upstream.double())
    return x64.grad


@pytest.mark.parametrize("name", list_surrogates())
@pytest.mark.parametrize("negative_only", [False, True])
def test_default_gradient_equals_the_forward_gradient_injection_reference(name, negative_only):
    """What a user gets without options: SUGAR's own gradient, to float32 rounding, on every
    surrogate (NeLU's tail included: a 1-byte code rounded it to 0)."""
    x = reference_input().requires_grad_()
    upstream = torch.randn_like(x)
    sugarize.sugar(x, name, negative_only=negative_only).backward(upstream)
    assert_exact(x.grad, fgi_reference_grad(x, upstream, name, negative_only), upstream, name)


def test_default_gradient_in_float64_is_exact_to_float64_rounding():
    for name in list_surrogates():
        x = (torch.randn(4001, dtype=torch.float64) * 4).requires_grad_()
        upstream = torch.randn_like(x)
        sugarize.sugar(x, name).backward(upstream)
        ref = fgi_reference_grad(x, upstream, name, False)
        assert ((x.grad - ref).abs() <= 1e-12 * ref.abs() + 1e-14 * upstream.abs()).all(), name


def test_nelu_default_keeps_its_small_negative_tail():
    """The case the 1-byte default lost: NeLU (a=0.01) below x = -1.5 is not plain ReLU."""
    x = torch.tensor([-4.0, -3.0, -2.0, -1.5], requires_grad=True)
    sugarize.sugar(x, "nelu").sum().backward()
    expected = 2 * 0.01 * x.detach() / (1 + x.detach() ** 2) ** 2  # -0.00028 .. -0.0035
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=0)
    assert (x.grad < 0).all()


@pytest.mark.parametrize("name", list_surrogates())
def test_negative_only_gives_exactly_one_for_positive_inputs(name):
    x = torch.linspace(-5, 5, 1001).requires_grad_()
    sugarize.sugar(x, name, negative_only=True).sum().backward()
    pos = x.detach() > 0
    assert torch.equal(x.grad[pos], torch.ones(int(pos.sum())))
    assert torch.equal(x.grad[~pos], sugarize.surrogate_grad(x.detach(), name)[~pos])


def test_params_reach_the_gradient():
    x = torch.tensor([-1.0], requires_grad=True)
    sugarize.sugar(x, "nelu", alpha=0.1).sum().backward()
    assert x.grad.item() == pytest.approx(2 * 0.1 * -1 / 4)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_keeps_one_tensor_of_the_input_dtype(dtype):
    """The eager cost of exactness, pinned: s'(x) in x's dtype, one tensor per site (GELU's cost)."""
    x = torch.randn(64, 32, 8, 8, dtype=dtype, requires_grad=True)
    y, saved = _saved(lambda: sugarize.sugar(x))
    assert [(t.dtype, t.numel()) for t in saved] == [(dtype, x.numel())]
    assert saved[0].data_ptr() != x.data_ptr()
    y.sum().backward()


@pytest.mark.parametrize("save", ["bfloat16", "uint8"])
def test_compressed_modes_keep_their_byte_count(save):
    x = torch.randn(64, 32, 8, 8, requires_grad=True)
    _, saved = _saved(lambda: sugarize.sugar(x, save=save))
    assert [t.numel() * t.element_size() for t in saved] == [x.numel() * {"bfloat16": 2, "uint8": 1}[save]]


def _carries(name: str, save: str) -> bool:
    try:
        sugarize.save_error(name, save)
        return True
    except sugarize.SugarizeError:
        return False


@pytest.mark.parametrize("save", ["bfloat16", "uint8"])
@pytest.mark.parametrize("name", list_surrogates())
def test_compressed_modes_stay_within_their_stated_error(name, save):
    """Opt-in compression states its worst case (save_error); the gradient honours it, keeps 0
    and 1 exact, or the mode is refused with an error naming the exact mode."""
    x = torch.cat([torch.linspace(-80, 80, 40_001), torch.tensor([0.0])]).requires_grad_()
    if not _carries(name, save):
        with pytest.raises(sugarize.SugarizeError, match="cannot carry .* use save='full'"):
            sugarize.sugar(x, name, save=save)
        return
    stated = sugarize.save_error(name, save)
    sugarize.sugar(x, name, save=save).sum().backward()
    exact = sugarize.surrogate_grad(x.detach().double(), name)
    err = (x.grad.double() - exact).abs()
    assert err.max().item() <= stated["abs"] * 1.02
    neg = x.detach() <= 0
    assert err[neg].max().item() <= stated["rel_negative"] * exact[neg].abs().max().item() * 1.02
    assert stated["rel_negative"] <= sugarize.method.saved.MAX_NEGATIVE_SIDE_ERROR
    assert torch.equal(x.grad[exact == 0], exact[exact == 0].float())
    assert torch.equal(x.grad[exact == 1], exact[exact == 1].float())


def test_uint8_refuses_what_it_cannot_carry_and_names_the_mode_that_works():
    with pytest.raises(sugarize.SugarizeError, match=r"save='uint8' cannot carry surrogate 'nelu' .*"
                                                     r"use save='full' \(exact, the default\) or 'bfloat16'"):
        sugarize.sugar(torch.randn(3, requires_grad=True), "nelu", save="uint8")
    assert _carries("nelu", "bfloat16") and not _carries("leaky_relu", "uint8")
    sugarize.sugar(torch.randn(3, requires_grad=True), "nelu", save="uint8", alpha=0.1)  # a=0.1 fits


def _cell(err: dict) -> str:
    return f"{err['abs']:.2g} ({err['rel_negative']:.2%})"


def test_the_readme_states_each_compressed_modes_error():
    """The README's table is the one save_error computes: a claim that changes if the code does."""
    from helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    for name in list_surrogates():
        cells = [_cell(sugarize.save_error(name, s)) if _carries(name, s) else "refused"
                 for s in ("bfloat16", "uint8")]
        row = f"| `{name}` | {cells[0]} | {cells[1]} |"
        assert row in readme, f"README lacks the row {row!r}"


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
        return sugarize.sugar(x * 2.0, "bsilu")


def _grad_of(module, x):
    x = x.clone().requires_grad_()
    module(x).sum().backward()
    return x.grad


def test_opaque_to_symbolic_trace():
    gm = torch.fx.symbolic_trace(_Act())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][-1] is OP
    x = torch.randn(50)
    assert torch.equal(_grad_of(gm, x), 2 * sugarize.surrogate_grad(2 * x, "bsilu"))


def test_opaque_to_torch_export():
    x = torch.randn(50)
    ep = torch.export.export(_Act(), (x,))
    assert OP in [n.target for n in ep.graph.nodes]
    assert torch.equal(_grad_of(ep.module(), x), 2 * sugarize.surrogate_grad(2 * x, "bsilu"))


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
            return g * sugarize.surrogate_grad(x, "bsilu")

    class M(nn.Module):
        def forward(self, x):
            return Fn.apply(x)

    x = torch.randn(50)
    eager = _grad_of(M(), x)
    assert torch.equal(eager, sugarize.surrogate_grad(x, "bsilu"))
    # and that is the surrogate's gradient, by an independent reference (autograd of the primitive)
    xr = x.clone().requires_grad_()
    fgi(xr, "bsilu").sum().backward()
    assert torch.allclose(eager, xr.grad, rtol=1e-5, atol=1e-6) and not torch.equal(eager, (x > 0).float())
    for traced in (torch.fx.symbolic_trace(M()), torch.export.export(M(), (x,)).module()):
        assert torch.equal(_grad_of(traced, x), (x > 0).float())  # surrogate silently lost


@pytest.mark.parametrize("save", [None, "bfloat16", "uint8"])
def test_torch_compile_without_graph_breaks_same_gradients(save):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    sm = sugarize.sugarize(model) if save is None else sugarize.sugarize(model, save=save)
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


class _ResidualNet(nn.Module):
    """Conv-BN-ReLU, then a residual block whose ReLU follows the add: the hard case."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.act1(self.bn1(self.conv1(x)))
        return self.head(self.act2(self.bn2(self.conv2(y)) + x))


def _compiled_saved_bytes(model, x) -> int:
    _, saved = _saved(lambda: model(x))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                if t.untyped_storage().data_ptr() not in params}.values())


def test_compiled_default_is_exact_and_saves_no_more_than_relu():
    """Under torch.compile the exact op keeps nothing ReLU does not: x is recomputed in the
    backward from BatchNorm's input and statistics and the residual's operands (compiled.py);
    the backward evaluates s' in generated code, and the gradients are the reference's."""
    torch.manual_seed(0)
    relu = _ResidualNet()
    sm = sugarize.sugarize(relu)
    x = torch.randn(4, 3, 8, 8)
    reference = _ResidualNet()
    reference.load_state_dict(relu.state_dict())
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.ReLU):
            parent = reference.get_submodule(name.rpartition(".")[0]) if "." in name else reference
            setattr(parent, name.rpartition(".")[2], _FGI())
    reference.double()(x.double()).square().sum().backward()
    relu_compiled, sm_compiled = torch.compile(relu), torch.compile(sm)
    _compiled_code(lambda: relu_compiled(x).square().sum().backward())
    _, forward_code, backward_code = _compiled_code(lambda: sm_compiled(x).square().sum().backward())
    assert "torch.ops.sugarize" not in forward_code + backward_code, "SUGAR ran as an opaque fallback kernel"
    assert "exp()" in backward_code and "exp()" not in forward_code  # s'(x): in the backward only
    assert _compiled_saved_bytes(sm_compiled, x) <= _compiled_saved_bytes(relu_compiled, x)
    for (name, p), q in zip(sm.named_parameters(), reference.parameters()):
        # float32 against float64 through three BatchNorms: compare at the gradient's scale
        err = (p.grad.double() - q.grad).abs().max().item()
        assert err <= 1e-4 * q.grad.abs().max().item(), f"{name}: {err:.3g} vs scale {q.grad.abs().max():.3g}"


class _FGI(nn.Module):
    """The default's reference: autograd of its primitive (B-SiLU at dead units, relu elsewhere)."""

    def forward(self, x):
        return fgi(x, DEFAULT_SURROGATE)


def test_torch_compile_fuses_the_compressed_op_like_relu_and_saves_the_code():
    """save="uint8": Inductor computes relu and the 1-byte code in BatchNorm's kernel; the
    backward reads the code and never evaluates the surrogate again (compiled.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1))
    sm = sugarize.sugarize(model, save="uint8")
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


def _compiled_grad_of_all(cases, x, upstream, **options):
    """One fresh compile of SUGAR over rows of ``x``, one (surrogate, negative_only) per row:
    asserts that Inductor generated every formula and that the forward is relu bit for bit;
    returns the gradient for ``upstream``."""
    def f(x):
        return torch.stack([sugarize.sugar(x[i], name, negative_only=neg, **options)
                            for i, (name, neg) in enumerate(cases)])

    x_compiled = x.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    y, forward_code, backward_code = _compiled_code(lambda: _forward_backward(compiled, x_compiled, upstream))
    assert "torch.ops.sugarize" not in forward_code + backward_code, "an extern kernel was called"
    assert same_bits(y, torch.relu(x))
    return x_compiled.grad


def test_compiled_default_gradient_equals_the_reference_on_every_surrogate():
    """One compile over all registered surrogates, plain and negative_only, with the defaults:
    every formula is generated code, the forward is relu bit for bit, the gradient SUGAR's."""
    cases = [(name, neg) for name in list_surrogates() for neg in (False, True)]
    x = torch.stack([reference_input(2000) for _ in cases])
    upstream = torch.randn_like(x)
    grad = _compiled_grad_of_all(cases, x, upstream)
    for i, (name, neg) in enumerate(cases):
        assert_exact(grad[i], fgi_reference_grad(x[i], upstream[i], name, neg), upstream[i],
                     f"{name}, negative_only={neg}, compiled")


@pytest.mark.parametrize("save", ["bfloat16", "uint8"])
def test_every_surrogate_lowers_to_generated_code_with_eager_gradients(save):
    """The compressed modes, compiled: every formula Inductor generates (no extern kernel)
    gives eager's gradients; surrogates a mode cannot carry are refused, not compiled."""
    from sugarize.method.saved import _uint8_grid

    cases = [(name, neg) for name in list_surrogates() for neg in (False, True) if _carries(name, save)]
    x = (torch.randn(len(cases), 257, dtype=torch.float64) * 3).float()
    upstream = torch.randn_like(x)
    x_eager = x.clone().requires_grad_()
    torch.stack([sugarize.sugar(x_eager[i], name, negative_only=neg, save=save)
                 for i, (name, neg) in enumerate(cases)]).backward(upstream)
    grad = _compiled_grad_of_all(cases, x, upstream, save=save)
    for i, (name, neg) in enumerate(cases):
        # eager evaluates s' with its fast formula, Inductor with the plain one: the same
        # to float rounding, which may move a uint8 code by one step of its grid
        if save == "uint8":
            step = 1 / _uint8_grid(name, tuple(sugarize.method.surrogates.resolve_params(name, {}).values()), neg)[0]
            atol = (step + 1e-6) * upstream[i].abs().max()
        else:
            atol = 1e-5
        torch.testing.assert_close(grad[i], x_eager.grad[i], rtol=1e-2 if save == "bfloat16" else 1e-5,
                                   atol=atol, msg=f"{name}, negative_only={neg}")


def test_a_surrogate_inductor_cannot_generate_runs_as_an_extern_kernel(monkeypatch):
    """The lowering's fallback: the op's eager kernel, called from the generated code, same gradients."""
    from sugarize.method import compiled

    monkeypatch.setattr(compiled, "_formula", lambda *args: None)
    x = torch.randn(64, requires_grad=True)
    upstream = torch.randn(64)
    for save, (where, name) in {None: (1, "sugar_grad"), "uint8": (0, "sugar_forward")}.items():
        kwargs = {} if save is None else {"save": save}
        eager = torch.autograd.grad(sugarize.sugar(x, **kwargs), x, upstream)[0]
        fn = torch.compile(lambda x: sugarize.sugar(x, **kwargs), fullgraph=True)
        with pytest.warns(UserWarning, match="extern"):
            compiled._state["warned"] = False
            (grad,), *code = _compiled_code(lambda: torch.autograd.grad(fn(x), x, upstream))
        assert f"torch.ops.sugarize.{name}" in code[where]
        torch.testing.assert_close(grad, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "save", "negative_only"),
                         [("bsilu", "uint8", False), ("nelu", None, True)])
def test_fused_kernels_match_the_eager_formulas(name, save, negative_only):
    """Large tensors take the opt-in torch.compile kernels; they must give the eager path's gradient."""
    from sugarize.method import kernels

    was = kernels.enabled()
    x = torch.randn(kernels.MIN_NUMEL + 17) * 4
    upstream = torch.randn_like(x)
    grads = {}
    for fused in (True, False):
        kernels.set_enabled(fused)
        try:
            xi = x.clone().requires_grad_()
            kwargs = {} if save is None else {"save": save}
            sugarize.sugar(xi, name, negative_only=negative_only, **kwargs).backward(upstream)
            grads[fused] = xi.grad
        finally:
            kernels.set_enabled(was)
    save = save or sugarize.options.DEFAULT_SAVE
    grid = sugarize.method.saved.saved_grid(name, (sugarize.get_surrogate(name).defaults()["alpha"],), negative_only, save)
    tol = 1.01 / grid[0] if save == "uint8" else 1e-6  # codes may differ by one grid step at a rounding tie
    assert (grads[True] - grads[False]).abs().div(upstream.abs().clamp(min=1e-3)).max() <= tol
    alpha = sugarize.get_surrogate(name).defaults()["alpha"]
    kernels.set_enabled(True)
    try:
        assert kernels.fused_encode(x, name, [alpha], negative_only, save, grid) is not None, "the fused path was not taken"
    finally:
        kernels.set_enabled(was)


def test_a_failing_fused_kernel_warns_once_and_turns_off_only_its_configuration(monkeypatch):
    from sugarize.method import kernels

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernels, "_encoder", lambda *a: broken)
    monkeypatch.setattr(kernels, "_state", {"enabled": True, "failed": set()})
    x = torch.randn(kernels.MIN_NUMEL) * 3
    for _ in range(2):  # warned once, then served by the eager formulas without another attempt
        xi = x.clone().requires_grad_()
        with pytest.warns(UserWarning, match="fused SUGAR kernel is unavailable") if _ == 0 else _no_warning():
            sugarize.sugar(xi, "elu").sum().backward()
        torch.testing.assert_close(xi.grad, sugarize.surrogate_grad(x, "elu"))
    assert len(kernels._state["failed"]) == 1 and kernels.enabled()


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

"""The sugarize, strip and inspect passes on hand-written models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sugarize
from sugarize.method.op import OP

from helpers import fgi, load_fixture, same_bits

SPELLINGS = [
    "nn.ReLU", "nn.ReLU(inplace=True)", "F.relu", "F.relu(inplace=True)",
    "torch.relu_", "torch.relu", "Tensor.relu", "Tensor.relu_",
]


@pytest.fixture(scope="module")
def spellings():
    mod = load_fixture("all_spellings")
    return mod, mod.build_model(), mod.example_inputs()[0]


def node_kinds(gm):
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            out.append("sugar" if n.target is OP else getattr(n.target, "__name__", str(n.target)))
        elif n.op in ("call_module", "call_method"):
            out.append(f"{n.op}:{n.target}")
    return out


def test_all_spellings_convert_8_of_8(spellings):
    _, model, _ = spellings
    sm = sugarize.sugarize(model)
    report = sm.meta["sugarize"]["report"]
    assert [s.spelling for s in report.sites] == SPELLINGS
    assert [s.status for s in report.sites] == ["converted"] * 8
    assert [s.path for s in report.sites][:2] == ["act", "act_inplace"]
    # each site a plain Linear reads alone is fused with it (#31): the last one (read by h + x and,
    # in place, by the add) and the one whose output the add also reads are not
    assert [s.fused for s in report.sites] == ["Linear"] * 6 + ["", ""]
    assert node_kinds(sm) == [
        "call_module:fc.0", "linear_sugar", "linear_sugar", "linear_sugar", "linear_sugar", "linear_sugar",
        "linear_sugar", "sugar", "call_module:fc.7", "sugar", "add", "call_module:head",
    ]
    apart = sugarize.sugarize(model, fuse_linear=False)
    assert node_kinds(apart) == [
        "call_module:fc.0", "sugar", "call_module:fc.1", "sugar", "call_module:fc.2", "sugar",
        "call_module:fc.3", "sugar", "call_module:fc.4", "sugar", "call_module:fc.5", "sugar",
        "call_module:fc.6", "sugar", "call_module:fc.7", "sugar", "add", "call_module:head",
    ]


def _reference_forward(m, x):
    """AllSpellings.forward written by hand, each ReLU replaced by reference SUGAR."""
    fc = m.fc
    x = fgi(fc[0](x))
    x = fgi(fc[1](x))
    x = fgi(fc[2](x))
    x = fgi(fc[3](x))
    x = fgi(fc[4](x))
    x = fgi(fc[5](x))
    x = fgi(fc[6](x))
    h = fgi(fc[7](x))
    return m.head(h + x)


def _param_grads(module, x):
    module.zero_grad()
    module(x).pow(2).sum().backward()
    return {k: p.grad.clone() for k, p in module.named_parameters()}


def test_gradients_equal_reference_sugar_and_differ_from_relu(spellings):
    _, model, x = spellings
    model = copy.deepcopy(model).double()
    x = x.double() * 3
    sm = sugarize.sugarize(model)
    ref = copy.deepcopy(model)
    ref.forward = lambda inp: _reference_forward(ref, inp)
    got, expected, relu = _param_grads(sm, x), _param_grads(ref, x), _param_grads(model, x)
    assert got.keys() == expected.keys() == relu.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(got[k], relu[k]) for k in got)
    assert not torch.allclose(got["fc.0.weight"], relu["fc.0.weight"])


def test_strip_returns_bit_identical_outputs(spellings):
    _, model, x = spellings
    sm = sugarize.sugarize(model)
    plain = sugarize.strip(sm)
    assert sugarize.count_sugar(plain) == 0 and sugarize.count_sugar(sm) == 8
    assert same_bits(plain(x), model(x)) and same_bits(sm(x), model(x))
    assert [s.status for s in sugarize.report_of(plain).sites] == ["stripped"] * 8
    assert [s.spelling for s in sugarize.report_of(plain).sites] == SPELLINGS


def test_user_model_is_untouched(spellings):
    _, model, x = spellings
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    sm = sugarize.sugarize(model)
    with torch.no_grad():
        for p in sm.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), out)
    assert isinstance(model.act, nn.ReLU) and not isinstance(model, torch.fx.GraphModule)


def test_copy_false_shares_weights_and_leaves_the_forward_alone(spellings):
    mod, _, x = spellings
    model = mod.build_model()
    out = model(x)
    sm = sugarize.sugarize(model, copy=False)
    assert sugarize.count_sugar(sm) == 8 and same_bits(sm(x), out)
    shared = {id(p) for p in model.parameters()}
    assert shared and all(id(p) in shared for p in sm.parameters())  # the model's own tensors
    assert isinstance(model.act, nn.ReLU) and torch.equal(model(x), out)
    plain = sugarize.strip(sm, copy=False)
    assert plain is sm and sugarize.count_sugar(sm) == 0 and same_bits(plain(x), out)


def test_copy_false_never_rewrites_a_graph_module_it_was_given(spellings):
    _, model, x = spellings
    gm = torch.fx.symbolic_trace(model)
    code = gm.code
    sm = sugarize.sugarize(gm, copy=False)
    assert sugarize.count_sugar(sm) == 8 and sugarize.count_sugar(gm) == 0 and gm.code == code
    shared = {id(p) for p in gm.parameters()}
    assert all(id(p) in shared for p in sm.parameters()) and same_bits(gm(x), sm(x))


def test_state_dict_loads_into_the_original_class(spellings):
    mod, model, x = spellings
    sm = sugarize.sugarize(model)
    with torch.no_grad():
        for p in sm.parameters():
            p.mul_(0.5)
    fresh = mod.AllSpellings()
    missing, unexpected = fresh.load_state_dict(sm.state_dict(), strict=True)
    assert not missing and not unexpected
    assert torch.equal(fresh(x), sugarize.strip(sm)(x))


def test_unused_parameters_and_buffers_keep_their_keys():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)
            self.register_buffer("scale", torch.ones(3))
            self.nested = nn.Module()
            self.nested.register_buffer("table", torch.arange(4.0))

        def forward(self, x):
            return F.relu(self.used(x))

    m = M()
    sm = sugarize.sugarize(m)
    assert list(sorted(sm.state_dict())) == list(sorted(m.state_dict()))


def test_reused_module_is_converted_at_each_call_site():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    sm = sugarize.sugarize(M())
    sites = sm.meta["sugarize"]["report"].sites
    assert [(s.path, s.status) for s in sites] == [("relu", "converted"), ("relu", "converted")]
    assert node_kinds(sm) == ["call_module:a", "linear_sugar", "sugar"]  # the first fused with b (#31)
    assert node_kinds(sugarize.sugarize(M(), fuse_linear=False)) == ["call_module:a", "sugar", "call_module:b", "sugar"]


def test_inplace_on_a_view_mutates_the_base():
    class M(nn.Module):
        def forward(self, x):
            y = x * 1.0
            v = y[:, :2]
            v.relu_()  # mutates y through the view
            return y

    m = M()
    x = torch.randn(3, 4)
    sm = sugarize.sugarize(m)
    assert "call_method:copy_" in node_kinds(sm)
    assert same_bits(sm(x), m(x))
    assert same_bits(sugarize.strip(sm)(x), m(x))
    xg = x.clone().requires_grad_()
    sm(xg).sum().backward()
    expected = torch.ones(3, 4)
    expected[:, :2] = sugarize.surrogate_grad(x[:, :2])
    assert torch.equal(xg.grad, expected)


def test_inplace_then_read_sees_relu_values():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            r = h.relu_()
            return h * 2 + r  # both names see the ReLU'd values

    m = M()
    x = torch.randn(8, 4)
    sm = sugarize.sugarize(m)
    assert "call_method:copy_" not in node_kinds(sm)  # fresh tensor: no extra copy
    assert same_bits(sm(x), m(x))


def test_inplace_on_model_input_keeps_mutating_it():
    class M(nn.Module):
        def forward(self, x):
            torch.relu_(x)
            return x + 1

    m = M()
    x1, x2 = torch.randn(5), None
    x2 = x1.clone()
    out_ref = m(x1)
    out = sugarize.sugarize(m)(x2)
    assert same_bits(out, out_ref) and same_bits(x2, x1)


def test_lookalikes_are_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.r6, self.hs, self.fc = nn.ReLU6(), nn.Hardswish(), nn.Linear(4, 4)

        def forward(self, x):
            x = self.r6(self.fc(x))
            x = self.hs(x) + F.relu6(x) + torch.clamp(x, min=0, max=6) + x.clamp(min=0, max=1) + F.hardtanh(x, 0, 6)
            return F.leaky_relu(x) + F.gelu(x) + F.relu(x)

    sm = sugarize.sugarize(M())
    report = sm.meta["sugarize"]["report"]
    assert [(s.spelling, s.status) for s in report.sites] == [
        ("nn.ReLU6", "skipped"), ("F.relu6", "skipped"), ("F.leaky_relu", "skipped"), ("F.gelu", "skipped"),
        ("F.relu", "converted"),
    ]
    assert "ReLU6 clamps at 6" in report.sites[0].reason
    assert "--relufy gelu" in report.sites[3].reason
    assert node_kinds(sm).count("sugar") == 1


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


@pytest.mark.parametrize(
    "include,exclude,expected",
    [
        ((), (), ["stem.1", "layer1.1", "layer1.3", "head.1"]),
        ((), ("head",), ["stem.1", "layer1.1", "layer1.3"]),
        ((), ("head.*", "layer1.3"), ["stem.1", "layer1.1"]),
        (("layer1",), (), ["layer1.1", "layer1.3"]),
        (("layer1.*",), ("*.3",), ["layer1.1"]),
    ],
)
def test_include_exclude_globs(include, exclude, expected):
    sm = sugarize.sugarize(Blocks(), include=include, exclude=exclude)
    report = sm.meta["sugarize"]["report"]
    assert [s.path for s in report.sites if s.status == "converted"] == expected
    for s in report.skipped:
        assert s.reason.startswith(("excluded by", "not under --include"))


def test_inspect_on_original_converted_and_stripped(spellings):
    _, model, _ = spellings
    before = sugarize.inspect(model)
    assert [s.status for s in before.sites] == ["convertible"] * 8
    sm = sugarize.sugarize(model, "nelu", alpha=0.05)
    during = sugarize.inspect(sm)
    assert [(s.spelling, s.status, s.surrogate) for s in during.sites] == [(sp, "sugar", "nelu") for sp in SPELLINGS]
    after = sugarize.inspect(sugarize.strip(sm))
    assert [s.status for s in after.sites] == ["convertible"] * 8
    assert "8 activation sites: 8 convertible" in str(before)


def test_config_round_trips_to_json_and_reproduces_the_conversion(spellings):
    _, model, x = spellings
    cfg = sugarize.SugarConfig(surrogate="nelu", params={"alpha": 0.05}, negative_only=True, exclude=("act",))
    again = sugarize.SugarConfig.from_json(cfg.to_json())
    assert again == cfg
    a, b = sugarize.sugarize(model, config=cfg), sugarize.sugarize(model, config=again)
    assert a.code == b.code
    assert "'nelu', [0.05], True" in a.code


def test_not_a_module_and_untraceable_model_are_clear_errors():
    with pytest.raises(sugarize.SugarizeError, match="expected a torch.nn.Module, got function"):
        sugarize.sugarize(lambda x: x)

    class Dynamic(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return F.relu(x)
            return x

    with pytest.raises(sugarize.SugarizeError, match="symbolic_trace cannot trace Dynamic"):
        sugarize.sugarize(Dynamic(), capture="fx")
    assert sugarize.sugarize(Dynamic()).meta["sugarize"]["report"].capture == "modules"


def test_train_eval_mode_is_kept():
    m = Blocks().eval()
    assert sugarize.sugarize(m).training is False
    assert sugarize.sugarize(Blocks()).training is True


def test_converted_model_pickles_and_deepcopies(spellings, tmp_path):
    _, model, x = spellings
    sm = sugarize.sugarize(model)
    clone = copy.deepcopy(sm)
    assert sugarize.count_sugar(clone) == 8 and same_bits(clone(x), sm(x))
    retraced = torch.fx.symbolic_trace(sm)
    assert sugarize.count_sugar(retraced) == 8


def test_public_functions_are_not_shadowed_by_submodules():
    import importlib

    for name in ("verify", "audit", "sugarize", "strip", "inspect", "finetune", "export_onnx"):
        importlib.import_module("sugarize.deploy.parity")
        importlib.import_module("sugarize.training.deadunits")
        assert callable(getattr(sugarize, name)) and not isinstance(getattr(sugarize, name), type(sugarize)), name


# --- keys and sites: what the converted model keeps, and ReLU in all but name ---


class _Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        self.register_buffer("shift", torch.ones(4))

    def forward(self, x):
        return F.relu(self.lin(x) * self.scale + self.shift)


def test_non_persistent_buffers_stay_non_persistent():
    """The converted and the stripped model's state_dict load into the user's class, strictly."""
    model = _Buffers()
    sm = sugarize.sugarize(model)
    for converted in (sm, sugarize.strip(sm), sugarize.sugarize(model, copy=False)):
        assert sorted(converted.state_dict()) == sorted(model.state_dict()) == ["lin.bias", "lin.weight", "shift"]
        assert _Buffers().load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(3, 4)
    assert same_bits(sm(x), model(x))


class _AllButName(nn.Module):
    """ReLU in all but name: clamp(min=0) with no max, clamp_min(0), threshold(0, 0), in place too;
    and two look-alikes that are not ReLU."""

    def forward(self, x):
        a = x.clamp(min=0) + torch.clamp(x, min=0.0) + x.clamp_min(0) + torch.clamp_min(x, 0)
        b = x * 3
        b.clamp_(min=0)
        keep = x.clamp(min=0, max=6) + x.clamp(min=0.5)  # a max, a non-zero min: left alone
        return a + b + keep


def test_relu_equivalent_spellings_convert_bit_for_bit_with_the_surrogate_gradient():
    model = _AllButName()
    sm = sugarize.sugarize(model)
    report = sm.meta["sugarize"]["report"]
    assert [s.spelling for s in report.converted] == [
        "Tensor.clamp(min=0)", "torch.clamp(min=0)", "Tensor.clamp_min(0)", "torch.clamp_min(0)",
        "Tensor.clamp_(min=0)"]
    assert len(report.sites) == 5  # the look-alikes are not ReLU sites
    x = torch.cat([torch.randn(500) * 3, torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])
    assert same_bits(sm(x), model(x)) and same_bits(sugarize.strip(sm)(x), model(x))
    xs, xr = x[:500].clone().requires_grad_(), x[:500].clone().requires_grad_()
    sm(xs).sum().backward()
    reference = lambda v: 4 * fgi(v) + fgi(3 * v) + v.clamp(min=0, max=6) + v.clamp(min=0.5)  # noqa: E731
    reference(xr).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_threshold_zero_zero_converts_with_its_signed_zero_noted():
    class T(nn.Module):
        def forward(self, x):
            return F.threshold(x, 0, 0) + F.threshold(x, 0.5, 0)  # the second is not ReLU

    sm = sugarize.sugarize(T())
    (site,) = sm.meta["sugarize"]["report"].converted
    assert site.spelling == "F.threshold(0, 0)" and "sign of a zero" in site.reason
    x = torch.randn(200)
    torch.testing.assert_close(sm(x), T()(x), rtol=0, atol=0)


def test_relu_equivalent_spellings_convert_on_the_runtime_path_too():
    class Untraceable(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: no symbolic trace
                return x.clamp(min=0) * 2
            return torch.clamp_min(x, 0) + F.threshold(x, 0, 0)

    model = Untraceable()
    x = torch.randn(64).abs()
    sm = sugarize.sugarize(model, example_args=(x,))
    report = sm.meta["sugarize"]["report"]
    assert report.capture == "modules" and report.runtime["converted_calls"] == 1
    assert report.runtime["unconverted_calls"] == 0 and report.sites[0].spelling == "Tensor.clamp(min=0)"
    xs = (-x).requires_grad_()
    out = sm(xs)
    assert same_bits(out, model(-x))
    out.sum().backward()
    torch.testing.assert_close(xs.grad, 2 * sugarize.surrogate_grad(-x.detach()), rtol=1e-6, atol=0)


def test_a_torchscript_submodule_is_a_skipped_site_with_the_reason():
    class WithScript(nn.Module):
        def __init__(self):
            super().__init__()
            self.scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()))
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.scripted(x))

    for report in (sugarize.inspect(WithScript()), sugarize.sugarize(WithScript()).meta["sugarize"]["report"]):
        skipped = report.skipped
        assert [(s.path, s.spelling, s.status) for s in skipped] == [("scripted", "TorchScript", "skipped")]
        assert "2 ReLU call(s)" in skipped[0].reason and "before scripting" in skipped[0].reason
        assert [s.path for s in report.sites if s.status in ("converted", "convertible")] == ["act"]


def test_a_converted_model_failing_where_the_original_runs_is_our_bug_not_the_inputs(monkeypatch):
    from sugarize.errors import InputError, InternalError
    from sugarize.passes import callpath

    real = callpath.count_calls
    calls = []

    def second_fails(model, args=(), kwargs=None):
        calls.append(model)
        if len(calls) == 2:
            raise RuntimeError("broken by the conversion")
        return real(model, args, kwargs)

    monkeypatch.setattr(callpath, "count_calls", second_fails)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(InternalError, match="the converted model fails on inputs the original runs") as info:
        sugarize.sugarize(model, example_args=(torch.randn(2, 4),))
    assert info.value.exit_code == 3 and not isinstance(info.value, InputError)
    monkeypatch.setattr(callpath, "count_calls", real)
    with pytest.raises(InputError, match="the example inputs do not run through the model"):
        sugarize.sugarize(model, example_args=(torch.randn(2, 5),))


class _OutProducer(nn.Module):
    def forward(self, x):
        buf = torch.empty_like(x)
        y = torch.add(x, 1, out=buf)  # y is buf
        y.relu_()  # so this mutates buf too
        return buf * 2 + y


class _OutThenInplace(nn.Module):
    def forward(self, x):
        buf = torch.zeros_like(x)
        torch.mul(x, 2, out=buf)
        z = torch.relu_(buf)
        return buf + z


class _ViewBeforeInplace(nn.Module):
    def forward(self, x):
        y = x * 1.5
        v = y.view(-1)  # a view taken before the in-place ReLU sees it
        torch.relu_(y)
        return v + y.sum()


class _InplaceChain(nn.Module):
    def forward(self, x):
        y = x - 0.5
        y.relu_()
        y.mul_(2)
        F.relu(y, inplace=True)
        return torch.cat([y, x.clamp_(min=0)])  # ... and one on the model's input


@pytest.mark.parametrize("make", [_OutProducer, _OutThenInplace, _ViewBeforeInplace, _InplaceChain],
                         ids=lambda c: c.__name__)
def test_in_place_relus_on_aliased_tensors_compute_what_the_original_computes(make):
    """out= producers, views and in-place chains: the converted and the stripped model match the
    original bit for bit, inputs mutated alike (the out= case was wrong: the add counted as fresh)."""
    model = make()
    sm = sugarize.sugarize(model)
    assert sm.meta["sugarize"]["report"].converted
    x = torch.cat([torch.randn(40) * 2, torch.tensor([0.0, -0.0, float("inf"), -float("inf")])]).reshape(4, 11)
    for converted in (sm, sugarize.strip(sm)):
        xa, xb = x.clone(), x.clone()
        assert same_bits(converted(xa), model(xb)) and same_bits(xa, xb)

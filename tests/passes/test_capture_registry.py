"""A new capture path is one object and one registry line (#30): a toy path registered here is
used by sugarize, inspect, strip, count_sugar, the audit and export, and taken out again."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import sugarize
from sugarize.errors import CaptureError
from sugarize.passes import paths
from sugarize.passes.report import Site

from helpers import fgi, same_bits


class Toy(nn.Module):
    """The only kind of model the toy path takes."""

    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


class ToySugar(nn.Module):
    """The toy path's SUGAR module (its own class: nothing else strips or counts it)."""

    def __init__(self, surrogate: str):
        super().__init__()
        self.surrogate = surrogate

    def forward(self, x):
        return sugarize.sugar(x, self.surrogate)


class ToyPath:
    NAME = "toy"

    def explain(self, model):
        return None if isinstance(model, Toy) else f"not a Toy but a {type(model).__name__}"

    def _check(self, model):
        why = self.explain(model)
        if why:
            raise CaptureError(f"the toy path takes Toy models only ({why})", reason=why)

    def _relus(self, model, cls=nn.ReLU):
        return [(n, m) for n, m in model.named_modules() if type(m) is cls]

    def find(self, model, cfg, status="convertible"):
        self._check(model)
        return [Site(n, "nn.ReLU", "relu", "", status, surrogate=cfg.surrogate, capture=self.NAME)
                for n, _ in self._relus(model)] + \
            [Site(n, "toy SUGAR", "relu", "", "sugar", surrogate=m.surrogate, capture=self.NAME)
             for n, m in self._relus(model, ToySugar)]

    def inspect(self, model, cfg, example_args):
        return self.find(model, cfg), ["read by the toy path"]

    def convert(self, model, cfg, *, copy=True):
        self._check(model)
        out = copy_module(model)
        sites = []
        for name, _ in self._relus(out):
            setattr(out, name, ToySugar(cfg.surrogate))
            sites.append(Site(name, "nn.ReLU", "relu", "", "converted", surrogate=cfg.surrogate, capture=self.NAME))
        return out, sites

    def strip_(self, model):
        sites = []
        for name, m in self._relus(model, ToySugar):
            setattr(model, name, nn.ReLU())
            sites.append(Site(name, "toy SUGAR", "relu", "", "stripped", surrogate=m.surrogate, capture=self.NAME))
        return sites

    def count(self, model):
        return len(self._relus(model, ToySugar))

    def holds(self, model):
        return self.count(model) > 0

    @contextlib.contextmanager
    def instrument(self, model, record):
        self._check(model)
        hooks = [m.register_forward_hook(lambda mod, args, out, n=n: record((n, "toy", "relu"), args[0], out))
                 for n, m in self._relus(model) + self._relus(model, ToySugar)]
        try:
            yield model
        finally:
            for h in hooks:
                h.remove()


def copy_module(model):
    return copy.deepcopy(model)


@pytest.fixture()
def toy_path():
    path = sugarize.register_capture_path(ToyPath(), before="fx")  # the public name (#38 item 4)
    try:
        yield path
    finally:
        sugarize.unregister_capture_path("toy")


def test_a_registered_path_is_used_end_to_end(toy_path, tmp_path):
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(5, 6)
    assert paths.captures() == ("auto", "toy", "fx", "modules")

    report = sugarize.inspect(model)  # inspect
    assert report.capture == "toy" and "read by the toy path" in report.notes
    assert [(s.path, s.status) for s in report.sites] == [("act", "convertible")]

    sm = sugarize.sugarize(model)  # sugarize: auto takes the first path that applies
    assert type(sm.act) is ToySugar and sugarize.report_of(sm).capture == "toy"
    assert sugarize.count_sugar(sm) == 1  # count
    h = model.l1(x).detach().requires_grad_()
    sm.act(h).sum().backward()
    ref = h.detach().clone().requires_grad_()
    fgi(ref).sum().backward()
    assert torch.allclose(h.grad, ref.grad, rtol=1e-5, atol=1e-6)  # its backward is SUGAR's

    rep = sugarize.audit(sm, [x])  # the audit instruments through the toy path
    assert [(s.path, s.spelling) for s in rep.sites] == [("act", "toy")]

    plain = sugarize.strip(sm)  # strip
    assert type(plain.act) is nn.ReLU and sugarize.count_sugar(plain) == 0 and same_bits(plain(x), model(x))
    assert [(s.path, s.status, s.capture) for s in sugarize.report_of(plain).sites] == [("act", "stripped", "toy")]

    res = sugarize.export_onnx(sm, tmp_path / "toy.onnx", (x,))  # export strips through the registry
    assert res.stripped_sites == 1 and res.op_types == sugarize.export_onnx(model, tmp_path / "o.onnx", (x,)).op_types


def test_a_path_that_does_not_apply_says_why_and_the_next_one_is_taken(toy_path):
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert toy_path.explain(mlp) == "not a Toy but a Sequential"
    sm = sugarize.sugarize(mlp)
    assert sugarize.report_of(sm).capture == "fx"
    with pytest.raises(CaptureError) as err:
        sugarize.sugarize(mlp, capture="toy")
    assert err.value.reason == "not a Toy but a Sequential"  # a field, not parsed from the message


def test_registering_twice_or_before_an_unknown_path_is_refused(toy_path):
    with pytest.raises(sugarize.SugarizeError, match="registered already"):
        paths.register_capture_path(ToyPath())
    other = ToyPath()
    other.NAME = "other"
    with pytest.raises(sugarize.SugarizeError, match="no capture path named 'nope'"):
        paths.register_capture_path(other, before="nope")


def test_unregistered_it_is_gone():
    sugarize.register_capture_path(ToyPath(), before="fx")
    assert "toy" in paths.captures() and sugarize.report_of(sugarize.sugarize(Toy(), capture="toy")).capture == "toy"
    sugarize.unregister_capture_path("toy")
    assert "toy" not in paths.captures()
    with pytest.raises(sugarize.SugarizeError, match="capture='toy' is not one of auto, fx, modules"):
        sugarize.sugarize(Toy(), capture="toy")


def test_the_fx_path_explains_why_it_does_not_apply():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x.relu() if x.sum() > 0 else x

    why = paths.get_path("fx").explain(Dynamic())
    assert why.startswith("torch.fx.symbolic_trace cannot trace Dynamic") and "Mark" not in why
    assert paths.get_path("fx").explain(nn.Sequential(nn.ReLU())) is None
    sm = sugarize.sugarize(Dynamic())
    assert sugarize.report_of(sm).notes[0].startswith("not traceable by torch.fx (torch.fx.symbolic_trace cannot trace")


def test_inspect_takes_the_capture_path_sugarize_would():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert sugarize.inspect(mlp).capture == "fx"
    report = sugarize.inspect(mlp, capture="modules")
    assert report.capture == "modules" and [(s.path, s.status) for s in report.sites] == [("1", "convertible")]

    class Dynamic(nn.Module):
        def forward(self, x):
            return x.relu() if x.sum() > 0 else x

    with pytest.raises(CaptureError, match="cannot trace Dynamic"):
        sugarize.inspect(Dynamic(), capture="fx")
    with pytest.raises(sugarize.SugarizeError, match="capture='nope' is not one of"):
        sugarize.inspect(mlp, capture="nope")


def test_a_registered_path_says_its_own_notes_call_rows_and_op_configurations(toy_path):
    """notes, the rows once example inputs ran, and warmup's configurations come from the path."""
    from sugarize.options import OpOptions

    toy_path.notes = lambda converted, reasons, capture: ["converted by the toy path"]
    toy_path.with_calls = lambda report, before, after, cfg: (report.sites, report.notes + ["toy counted calls"])
    toy_path.op_options = lambda model: {OpOptions("nelu", (0.01,), False, "full")}
    try:
        sm = sugarize.sugarize(Toy(), example_args=(torch.randn(2, 6),))
        assert sugarize.report_of(sm).notes == ["converted by the toy path", "toy counted calls"]
        assert OpOptions("nelu", (0.01,), False, "full") in paths.op_options(sm)
    finally:
        for name in ("notes", "with_calls", "op_options"):
            delattr(toy_path, name)

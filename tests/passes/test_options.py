"""The pass's options mean one thing on every path: keywords or a config (never both silently),
an explicit capture path, copy= that never mutates the caller's model, modes given back."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sugarize
from sugarize import SugarConfig

from helpers import fgi, same_bits


class Dynamic(nn.Module):
    """Data-dependent control flow: no symbolic trace."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return torch.relu(y) if y.sum() > 0 else torch.relu(-y)


def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_keywords_that_contradict_the_config_are_an_error_not_dropped():
    model = _mlp()
    with pytest.raises(sugarize.SugarizeError, match="surrogate='nelu' contradicts config.surrogate='bsilu_dead'"):
        sugarize.sugarize(model, "nelu", config=SugarConfig())
    with pytest.raises(sugarize.SugarizeError, match="contradict config.params"):
        sugarize.sugarize(model, config=SugarConfig("nelu"), alpha=0.1)
    with pytest.raises(sugarize.SugarizeError, match="save='uint8' contradicts"):
        sugarize.sugarize(model, save="uint8", config=SugarConfig("bsilu"))
    sm = sugarize.sugarize(model, "nelu", config=SugarConfig("nelu", params={"alpha": 0.05}))  # agrees: fine
    assert sugarize.report_of(sm).converted[0].surrogate == "nelu"
    assert sm.meta["sugarize"]["config"]["params"] == {"alpha": 0.05}


def test_capture_is_explicit():
    with pytest.raises(sugarize.SugarizeError, match="capture='jit' is not one of auto, fx, modules"):
        sugarize.sugarize(_mlp(), capture="jit")
    with pytest.raises(sugarize.SugarizeError):
        sugarize.sugarize(Dynamic(), capture="fx")
    model = _mlp()
    sm = sugarize.sugarize(model, capture="modules")
    assert type(sm) is nn.Sequential and sugarize.report_of(sm).capture == "modules"
    x = torch.randn(3, 4)
    assert same_bits(sm(x), model(x))
    assert sugarize.report_of(sugarize.sugarize(Dynamic())).capture == "modules"  # auto falls back
    # read back from the module: the ReLU was swapped, and its backward is SUGAR's, not ReLU's
    from sugarize.method.module import SugarActivation

    assert [type(m) for m in sm] == [nn.Linear, SugarActivation, nn.Linear] and sugarize.count_sugar(sm) == 1
    h = (model[0](x)).detach().requires_grad_()
    sm[1](h).sum().backward()
    ref = h.detach().clone().requires_grad_()
    fgi(ref).sum().backward()
    assert torch.allclose(h.grad, ref.grad, rtol=1e-5, atol=1e-6) and not torch.equal(h.grad, (h > 0).float())


@pytest.mark.parametrize("capture", ["fx", "modules"])
def test_copy_false_shares_weights_and_never_changes_the_model(capture):
    """Before, copy=False on the runtime path hooked the caller's model itself."""
    model = _mlp() if capture == "fx" else Dynamic()
    sm = sugarize.sugarize(model, copy=False, capture=capture)
    assert not model._forward_hooks and not model._forward_pre_hooks and not hasattr(model, "meta")
    x = torch.randn(5, 4, requires_grad=True)
    model(x).sum().backward()
    assert torch.equal(x.grad, _plain_relu_grad(model, x))  # the model's own gradient is still ReLU's
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    sm(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # shared weights trained


def _plain_relu_grad(model, x):
    xr = x.detach().clone().requires_grad_()
    y = model(xr)
    y.sum().backward()
    return xr.grad


def test_every_call_gives_the_caller_its_train_eval_modes_back(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    modes = [m.training for m in model.modules()]
    x = (torch.randn(4, 4),)
    res = sugarize.export_onnx(model, tmp_path / "m.onnx", x)
    assert [m.training for m in model.modules()] == modes
    sm = sugarize.sugarize(model)
    sugarize.verify(res.path, model, x, stripped=sugarize.strip(sm), batches=1)
    assert [m.training for m in model.modules()] == modes
    sugarize.sugarize(model, example_args=x, copy=False)
    sugarize.audit(model, [x])
    assert [m.training for m in model.modules()] == modes


def test_the_fx_passes_are_public_torch_fx_passes():
    from torch.fx.passes.infra.pass_base import PassBase, PassResult

    model = _mlp()
    gm = torch.fx.symbolic_trace(model)
    sp = sugarize.SugarizePass(SugarConfig("nelu"))
    assert isinstance(sp, PassBase)
    result = sp(gm)
    assert isinstance(result, PassResult) and result.modified and result.graph_module is gm
    assert sugarize.report_of(gm) is sp.report and [s.surrogate for s in sp.report.converted] == ["nelu"]
    x = torch.randn(3, 4)
    assert same_bits(gm(x), model(x)) and sugarize.count_sugar(gm) == 1
    again = sugarize.SugarizePass(SugarConfig("nelu"))(gm)
    assert not again.modified  # nothing left to convert
    strip = sugarize.StripPass()
    out = strip(gm)
    assert out.modified and sugarize.count_sugar(gm) == 0 and same_bits(gm(x), model(x))
    with pytest.raises(sugarize.SugarizeError, match="works on a torch.fx.GraphModule"):
        sugarize.SugarizePass()(model)


def test_report_of_answers_for_converted_models_only():
    assert sugarize.report_of(sugarize.sugarize(_mlp())).capture == "fx"
    with pytest.raises(sugarize.SugarizeError, match="was not produced by sugarize.sugarize"):
        sugarize.report_of(_mlp())


def test_one_list_of_public_names_drives_the_lazy_imports():
    """Every name in __all__ resolves, and each comes from the module the type checkers are told."""
    import importlib

    for name, module in sugarize._EXPORTS.items():
        assert getattr(sugarize, name) is getattr(importlib.import_module(module), name), name
    assert {"report_of", "SugarizePass", "StripPass", "ParityError", "save_error"} <= set(sugarize.__all__)

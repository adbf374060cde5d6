"""Relufication: GELU and SiLU sites (every spelling, Hugging Face's included) -> ReLU + SUGAR."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sugarize

from helpers import load_fixture, same_bits

pytest.importorskip("transformers")  # the fixture uses transformers' own activation classes
FIX = load_fixture("gelu_silu_spellings")


def _sites(report):
    return [(s.spelling, s.kind, s.status) for s in report.sites]


def test_every_spelling_is_found_and_left_alone_without_relufy():
    model = FIX.build_model()
    sm = sugarize.sugarize(model)
    assert sugarize.count_sugar(sm) == 0
    report = sm.meta["sugarize"]["report"]
    assert [s.spelling for s in report.sites] == FIX.SPELLINGS
    assert [s.kind for s in report.sites] == FIX.KINDS
    assert all(s.status == "skipped" and "--relufy" in s.reason for s in report.sites)
    x = FIX.example_inputs()[0]
    assert same_bits(sm(x), model(x))


@pytest.mark.parametrize("capture", ["fx", "modules"])
def test_a_class_named_like_a_hugging_face_activation_is_left_alone(capture):
    """Hugging Face activation classes are matched by identity: a user class named
    NewGELUActivation that computes tanh(x) * 3 is no GELU, on either capture path."""
    model = FIX.build_model()
    assert type(model.impostor).__name__ == "NewGELUActivation"
    sm = sugarize.sugarize(model, relufy=("gelu", "silu"), capture=capture, example_args=FIX.example_inputs())
    assert "impostor" not in {s.path for s in sugarize.report_of(sm).sites}
    assert len(sugarize.report_of(sm).converted) == len(FIX.SPELLINGS)
    relu_model = FIX.build_model(relu=True)  # every real activation ReLU, the impostor as it is
    relu_model.load_state_dict(model.state_dict())
    x = torch.randn(8, 16) * 3
    assert same_bits(sm(x), relu_model(x))
    if capture == "modules":
        assert type(sm.impostor) is type(model.impostor)


@pytest.mark.parametrize(("relufy", "expected"), [
    (("gelu",), {"gelu", "gelu_tanh"}), (("silu",), {"silu"}), (("gelu", "silu"), {"gelu", "gelu_tanh", "silu"}),
])
def test_relufy_converts_exactly_the_asked_kinds(relufy, expected):
    sm = sugarize.sugarize(FIX.build_model(), relufy=relufy)
    report = sm.meta["sugarize"]["report"]
    for site in report.sites:
        converted = site.status == "converted"
        assert converted == (site.kind in expected), site
        if converted:
            assert site.forward_changed and site.surrogate == site.kind  # its own derivative
    assert sugarize.count_sugar(sm) == sum(k in expected for k in FIX.KINDS)


def test_relufied_forward_is_relu_bit_for_bit_and_strip_keeps_it():
    model, relu_model = FIX.build_model(), FIX.build_model(relu=True)
    relu_model.load_state_dict(model.state_dict())
    sm = sugarize.sugarize(model, relufy=("gelu", "silu"))
    x = torch.randn(64, 16) * 3
    assert same_bits(sm(x), relu_model(x))
    assert same_bits(sugarize.strip(sm)(x), relu_model(x))
    assert not same_bits(model(x), relu_model(x))  # the forward did change


@pytest.mark.parametrize(("act", "kind"), [
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
    (FIX.NewGELUActivation(), "gelu_tanh"), (FIX.GELUActivation(), "gelu"), (FIX.SiLUActivation(), "silu"),
])
@pytest.mark.parametrize("chosen", [None, "bsilu"])
def test_relufied_gradient_is_the_chosen_surrogates_derivative(act, kind, chosen):
    x = (torch.randn(300, dtype=torch.float64) * 3).requires_grad_()
    cfg = sugarize.SugarConfig(relufy=("gelu", "silu"), relufy_surrogate=chosen)
    sm = sugarize.sugarize(nn.Sequential(act), config=cfg)
    upstream = torch.randn(300, dtype=torch.float64)
    y = sm(x)
    assert same_bits(y, torch.relu(x))
    y.backward(upstream)
    surrogate = chosen or kind
    expected = upstream * sugarize.surrogate_grad(x.detach(), surrogate)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-14)


def test_stripped_relufied_model_exports_a_pure_relu_graph(tmp_path):
    from sugarize.deploy.export import export_onnx, onnx_op_types

    model = FIX.build_model()
    args = FIX.example_inputs()
    sm = sugarize.sugarize(model, relufy=("gelu", "silu"))
    res = export_onnx(sm, tmp_path / "relufied.onnx", args)
    ops = onnx_op_types(res.path)
    assert ops.count("Relu") == len(FIX.SPELLINGS)
    assert not {"Gelu", "Erf", "Sigmoid", "Pow"} & set(ops), ops
    assert ops.count("Tanh") == 1  # the impostor's tanh(x) * 3, left alone
    relu_model = FIX.build_model(relu=True)
    relu_model.load_state_dict(model.state_dict())
    report = sugarize.verify(res.path, relu_model, args, stripped=sugarize.strip(sm))
    assert report.passed, report.summary()


def test_cli_convert_relufy_says_fine_tuning_is_needed(tmp_path):
    from typer.testing import CliRunner

    from helpers import MODELS
    from sugarize.app.cli import app

    out = tmp_path / "m.safetensors"
    res = CliRunner().invoke(app, ["convert", str(MODELS / "gelu_silu_spellings.py"), "-o", str(out),
                                   "--relufy", "gelu,silu"])
    assert res.exit_code == 0, res.output
    assert "fine-tune before use" in " ".join(res.output.split())
    assert out.exists()
    res = CliRunner().invoke(app, ["convert", str(MODELS / "gelu_silu_spellings.py"), "-o", str(out), "--force",
                                   "--relufy", "gelu", "--relufy-surrogate", "bsilu", "--json"])
    assert res.exit_code == 0, res.output
    import json

    sites = json.loads(res.stdout)["report"]["sites"]
    assert {s["surrogate"] for s in sites if s["status"] == "converted"} == {"bsilu"}

"""Audit counts against hand computation; resurrection under SUGAR; deterministic fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import sugarize
from sugarize.app.cli import app
from sugarize.training.train import DataSpec, finetune

from helpers import FIXTURES, MODELS

runner = CliRunner()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc(x)).sum(1, keepdim=True)


def test_audit_matches_hand_computed_counts():
    x = torch.tensor([[1.0, -1.0], [2.0, -3.0], [-1.0, -1.0], [0.5, 2.0]])
    # pre-activations: unit0 = x0 (fires on 3 inputs), unit1 = x1 (fires on 1), unit2 = -x0-x1-10 (never)
    for model in (Tiny(), sugarize.sugarize(Tiny()), sugarize.strip(sugarize.sugarize(Tiny()))):
        report = sugarize.audit(model, [(x[:2], None), (x[2:], None)])
        (site,) = report.sites
        assert site.fire_counts == [3, 1, 0]
        assert (site.units, site.dead, report.samples) == (3, 1, 4)
        assert site.zeros == 12 - 4 and site.elements == 12
        assert report.dead_fraction == pytest.approx(1 / 3) and report.sparsity == pytest.approx(8 / 12)


def test_conv_units_are_channels():
    conv = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU())
    with torch.no_grad():
        conv[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    x = torch.ones(3, 1, 4, 4)
    x[0, 0, 0, 0] = -1.0  # channel 1 fires on sample 0 only (one pixel)
    (site,) = sugarize.audit(conv, [x]).sites
    assert site.fire_counts == [3, 1] and site.dead == 0


def _just_dead():
    m = Tiny()
    with torch.no_grad():  # unit 2: pre-activation in [-1.x, -1] on x >= 0, never positive
        m.fc.weight[2] = torch.tensor([-0.05, -0.05])
        m.fc.bias[2] = -1.0
    return m


def test_a_dead_unit_comes_back_under_sugar_but_not_relu():
    # B-SiLU's s' is ~0.4 at -1 (a unit just below zero comes back), but tends to 0 and is
    # slightly negative below -2.7: no surrogate revives a unit at -10.
    torch.manual_seed(0)
    x = torch.randn(64, 2).abs()
    target = torch.ones(64, 1) * 5

    def train(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(50):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
        return sugarize.audit(model, [x]).sites[0].fire_counts

    assert sugarize.audit(_just_dead(), [x]).sites[0].fire_counts[2] == 0
    relu_counts = train(_just_dead())
    sugar_counts = train(sugarize.sugarize(_just_dead(), "bsilu"))
    assert relu_counts[2] == 0  # ReLU: no gradient, the unit stays dead
    assert sugar_counts[2] > 0  # SUGAR: the surrogate gradient pulls it back to life


def _data():
    torch.manual_seed(123)
    x, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    return DataSpec(lambda: [(x[i], y[i]) for i in torch.randperm(96).split(32)], lambda: [(x, y)],
                    nn.functional.cross_entropy)


def test_finetune_with_a_fixed_seed_gives_the_same_weights_twice_and_resumes_exactly():
    def build():
        torch.manual_seed(1)
        return sugarize.sugarize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))

    a, b, c = build(), build(), build()
    data = _data()
    ha = finetune(a, data, epochs=3, lr=0.1, seed=7)
    finetune(b, data, epochs=3, lr=0.1, seed=7)
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    assert ha[-1].val_accuracy is not None and ha[-1].dead_fraction is not None
    finetune(c, data, epochs=3, lr=0.1, seed=8)
    assert not torch.equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])


def test_finetune_and_audit_cli(tmp_path):
    ck = tmp_path / "ck.safetensors"
    data = FIXTURES / "digits_data.py"
    digits_model = tmp_path / "mlp.py"
    digits_model.write_text(
        "import torch\nfrom sugarize.app.demo import DeepMLP\n"
        "def build_model():\n    torch.manual_seed(0)\n    return DeepMLP(depth=3, width=16)\n"
        "def example_inputs():\n    return (torch.randn(4, 64),)\n")
    assert runner.invoke(app, ["convert", str(digits_model), "-o", str(ck)]).exit_code == 0
    outs = []
    for name in ("w1", "w2"):
        w = tmp_path / f"{name}.safetensors"
        res = runner.invoke(app, ["finetune", str(ck), "--model", str(digits_model), "--data", str(data),
                                  "--epochs", "2", "--lr", "0.01", "--seed", "3", "-o", str(w), "--json"])
        assert res.exit_code == 0, res.output
        hist = json.loads(res.stdout)["history"]
        assert len(hist) == 2 and hist[-1]["val_accuracy"] > 0.3
        outs.append(sugarize.load_weights(w))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    # resume: 1 + 1 epochs == 2 epochs
    w1 = tmp_path / "r1.safetensors"
    w2 = tmp_path / "r2.safetensors"
    res = runner.invoke(app, ["finetune", str(ck), "--model", str(digits_model), "--data", str(data), "--epochs", "1",
                              "--lr", "0.01", "--seed", "3", "-o", str(w1)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["finetune", str(ck), "--model", str(digits_model), "--data", str(data), "--epochs", "1",
                              "--lr", "0.01", "--seed", "3", "--resume", str(w1), "-o", str(w2)])
    assert res.exit_code == 0, res.output
    resumed = sugarize.load_weights(w2)
    assert resumed.keys() == outs[0].keys()
    assert all(torch.equal(resumed[k], outs[0][k]) for k in resumed)  # momentum state travels too

    res = runner.invoke(app, ["audit", str(ck), "--trust-recipe", "--data", str(data),
                              "--weights", str(tmp_path / "w1.safetensors"), "--json", "--plot", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["samples"] == 1348 and len(rep["sites"]) == 3 and rep["units"] == 48
    assert (tmp_path / "a.png").exists()


def test_bad_data_files_are_answered(tmp_path):
    ck = tmp_path / "ck.safetensors"
    assert runner.invoke(app, ["convert", str(MODELS / "all_spellings.py"), "-o", str(ck)]).exit_code == 0
    nodata = tmp_path / "nodata.py"
    nodata.write_text("x = 1\n")
    yields = tmp_path / "yields.py"
    yields.write_text("import torch\ndef train_loader():\n    return [torch.ones(2, 16)]\n")
    raises = tmp_path / "raises.py"
    raises.write_text("def train_loader():\n    raise OSError('disk gone')\n")
    cases = [
        (tmp_path / "missing.py", "data file"),
        (nodata, "nodata.py has no train_loader() function"),
        (yields, "must yield (x, y) batches"),
        (raises, "raises.py:train_loader() raised OSError: disk gone"),
    ]
    for data, fragment in cases:
        out = tmp_path / "w.safetensors"
        res = runner.invoke(app, ["finetune", str(ck), "--model", str(MODELS / "all_spellings.py"), "--data", str(data),
                                  "-o", str(out)])
        assert res.exit_code == 2, res.output
        assert fragment in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_demo_runs_small_and_exports(tmp_path):
    from sugarize.app.demo import VARIANTS, DemoConfig, run_demo

    result = run_demo(DemoConfig(seeds=(0,), pretrain_epochs=1, epochs=1, depth=3, width=16, dead_epochs=3),
                      out_dir=tmp_path)
    assert [r["variant"] for r in result.rows()] == ["ReLU", "SUGAR (default)", "SUGAR B-SiLU", "SUGAR NeLU",
                                                     "LeakyReLU", "GELU"]
    ex = result.export
    assert ex["op_types"] == ex["relu_op_types"] and ex["op_types"].count("Relu") == 3
    assert ex["parity"].passed
    # dead units are recorded before the fine-tune and after every epoch: the start is the
    # measured starting point, the end the run's final figure
    for run in result.dead_runs:
        assert len(run.dead_curve) == 3 + 1
        assert run.dead_curve[0] == result.dead_start[0][1] and run.dead_curve[-1] == run.dead
    assert all(len(run.dead_curve) == 1 + 1 for run in result.runs)
    curves = result.dead_curves(dead_case=True)
    assert set(curves) == set(VARIANTS) and all(len(c) == 4 and c[0] == result.dead_start[0][1]
                                                for c in curves.values())
    from sugarize.app.plots import plot_demo

    assert plot_demo(result, tmp_path / "demo.png").stat().st_size > 0


def test_demo_paired_compares_seed_by_seed():
    from sugarize.app.demo import DemoConfig, DemoResult, Run

    runs = [Run("ReLU", 0, 0.90, 0.20, None), Run("SUGAR B-SiLU", 0, 0.93, 0.10, None),
            Run("ReLU", 1, 0.95, 0.05, None), Run("SUGAR B-SiLU", 1, 0.94, 0.06, None),
            Run("ReLU", 2, 0.95, 0.05, None), Run("SUGAR B-SiLU", 2, float("nan"), float("nan"), None)]
    p = DemoResult(DemoConfig(seeds=(0, 1, 2)), [], runs, {}).paired("SUGAR B-SiLU")
    assert p["seeds"] == 2  # the diverged seed is not paired
    assert p["accuracy"] == pytest.approx((0.03 - 0.01) / 2) and p["dead"] == pytest.approx((-0.10 + 0.01) / 2)
    assert p["accuracy_not_worse"] == 1 and p["fewer_dead"] == 1


def test_a_bad_learning_rate_and_a_divergence_are_different_errors():
    from sugarize.errors import DivergenceError, ParameterError

    model = sugarize.sugarize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    with pytest.raises(ParameterError, match="learning rate -1.0 must be a positive number"):
        finetune(model, _data(), lr=-1.0)
    with pytest.raises(ParameterError, match="optimizer 'lbfgs'"):
        finetune(model, _data(), optimizer="lbfgs")
    with pytest.raises(DivergenceError, match="lower --lr") as info:
        finetune(model, _data(), lr=1e30, epochs=3)
    assert info.value.exit_code == 1 and not isinstance(info.value, ParameterError)

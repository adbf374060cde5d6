"""Fine-tuning notices a collapse (#40 item 3): it stops, keeps the best weights, names the cause and
the fix; the library raises CollapseError, the CLI exits 1 with the best weights written."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import sugarize
from sugarize.app.cli import app
from sugarize.training.digits import load_digits_split, loader
from sugarize.training.train import DataSpec, evaluate, finetune

MODEL_FILE = '''
import torch, torch.nn as nn
from sugarize.training.digits import load_digits_split, loader


def build_model():
    torch.manual_seed(0)
    layers, w = [], 64
    for _ in range(4):
        layers += [nn.Linear(w, 64), nn.ReLU()]
        w = 64
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    (xt, yt), _ = load_digits_split()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(8):
        for x, y in loader(xt, yt, 64, shuffle=True, seed=epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model
'''


def _trained(tmp_path):
    path = tmp_path / "trained.py"
    path.write_text(MODEL_FILE)
    namespace: dict = {}
    exec(compile(MODEL_FILE, str(path), "exec"), namespace)
    return namespace["build_model"](), path


def _data():
    (xt, yt), (xv, yv) = load_digits_split()
    val = loader(xv, yv, 512)
    return DataSpec(lambda: loader(xt, yt, 64, shuffle=True), lambda: val, nn.functional.cross_entropy), val


def test_a_collapse_stops_fine_tuning_keeps_the_start_and_names_cause_and_fix(tmp_path):
    model, _ = _trained(tmp_path)
    data, val = _data()
    sm = sugarize.sugarize(model, surrogate="bsilu")
    start = {k: v.clone() for k, v in sm.state_dict().items()}
    start_acc = evaluate(sm, val)[1]
    assert start_acc > 0.9
    with pytest.raises(sugarize.CollapseError) as err:
        finetune(sm, data, epochs=3, lr=0.5, audit_dead=False)
    msg = str(err.value)
    assert "fell from" in msg and "bsilu" in msg and "lower the learning rate" in msg and err.value.exit_code == 1
    assert err.value.best_epoch == 0 and len(err.value.history) >= 1
    assert all(torch.equal(v, start[k]) for k, v in sm.state_dict().items())  # the best weights: the start's
    assert evaluate(sm, val)[1] == start_acc
    # negative control: told to train on, it ends collapsed, far below the start
    sm2 = sugarize.sugarize(model, surrogate="bsilu")
    history = finetune(sm2, data, epochs=3, lr=0.5, audit_dead=False, stop_on_collapse=False)
    assert 100 * (start_acc - history[-1].val_accuracy) >= sugarize_points()


def sugarize_points():
    from sugarize.training.train import COLLAPSE_POINTS

    return COLLAPSE_POINTS


def test_healthy_fine_tuning_is_not_stopped(tmp_path):
    model, _ = _trained(tmp_path)
    data, _ = _data()
    history = finetune(sugarize.sugarize(model), data, epochs=2, lr=1e-3, audit_dead=False)
    assert len(history) == 2


def test_the_cli_exits_1_and_writes_the_best_weights(tmp_path):
    _, path = _trained(tmp_path)
    runner = CliRunner()
    ck = tmp_path / "m.sugar.safetensors"
    res = runner.invoke(app, ["convert", str(path), "-o", str(ck)])
    assert res.exit_code == 0, res.output
    data_file = tmp_path / "digits_data.py"
    data_file.write_text("from sugarize.training.digits import load_digits_split, loader\n"
                         "(xt, yt), (xv, yv) = load_digits_split()\n"
                         "def train_loader():\n    return loader(xt, yt, 64, shuffle=True)\n"
                         "def val_loader():\n    return loader(xv, yv, 512)\n")
    out = tmp_path / "w.safetensors"
    res = runner.invoke(app, ["finetune", str(ck), "--model", str(path), "--data", str(data_file), "--epochs", "3", "--lr", "0.5",
                              "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "fell from" in res.output and "lower the learning rate" in res.output and "Traceback" not in res.output
    assert out.exists()
    written, start = sugarize.load_weights(out), sugarize.load_weights(ck)
    assert all(torch.equal(written[k], start[k]) for k in written if k in start)

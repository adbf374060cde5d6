"""Checkpoints and model files: a checkpoint never picks the code that runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import sugarize
from sugarize.app.cli import app
from sugarize.files.modelfile import file_sha256

from helpers import FIXTURES, MODELS

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


EVIL = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n" + (MODELS / "all_spellings.py").read_text()


@pytest.fixture()
def converted(tmp_path):
    """A model file of the user's, converted: (model file, checkpoint)."""
    model = tmp_path / "user" / "model.py"
    model.parent.mkdir()
    shutil.copy(MODELS / "all_spellings.py", model)
    ck = tmp_path / "user" / "model.sugar.safetensors"
    res = run("convert", model, "-o", ck)
    assert res.exit_code == 0, res.output
    return model, ck


def craft(ck: Path, out: Path, **model_fields) -> Path:
    """A copy of ``ck`` whose recipe's model fields are replaced."""
    from safetensors import safe_open

    with safe_open(str(ck), framework="pt") as f:
        meta = dict(f.metadata())
    recipe = json.loads(meta["sugarize"])
    recipe["model"].update(model_fields)
    meta["sugarize"] = json.dumps(recipe)
    save_file(load_file(str(ck)), str(out), metadata=meta)
    return out


OPENERS = [
    lambda ck, tmp: ["inspect", ck, "--json"],
    lambda ck, tmp: ["export", ck, "-o", tmp / "x.onnx"],
    lambda ck, tmp: ["verify", tmp / "x.onnx", "--against", ck],
    lambda ck, tmp: ["finetune", ck, "--data", FIXTURES / "digits_data.py", "-o", tmp / "w.safetensors"],
    lambda ck, tmp: ["audit", ck, "--data", FIXTURES / "digits_data.py"],
]


@pytest.mark.parametrize("where", ["absolute", "relative", "beside"])
def test_a_crafted_recipe_naming_another_file_runs_nothing(converted, tmp_path, where):
    """The recipe names an attacker's file, by absolute path, by ../ path, or beside the
    checkpoint under the original name: no command runs it without --model, and
    --trust-recipe refuses it too (its sha256 is not the recorded one)."""
    model, ck = converted
    marker = tmp_path / "pwned"
    evil_dir = tmp_path / ("evil" if where != "beside" else "user2")
    evil_dir.mkdir()
    evil = evil_dir / "model.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    bad = evil_dir / "sent.safetensors"
    fields = {"absolute": {"path": str(evil), "relpath": "/nonexistent/model.py"},
              "relative": {"path": "/nonexistent/model.py", "relpath": "../evil/model.py"},
              "beside": {"path": "/nonexistent/model.py", "relpath": "model.py"}}[where]
    if where == "relative":
        bad = tmp_path / "user" / "sent.safetensors"
    craft(ck, bad, **fields)
    for opener in OPENERS:
        args = opener(bad, tmp_path)
        res = run(*args)
        if args[0] == "inspect":  # the recorded report, read from the recipe: no code runs
            assert res.exit_code == 0 and "no code was run" in res.stdout, res.output
        else:
            assert res.exit_code == 2, (args, res.output)
            assert "runs only code you name" in res.stderr or "not found" in res.stderr, res.stderr
        assert not marker.exists(), args
    res = run("export", bad, "--trust-recipe", "-o", tmp_path / "y.onnx")
    assert res.exit_code == 2 and "sha256" in res.stderr and "nothing was run" in res.stderr, res.output
    assert not marker.exists() and not (tmp_path / "y.onnx").exists()


def test_a_changed_model_file_is_refused_before_import(converted, tmp_path):
    """ReLU replaced by tanh after convert (and a side effect added): refused with the fix,
    before the file is imported; the untouched file still opens."""
    model, ck = converted
    assert run("export", ck, "--model", model, "-o", tmp_path / "ok.onnx").exit_code == 0
    marker = tmp_path / "ran"
    model.write_text(EVIL.format(marker=str(marker)).replace("nn.ReLU()", "nn.Tanh()"))
    for extra in (["--model", model], ["--trust-recipe"]):
        res = run("export", ck, *extra, "-o", tmp_path / "changed.onnx")
        assert res.exit_code == 2, res.output
        assert "changed since `sugarize convert`" in res.stderr and "convert it again" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert not marker.exists() and not (tmp_path / "changed.onnx").exists()
    with pytest.raises(sugarize.SugarizeError, match="sha256"):
        sugarize.load_checkpoint(ck, model=str(model))
    assert not marker.exists()


def test_python_api_runs_only_named_or_trusted_code(converted):
    model, ck = converted
    with pytest.raises(sugarize.SugarizeError, match="runs only code you name"):
        sugarize.load_checkpoint(ck)
    assert sugarize.count_sugar(sugarize.load_checkpoint(ck, model=str(model))) > 0
    assert sugarize.count_sugar(sugarize.load_checkpoint(ck, trust_recipe=True)) > 0


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda r: r["model"].pop("sha256"), "model.sha256 is missing"),
    (lambda r: r["model"].update(sha256="zz" * 32), "model.sha256 must be 64 lowercase hex digits"),
    (lambda r: r["model"].update(name="os.system('x')"), "model.name must be a Python identifier"),
    (lambda r: r["model"].update(path=3), "model.path must be a str"),
    (lambda r: r.update(inputs=[{"shape": [2, -1], "dtype": "float32"}]), "inputs[0].shape"),
    (lambda r: r.update(inputs="2,3"), "inputs must be a list or null"),
    (lambda r: r.pop("config"), "config is missing"),
    (lambda r: r["config"].update(surrogate="nope"), "config is not a valid conversion config"),
    (lambda r: r["config"].update(unknown=1), "config is not a valid conversion config"),
    (lambda r: r["report"].update(sites=3), "report.sites must be a list"),
    (lambda r: r.update(format="sugarize-checkpoint/99"), "this sugarize reads sugarize-checkpoint/1"),
])
def test_a_malformed_recipe_is_exit_2_naming_the_field(converted, tmp_path, change, fragment):
    from safetensors import safe_open

    model, ck = converted
    with safe_open(str(ck), framework="pt") as f:
        meta = dict(f.metadata())
    recipe = json.loads(meta["sugarize"])
    change(recipe)
    meta["sugarize"] = json.dumps(recipe)
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(ck)), str(bad), metadata=meta)
    for args in (["inspect", bad], ["export", bad, "--model", model, "-o", tmp_path / "b.onnx"]):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert fragment in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.output
    assert not (tmp_path / "b.onnx").exists()


def test_model_files_cannot_shadow_the_tools_dependencies(tmp_path):
    """An onnx.py beside the model is not onnx; a model file named inspect.py is not inspect."""
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "onnx.py").write_text("raise RuntimeError('the fake onnx was imported')\n")
    (folder / "layers.py").write_text("import torch.nn as nn\nclass Block(nn.Sequential):\n    pass\n")
    model = folder / "inspect.py"
    model.write_text("import torch, torch.nn as nn\nfrom layers import Block\n"
                     "model = Block(nn.Linear(4, 4), nn.ReLU())\n"
                     "def example_inputs():\n    return (torch.randn(2, 4),)\n")
    ck = tmp_path / "m.safetensors"
    # a fresh interpreter for each command, where onnx is not imported yet when the model file is
    for args in (["convert", model, "-o", ck], ["export", ck, "--model", model, "-o", tmp_path / "m.onnx"]):
        res = subprocess.run([sys.executable, "-m", "sugarize.app.cli", *map(str, args)], capture_output=True,
                             text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
    res = run("inspect", model)  # and in this process, whose stdlib inspect stays the stdlib's
    assert res.exit_code == 0, res.output
    import inspect

    assert hasattr(inspect, "signature")  # the standard library's, still


def test_the_recipe_inspect_runs_no_code_and_shows_the_recorded_sites(converted):
    model, ck = converted
    res = run("inspect", ck, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["totals"]["sites"] == 8 and "no code was run" in " ".join(data["notes"])
    assert file_sha256(model) == sugarize.files.checkpoint.read_recipe(ck)["model"]["sha256"]

"""The CLI end to end: the fine-tune-then-export pipeline, and every bad input answered in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sugarize
from sugarize.app.cli import app

from helpers import MODELS, load_fixture

runner = CliRunner()
RESNET = str(MODELS / "tiny_resnet.py")
SPELL = str(MODELS / "all_spellings.py")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "resnet.sugar.safetensors"
    res = run("convert", RESNET, "-o", path, "--surrogate", "nelu", "--param", "alpha=0.05")
    assert res.exit_code == 0, res.output
    return path


def test_finetune_then_export_pipeline(checkpoint, tmp_path):
    # convert (fixture) -> load in Python -> a few SGD steps -> save weights
    sm = sugarize.load_checkpoint(checkpoint, model=RESNET)
    assert sugarize.count_sugar(sm) == 13
    assert sm.meta["sugarize"]["config"]["params"] == {"alpha": 0.05}
    sm.train()
    opt = torch.optim.SGD(sm.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(sm(x), y).backward()
        opt.step()
    assert not torch.equal(before["conv1.weight"], sm.state_dict()["conv1.weight"])
    weights = sugarize.save_weights(sm, tmp_path / "ft.safetensors")

    # the weights load into the user's original class with no key or shape mismatch
    original = load_fixture("tiny_resnet").TinyResNet()
    missing, unexpected = original.load_state_dict(sugarize.load_weights(weights), strict=True)
    assert not missing and not unexpected

    onnx_path = tmp_path / "ft.onnx"
    res = run("export", checkpoint, "--model", RESNET, "--weights", weights, "-o", onnx_path, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["stripped_sites"] == 13 and data["op_types"].count("Relu") == 13
    assert data["parity"]["passed"] and data["parity"]["max_abs"] < 1e-5
    assert data["parity"]["graph"]["op_types_equal"] and data["parity"]["graph"]["standard_domain_only"]
    assert {o["reference"] for o in data["parity"]["outputs"]} == {"original", "stripped"}

    res = run("verify", onnx_path, "--against", checkpoint, "--model", RESNET, "--weights", weights, "--batches", "2")
    assert res.exit_code == 0, res.output
    assert "parity PASS" in res.stdout

    # without the fine-tuned weights the ONNX file (fine-tuned) no longer matches: exit 1
    res = run("verify", onnx_path, "--against", RESNET)
    assert res.exit_code == 1 and "parity FAIL" in res.stdout


def test_inspect_json_and_table():
    res = run("inspect", SPELL, "--json")
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["totals"] == {"sites": 8, "convertible": 8}
    res = run("inspect", SPELL, "--exclude", "act*")
    assert "8 activation sites: 6 convertible, 2 skipped" in res.stdout


def test_surrogates_lists_registry_and_plots(tmp_path):
    res = run("surrogates", "--json")
    names = [e["name"] for e in json.loads(res.stdout)]
    assert names == sugarize.list_surrogates()
    png = tmp_path / "s.png"
    res = run("surrogates", "--plot", png)
    assert res.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_version_and_help():
    assert run("--version").stdout.strip() == f"sugarize {sugarize.__version__}"
    for cmd in ("inspect", "convert", "export", "verify", "surrogates"):
        assert run(cmd, "--help").exit_code == 0


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = "import torch.nn as nn\nmodel = nn.Sequential(nn.Linear(4, 4), nn.ReLU())\n"


def _cases(tmp_path: Path, checkpoint: Path):
    """(args, expected message fragment, output path that must not appear or change)."""
    out = tmp_path / "out.safetensors"
    onnx_out = tmp_path / "out.onnx"
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(checkpoint.read_bytes()[: 5000])
    garbage = write(tmp_path, "garbage.safetensors", "this is not a checkpoint")
    badonnx = tmp_path / "bad.onnx"
    badonnx.write_bytes(b"\x08\x07garbage")
    other = write(tmp_path, "other.py", "import torch.nn as nn\nmodel = nn.Sequential(nn.Linear(3, 3), nn.ReLU())\n")
    other_w = tmp_path / "other.safetensors"
    sugarize.save_weights(sugarize.load_model(other).model, other_w)
    return [
        (["convert", tmp_path / "missing.py", "-o", out], "model file", out),
        (["convert", write(tmp_path, "syntax.py", "def f(:\n"), "-o", out], "syntax error in syntax.py line 1", out),
        (["convert", write(tmp_path, "imp.py", "import not_a_real_package_xyz\n"), "-o", out],
         "importing imp.py failed: ModuleNotFoundError", out),
        (["convert", write(tmp_path, "empty.py", "x = 1\n"), "-o", out], "no model found in empty.py", out),
        (["convert", write(tmp_path, "raises.py", "def build_model():\n    raise ValueError('boom')\n"), "-o", out],
         "raises.py:build_model() raised ValueError: boom", out),
        (["convert", f"{write(tmp_path, 'notmod.py', 'model = 3')}:model", "-o", out],
         "notmod.py:model is a int, not a torch.nn.Module", out),
        (["convert", f"{write(tmp_path, 'named.py', GOOD)}:nope", "-o", out], "named.py has no 'nope'", out),
        (["convert", write(tmp_path, "shape.py", GOOD), "-o", out, "--input-shape", "2,5"],
         "the model rejected inputs (2, 5)", out),
        (["convert", write(tmp_path, "shape2.py", GOOD), "-o", out, "--input-shape", "2,x"], "is not a shape", out),
        (["convert", write(tmp_path, "sur.py", GOOD), "-o", out, "--surrogate", "bsiluu"],
         "unknown surrogate 'bsiluu'; known surrogates: bsilu", out),
        (["convert", write(tmp_path, "par.py", GOOD), "-o", out, "--param", "alpha=-1"],
         "parameter alpha=-1.0 must be > 0.0", out),
        (["convert", write(tmp_path, "par2.py", GOOD), "-o", out, "--param", "alpha"], "write it as NAME=VALUE", out),
        (["convert", write(tmp_path, "wr.py", GOOD), "-o", tmp_path / "no" / "dir" / "x.safetensors"],
         "folder", tmp_path / "no"),
        (["export", trunc, "-o", onnx_out], "cannot read checkpoint", onnx_out),
        (["export", garbage, "-o", onnx_out], "cannot read checkpoint", onnx_out),
        (["export", checkpoint, "--model", RESNET, "--weights", other_w, "-o", onnx_out], "does not fit this model",
         onnx_out),
        (["export", RESNET, "--weights", tmp_path / "nothere.pt", "-o", onnx_out], "weights file", onnx_out),
        (["verify", badonnx, "--against", RESNET], "is not a valid ONNX model", None),
        (["verify", tmp_path / "absent.onnx", "--against", RESNET], "not found", None),
    ]


def test_every_bad_input_is_one_clear_line(checkpoint, tmp_path):
    for args, fragment, output in _cases(tmp_path, checkpoint):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert fragment in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.output + res.stderr
        if output is not None:
            assert not output.exists(), args
        assert not list(tmp_path.glob(".*.tmp")), args


def test_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "ck.safetensors"
    out.write_bytes(b"precious")
    res = run("convert", SPELL, "-o", out)
    assert res.exit_code == 2 and "already exists; pass --force" in res.stderr
    assert out.read_bytes() == b"precious"
    assert run("convert", SPELL, "-o", out, "--force").exit_code == 0
    assert sugarize.files.checkpoint.read_recipe(out)["report"]["totals"]["converted"] == 8


def test_unwritable_folder(tmp_path, monkeypatch):
    import sugarize.files.fsutil as fsutil

    monkeypatch.setattr(fsutil.os, "access", lambda path, mode: False)  # root ignores chmod
    res = run("convert", SPELL, "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "is not writable; choose another -o" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    """Before, --debug re-raised: an exit-2 mistake became exit 1 (which reads as a failed check)."""
    res = runner.invoke(app, ["--debug", "convert", str(tmp_path / "missing.py"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "Traceback (most recent call last)" in res.output and "ModelFileError" in res.output
    assert "not found" in res.output.strip().splitlines()[-1]


def test_checkpoint_recipe_records_model_and_hash(checkpoint):
    recipe = sugarize.files.checkpoint.read_recipe(checkpoint)
    assert recipe["model"]["name"] == "build_model" and len(recipe["model"]["sha256"]) == 64
    assert recipe["config"]["surrogate"] == "nelu" and recipe["inputs"] == [{"shape": [2, 3, 32, 32], "dtype": "float32"}]
    assert len(recipe["report"]["sites"]) == 13


def test_model_file_discovery(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text("import torch.nn as nn\ndef block():\n    return nn.Sequential(nn.Linear(2, 2), nn.ReLU())\n")
    (pkg / "net.py").write_text("from .layers import block\nnet = block()\n")
    loaded = sugarize.load_model(pkg / "net.py")
    assert loaded.name == "net"
    write(tmp_path, "two.py", GOOD + "other = nn.Linear(2, 2)\n")
    with pytest.raises(sugarize.SugarizeError, match="model"):
        sugarize.load_model(tmp_path / "two.py:missing")
    write(tmp_path, "several.py", "import torch.nn as nn\na = nn.ReLU()\nb = nn.ReLU()\n")
    with pytest.raises(sugarize.SugarizeError, match=r"several nn.Module instances \(a, b\)"):
        sugarize.load_model(tmp_path / "several.py")


def test_torch_weights_only_and_no_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, bad)
    with pytest.raises(sugarize.SugarizeError, match="cannot read .* as weights"):
        sugarize.load_weights(bad)
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(sugarize.load_weights(good)["w"], torch.ones(2))


def test_export_opset_13_writes_an_opset_13_file_and_reports_what_the_file_says(checkpoint, tmp_path):
    import onnx

    onnx_path = tmp_path / "m13.onnx"
    res = run("export", checkpoint, "--model", RESNET, "-o", onnx_path, "--opset", "13", "--json")
    assert res.exit_code == 0, res.output
    declared = {o.domain: o.version for o in onnx.load(str(onnx_path)).opset_import}
    assert declared[""] == 13 and json.loads(res.stdout)["opset"] == 13
    res = run("export", checkpoint, "--model", RESNET, "-o", tmp_path / "m12.onnx", "--opset", "12")
    assert res.exit_code == 2 and "lowest that works is 13" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m12.onnx").exists()
    res = run("verify", onnx_path, "--against", checkpoint, "--trust-recipe")
    assert res.exit_code == 0, res.output


def test_finetune_records_dead_units_per_epoch_and_plots_the_curve(checkpoint, tmp_path):
    data = tmp_path / "data.py"
    data.write_text("import torch\ndef train_loader():\n    g = torch.Generator().manual_seed(0)\n"
                    "    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]\n")
    plot = tmp_path / "curve.png"
    res = run("finetune", checkpoint, "--model", RESNET, "--data", data, "--epochs", "2", "-o", tmp_path / "w.safetensors",
              "--plot", plot, "--json")
    assert res.exit_code == 0, res.output
    history = json.loads(res.stdout)["history"]
    assert [h["epoch"] for h in history] == [1, 2] and all(0 <= h["dead_fraction"] <= 1 for h in history)
    assert plot.stat().st_size > 0
    res = run("finetune", checkpoint, "--model", RESNET, "--data", data, "-o", tmp_path / "w2.safetensors",
              "--plot", plot)
    assert res.exit_code == 2 and "--force" in res.output and not (tmp_path / "w2.safetensors").exists()


def test_convert_config_and_flags_follow_the_librarys_one_rule(tmp_path):
    """A flag equal to the config's value is fine (as a keyword is in sugarize(config=)); one that
    contradicts it is exit 2 naming both (#30: the CLI had its own, stricter rule)."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"surrogate": "nelu", "params": {"alpha": 0.1}}))
    res = run("convert", SPELL, "--config", cfg, "--surrogate", "nelu", "--param", "alpha=0.1", "-o",
              tmp_path / "a.safetensors", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["config"]["params"] == {"alpha": 0.1}
    res = run("convert", SPELL, "--config", cfg, "--surrogate", "elu", "-o", tmp_path / "b.safetensors")
    assert res.exit_code == 2 and "--surrogate elu contradicts config.surrogate='nelu'" in res.output
    assert "--config cfg.json" in res.output and not (tmp_path / "b.safetensors").exists()

"""A battery of careless or hostile inputs through every command that reads them: each is exit 2,
one line naming the problem and the fix, no traceback, and nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sugarize.app.cli import app

from helpers import FIXTURES

runner = CliRunner()

MLP = """import torch, torch.nn as nn
def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
def example_inputs():
    return (torch.randn(4, 64),)
"""
DATA = {
    "wrong_size": "import torch\ndef train_loader():\n    return [(torch.randn(8, 32), torch.randint(0, 10, (8,)))]\n",
    "labels_out_of_range": "import torch\ndef train_loader():\n    return [(torch.randn(8, 64), torch.full((8,), 99))]\n",
    "numpy": "import numpy as np\ndef train_loader():\n    return [(np.zeros((8, 64), 'float32'), np.zeros(8, 'int64'))]\n",
    "none": "def train_loader():\n    return [(None, None)]\n",
    "empty": "def train_loader():\n    return []\n",
    "float_labels": "import torch\ndef train_loader():\n    return [(torch.randn(8, 64), torch.randn(8))]\n",
    "rows_mismatch": "import torch\ndef train_loader():\n    return [(torch.randn(8, 64), torch.zeros(5, dtype=torch.long))]\n",
    "exits_while_iterated": ("import sys, torch\ndef train_loader():\n    yield (torch.randn(8, 64), torch.zeros(8, "
                             "dtype=torch.long))\n    sys.exit(1)\n"),
    "raises_while_iterated": ("import torch\ndef train_loader():\n    yield (torch.randn(8, 64), torch.zeros(8, "
                              "dtype=torch.long))\n    raise ValueError('shard 2 is corrupt')\n"),
}
FRAGMENT = {
    "wrong_size": "rejected a batch",
    "labels_out_of_range": "labels 99..99, but the model has 10 outputs",
    "numpy": "wrap it with torch.from_numpy",
    "none": "yielded x of type NoneType",
    "empty": "yielded no batches",
    "float_labels": "the loss rejected a batch",
    "rows_mismatch": "x with 8 rows and y with 5",
    "exits_while_iterated": "raised SystemExit while it was iterated",
    "raises_while_iterated": "raised ValueError while it was iterated: shard 2 is corrupt",
}
MODELS = {
    "meta": ("import torch, torch.nn as nn\ndef build_model():\n    with torch.device('meta'):\n"
             "        return nn.Sequential(nn.Linear(64, 16), nn.ReLU())\n"
             "def example_inputs():\n    return (torch.randn(2, 64),)\n", "on the meta device"),
    "bfloat16": ("import torch, torch.nn as nn\ndef build_model():\n"
                 "    return nn.Sequential(nn.Linear(64, 16), nn.ReLU()).to(torch.bfloat16)\n"
                 "def example_inputs():\n    return (torch.randn(4, 64, dtype=torch.bfloat16),)\n", "bfloat16"),
    "returns_none": ("import torch, torch.nn as nn\nclass M(nn.Module):\n    def __init__(self):\n"
                     "        super().__init__(); self.l = nn.Linear(64, 16)\n    def forward(self, x):\n"
                     "        torch.relu(self.l(x))\nmodel = M()\ndef example_inputs():\n    return (torch.randn(4, 64),)\n",
                     "forward returned NoneType"),
    "sys_exit": ("import sys\nsys.exit(0)\n", "called sys.exit(0) while it was imported"),
    "sys_exit_in_factory": ("import sys\ndef build_model():\n    sys.exit(1)\n", "build_model() called sys.exit(1)"),
}


def check(tmp_path, args, fragment, outputs):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, (args, res.output)
    assert fragment in res.stderr, (args, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output, res.stderr
    for out in outputs:
        assert not out.exists(), (args, out)
    assert not list(tmp_path.glob(".*.tmp")), args


@pytest.fixture()
def mlp(tmp_path):
    model = tmp_path / "mlp.py"
    model.write_text(MLP)
    ck = tmp_path / "mlp.sugar.safetensors"
    assert runner.invoke(app, ["convert", str(model), "-o", str(ck)]).exit_code == 0
    return model, ck


@pytest.mark.parametrize("case", sorted(DATA))
def test_bad_data_files_through_finetune_audit_and_int8_export(mlp, tmp_path, case):
    model, ck = mlp
    data = tmp_path / f"{case}.py"
    data.write_text(DATA[case])
    weights, onnx = tmp_path / "w.safetensors", tmp_path / "m.onnx"
    check(tmp_path, ["finetune", ck, "--model", model, "--data", data, "-o", weights], FRAGMENT[case], [weights])
    if case not in ("labels_out_of_range", "float_labels"):  # audit reads no labels
        check(tmp_path, ["audit", ck, "--model", model, "--data", data], FRAGMENT[case], [])
    if case in ("numpy", "none", "empty", "rows_mismatch", "exits_while_iterated", "raises_while_iterated"):
        # int8 calibration reads the same batches
        check(tmp_path, ["export", model, "--int8", "--data", data, "-o", onnx], FRAGMENT[case],
              [onnx, tmp_path / "m.int8.onnx"])


@pytest.mark.parametrize("case", sorted(MODELS))
def test_unusable_models_through_convert_and_export(tmp_path, case):
    source, fragment = MODELS[case]
    model = tmp_path / f"{case}.py"
    model.write_text(source)
    out, onnx = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    if case != "bfloat16":  # a bfloat16 model converts and fine-tunes; only its export cannot run
        check(tmp_path, ["convert", model, "-o", out], fragment, [out])
    check(tmp_path, ["export", model, "-o", onnx], fragment, [onnx])


def test_a_model_returning_a_dict_cannot_finetune_without_a_loss_fn(tmp_path):
    model = tmp_path / "dict_out.py"
    model.write_text("import torch, torch.nn as nn\nclass M(nn.Module):\n    def __init__(self):\n"
                     "        super().__init__(); self.l = nn.Linear(64, 10)\n    def forward(self, x):\n"
                     "        return {'logits': torch.relu(self.l(x))}\n"
                     "def build_model():\n    torch.manual_seed(0); return M()\n"
                     "def example_inputs():\n    return (torch.randn(4, 64),)\n")
    ck = tmp_path / "d.safetensors"
    assert runner.invoke(app, ["convert", str(model), "-o", str(ck)]).exit_code == 0
    out = tmp_path / "w.safetensors"
    check(tmp_path, ["finetune", ck, "--model", model, "--data", FIXTURES / "digits_data.py", "-o", out],
          "returns a dict, not a tensor of outputs: define loss_fn", [out])


def test_impossible_input_shapes(mlp, tmp_path):
    model, _ = mlp
    onnx = tmp_path / "m.onnx"
    check(tmp_path, ["export", model, "--input-shape", "100000,100000,100000", "-o", onnx],
          "limited to 2 GiB: give a smaller --input-shape", [onnx])
    check(tmp_path, ["convert", model, "--input-shape", "4,65", "-o", tmp_path / "c.safetensors"],
          "the model rejected inputs (4, 65)", [tmp_path / "c.safetensors"])


@pytest.mark.parametrize("folder", ["/proc", "/sys"])
def test_an_output_in_a_special_folder_is_exit_2_naming_the_folder(tmp_path, folder):
    """Before, -o /proc/x was exit 3 (a FileNotFoundError from the temporary file)."""
    model = tmp_path / "m.py"
    model.write_text(MLP)
    for args in (["export", str(model), "-o", f"{folder}/m.onnx"], ["convert", str(model), "-o", f"{folder}/m.safetensors"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        line = " ".join(res.output.split())
        assert f"folder {folder}" in line and "choose another -o" in line and "Traceback" not in res.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["--atol", "nan"], "nan is not a tolerance"), (["--atol", "-1"], "-1.0 is not a tolerance"),
    (["--rtol", "inf"], "inf is not a tolerance"), (["--seed", str(2**70)], "--seed"),
    (["--seed", "-3"], "--seed"),
])
def test_options_are_checked_when_parsed(mlp, tmp_path, args, fragment):
    """Before, --atol nan and -1 were accepted and reported as a parity failure (exit 1), and
    --seed 2**70 was exit 3."""
    model, ck = mlp
    onnx = tmp_path / "m.onnx"
    for command in (["export", model, "-o", onnx], ["verify", onnx, "--against", model]):
        if command[0] == "verify" and "--atol" not in args and "--rtol" not in args and "--seed" not in args:
            continue
        res = runner.invoke(app, [str(a) for a in command + args])
        assert res.exit_code == 2, (command, args, res.output)
        assert fragment in res.output and "Traceback" not in res.output
    assert not onnx.exists()


def test_an_unknown_split_is_refused(mlp, tmp_path):
    """Before, audit --split bogus audited the validation split and exited 0."""
    model, ck = mlp
    res = runner.invoke(app, ["audit", str(model), "--data", str(FIXTURES / "digits_data.py"), "--split", "bogus"])
    assert res.exit_code == 2 and "'bogus' is not one of train, val" in res.output


def test_plots_are_never_replaced_without_force_nor_written_in_an_unknown_format(mlp, tmp_path):
    model, _ = mlp
    data = str(FIXTURES / "digits_data.py")
    plot = tmp_path / "p.png"
    plot.write_bytes(b"someone's picture")
    for command in (["audit", str(model), "--data", data, "--plot", str(plot)], ["surrogates", "--plot", str(plot)]):
        res = runner.invoke(app, command)
        assert res.exit_code == 2 and "pass --force to replace it" in res.output, (command, res.output)
        assert plot.read_bytes() == b"someone's picture"
    res = runner.invoke(app, ["surrogates", "--plot", str(plot), "--force"])
    assert res.exit_code == 0 and plot.read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["surrogates", "--plot", str(tmp_path / "p.xyz")])
    assert res.exit_code == 2 and "a plot is written as .png" in res.output and not (tmp_path / "p.xyz").exists()


def test_an_output_that_is_an_input_is_refused_even_with_force(mlp, tmp_path):
    """Before, convert m.py -o m.py --force replaced the source with a checkpoint, and finetune
    ck -o ck and export ck -o ck replaced the checkpoint."""
    import os

    model, ck = mlp
    source, weights = model.read_bytes(), ck.read_bytes()
    link = tmp_path / "link.py"
    os.symlink(model, link)
    cases = [(["convert", model, "-o", model, "--force"], model), (["convert", model, "-o", link, "--force"], model),
             (["export", ck, "--model", model, "-o", ck, "--force"], ck),
             (["finetune", ck, "--model", model, "--data", FIXTURES / "digits_data.py", "-o", ck, "--force"], ck)]
    for args, victim in cases:
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 2 and "writing it would destroy what this command reads" in res.output, (args, res.output)
    # a plot onto an input: refused by its name already (an input is no image)
    res = runner.invoke(app, [str(a) for a in ["audit", ck, "--model", model, "--data", FIXTURES / "digits_data.py",
                                                 "--plot", model, "--force"]])
    assert res.exit_code == 2 and "a plot is written as" in res.output
    assert model.read_bytes() == source and ck.read_bytes() == weights


def test_ctrl_c_inside_the_exporter_is_exit_130(mlp, tmp_path, monkeypatch):
    """torch.export wraps a KeyboardInterrupt in its own error: it was reported as a bad model."""
    import torch

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Failed to export the model with torch.export.") from exc

    model, _ = mlp
    monkeypatch.setattr(torch.onnx, "export", interrupted)
    onnx = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", str(model), "-o", str(onnx)])
    assert res.exit_code == 130 and "interrupted" in res.output and not onnx.exists()
    assert not list(tmp_path.glob(".*.tmp"))



def test_the_demo_onto_a_file_or_into_a_folder_that_takes_no_files_is_exit_2(tmp_path):
    """Before, both were exit 3 (after training)."""
    afile = tmp_path / "a_file"
    afile.write_text("keep")
    res = runner.invoke(app, ["demo", "--quick", "--out", str(afile)])
    assert res.exit_code == 2 and "is a file" in res.output and afile.read_text() == "keep"
    res = runner.invoke(app, ["demo", "--quick", "--out", "/proc/sugarize-demo"])  # even root cannot write there
    assert res.exit_code == 2 and "give --out a folder you can write" in res.output


def test_an_error_from_user_code_is_reported_whole(tmp_path):
    """Before, messages were cut mid-sentence at 200 characters."""
    reason = "the checkpoint shard 7 of 12 was written by another version of my training code " * 4
    model = tmp_path / "long.py"
    model.write_text(f"def build_model():\n    raise ValueError({reason.strip()!r})\n")
    res = runner.invoke(app, ["convert", str(model), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and reason.strip() in " ".join(res.stderr.split())

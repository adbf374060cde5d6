"""Trust: what runs is the very bytes that were hashed, and nothing of the user's folder stands
in for a module the tool imports."""

from __future__ import annotations

import importlib.util
import marshal
import sys

import pytest

import sugarize
from sugarize.files.modelfile import load_model

GOOD = "import torch.nn as nn\nMARK = 'good'\ndef build_model():\n    return nn.Sequential(nn.Linear(2, 2), nn.ReLU())\n"
EVIL = ("import torch.nn as nn, pathlib\nMARK = 'evil'\npathlib.Path({marker!r}).write_text('ran')\n"
        "def build_model():\n    return nn.Sequential(nn.Linear(2, 2), nn.ReLU())\n")


def test_a_planted_pyc_never_runs_and_none_is_written(tmp_path):
    """Before, the import ran __pycache__/model.cpython-*.pyc when it had the source's size and
    mtime, under --model and --trust-recipe alike."""
    src = tmp_path / "model.py"
    src.write_text(GOOD)
    marker = tmp_path / "marker"
    evil = compile(EVIL.format(marker=str(marker)), str(src), "exec")
    stat = src.stat()
    cache = importlib.util.cache_from_source(str(src))
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    (tmp_path / "__pycache__").mkdir()
    with open(cache, "wb") as f:
        f.write(_code_to_timestamp_pyc(evil, int(stat.st_mtime), stat.st_size))
    before = sorted(p.name for p in (tmp_path / "__pycache__").iterdir())
    loaded = load_model(src)
    assert loaded.module.MARK == "good" and not marker.exists()
    assert sorted(p.name for p in (tmp_path / "__pycache__").iterdir()) == before  # no cache written either
    assert marshal  # (the planted file is a real pyc: marshal-compatible code object)


def test_a_file_swapped_right_after_it_was_hashed_never_runs(tmp_path, monkeypatch):
    """Before, the file was hashed with one read and imported with another: swapping it by
    rename in between ran the unhashed version (6 of 12 tries in the report). Here the swap
    comes deterministically right after the first read of the file: what runs must be what was
    hashed, or nothing."""
    import pathlib

    from typer.testing import CliRunner

    from sugarize.app.cli import app
    from sugarize.errors import CheckpointError

    marker = tmp_path / "marker"
    tail = "def example_inputs():\n    import torch\n    return (torch.randn(1, 2),)\n"
    target = tmp_path / "model.py"
    target.write_text(GOOD + tail)
    ck = tmp_path / "m.safetensors"
    assert CliRunner().invoke(app, ["convert", str(target), "-o", str(ck)]).exit_code == 0
    real_read = pathlib.Path.read_bytes
    reads = []

    def read_then_swap(self):
        data = real_read(self)
        if self.resolve() == target.resolve() and not reads:
            reads.append(data)
            swap = tmp_path / ".swap"
            swap.write_text(EVIL.format(marker=str(marker)) + tail)
            swap.replace(target)  # by rename, as in the report
        return data

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_then_swap)
    with pytest.raises(CheckpointError, match="nothing was run"):
        sugarize.load_checkpoint(ck, model=str(target))
    assert reads and not marker.exists(), "the unhashed version ran"


def test_a_module_beside_the_model_never_stands_in_for_one_the_tool_imports(tmp_path, monkeypatch):
    """Before, an openvino.py beside the model was imported by `verify --runtime openvino` when
    openvino was not installed: the model's folder stayed on sys.path. Now it is on sys.path only
    while the user's code runs, and a tool module the user's code imported from there is dropped."""
    from sugarize.files import modelfile

    (tmp_path / "sugarize_fake_dep.py").write_text("STAND_IN = True\n")
    (tmp_path / "helpers_of_model.py").write_text("WIDTH = 2\n")
    (tmp_path / "model.py").write_text(
        "import torch.nn as nn\nimport helpers_of_model, sugarize_fake_dep\n"
        "def build_model():\n    return nn.Linear(helpers_of_model.WIDTH, 2)\n")
    monkeypatch.setattr(modelfile, "TOOL_MODULES", modelfile.TOOL_MODULES | {"sugarize_fake_dep"})
    loaded = load_model(tmp_path / "model.py")
    assert loaded.model.in_features == 2  # the file imports the modules beside it
    assert str(tmp_path) not in sys.path  # and its folder is gone after
    assert "sugarize_fake_dep" not in sys.modules  # a tool module's name, from the user's folder: forgotten
    assert importlib.util.find_spec("sugarize_fake_dep") is None  # the tool cannot find it later either
    sys.modules.pop("helpers_of_model", None)


def test_checkpoint_without_a_name_says_which_function_it_called(tmp_path):
    from typer.testing import CliRunner

    from sugarize.app.cli import app

    model = tmp_path / "m.py"
    model.write_text("import torch, torch.nn as nn\ndef build_model():\n    return nn.Sequential(nn.Linear(4, 4), "
                     "nn.ReLU())\ndef other():\n    return nn.Sequential(nn.Linear(4, 4))\n"
                     "def example_inputs():\n    return (torch.randn(2, 4),)\n")
    ck = tmp_path / "m.safetensors"
    assert CliRunner().invoke(app, ["convert", str(model), "-o", str(ck)]).exit_code == 0
    res = CliRunner().invoke(app, ["export", str(ck), "--model", str(model), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert "called m.py:build_model, the name the recipe records" in " ".join(res.output.split())
    assert sugarize

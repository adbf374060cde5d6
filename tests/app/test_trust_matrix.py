"""The trust promises, class by class, through every command that reads the input in question:
code that was not named never runs, no file is lost, user code's failures are exit 2, warnings
from dependencies stay out of the way, and what ran is said."""

from __future__ import annotations

import importlib.util
import threading

import pytest
from typer.testing import CliRunner

from sugarize.app.cli import app

from helpers import FIXTURES

runner = CliRunner()
DIGITS = FIXTURES / "digits_data.py"

GOOD = """import torch, torch.nn as nn
MARK = 'good'
def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
def other():
    raise RuntimeError('other() ran')
def example_inputs():
    return (torch.randn(4, 64),)
"""
EVIL_LINE = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def files(tmp_path):
    model = tmp_path / "m.py"
    model.write_text(GOOD)
    ck = tmp_path / "m.sugar.safetensors"
    assert invoke("convert", model, "-o", ck).exit_code == 0
    onnx = tmp_path / "m.onnx"
    assert invoke("export", model, "-o", onnx).exit_code == 0
    return {"model": model, "ck": ck, "onnx": onnx, "tmp": tmp_path}


# Every command that runs a model file, with the model file named directly ...
def _model_commands(f):
    t, m = f["tmp"], f["model"]
    return {
        "convert": ["convert", m, "-o", t / "out.safetensors"],
        "inspect": ["inspect", m],
        "export": ["export", m, "-o", t / "out.onnx"],
        "verify": ["verify", f["onnx"], "--against", m],
        "audit": ["audit", m, "--data", DIGITS],
        "sweep": ["sweep", m, "--data", DIGITS, "-c", "bsilu", "--seeds", "1", "--steps", "1", "-o", t / "w.json"],
    }


# ... and every command that runs it to rebuild a checkpoint (--model FILE, no :NAME)
def _checkpoint_commands(f):
    t, m, ck = f["tmp"], f["model"], f["ck"]
    return {
        "inspect": ["inspect", ck, "--model", m],
        "export": ["export", ck, "--model", m, "-o", t / "out.onnx"],
        "verify": ["verify", f["onnx"], "--against", ck, "--model", m],
        "audit": ["audit", ck, "--model", m, "--data", DIGITS],
        "finetune": ["finetune", ck, "--model", m, "--data", DIGITS, "-o", t / "ft.safetensors"],
        "sweep": ["sweep", ck, "--model", m, "--data", DIGITS, "-c", "bsilu", "--seeds", "1", "--steps", "1",
                  "-o", t / "w.json"],
    }


MODEL_COMMANDS = ["convert", "inspect", "export", "verify", "audit", "sweep"]
CHECKPOINT_COMMANDS = ["inspect", "export", "verify", "audit", "finetune", "sweep"]


def _plant_pyc(model, marker):
    """A __pycache__ entry with the source's size and mtime that would run EVIL_LINE."""
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    evil = compile(EVIL_LINE.format(marker=str(marker)) + GOOD, str(model), "exec")
    stat = model.stat()
    cache = importlib.util.cache_from_source(str(model))
    (model.parent / "__pycache__").mkdir(exist_ok=True)
    with open(cache, "wb") as fh:
        fh.write(_code_to_timestamp_pyc(evil, int(stat.st_mtime), stat.st_size))


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_class_1_a_planted_pyc_never_runs_through_any_command_reading_a_model_file(files, command):
    marker = files["tmp"] / "marker"
    _plant_pyc(files["model"], marker)
    res = invoke(*_model_commands(files)[command])
    assert res.exit_code in (0, 1), res.output  # verify/sweep may fail a check; they still must not run it
    assert not marker.exists(), "the planted bytecode ran"


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_class_1_a_checkpoints_model_file_runs_its_hashed_bytes_and_the_output_says_which_function(files, command):
    marker = files["tmp"] / "marker"
    _plant_pyc(files["model"], marker)
    res = invoke(*_checkpoint_commands(files)[command])
    assert res.exit_code in (0, 1), res.output
    assert not marker.exists()
    assert "called m.py:build_model, the name the recipe records" in " ".join(res.output.split())
    assert "other() ran" not in res.output


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_class_1_an_edited_model_file_is_refused_before_it_runs(files, command):
    marker = files["tmp"] / "marker"
    files["model"].write_text(EVIL_LINE.format(marker=str(marker)) + GOOD)
    res = invoke(*_checkpoint_commands(files)[command])
    assert res.exit_code == 2 and "nothing was run" in res.output, res.output
    assert not marker.exists()


def test_class_1_a_file_swapped_in_a_loop_while_it_is_imported_never_runs_unhashed(files):
    """A writer swaps the model file by rename between the hashed version and an edited one, as
    fast as it can, while checkpoints are rebuilt: each rebuild runs the hashed bytes or refuses."""
    import sugarize
    from sugarize.errors import CheckpointError

    model, tmp = files["model"], files["tmp"]
    marker = tmp / "marker"
    versions = [GOOD, EVIL_LINE.format(marker=str(marker)) + GOOD]
    stop = threading.Event()

    def swapper():
        i = 0
        while not stop.is_set():
            tmp_file = tmp / f".swap{i % 2}"
            tmp_file.write_text(versions[i % 2])
            tmp_file.replace(model)
            i += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    outcomes = {"ran": 0, "refused": 0}
    try:
        for _ in range(30):
            try:
                sugarize.load_checkpoint(files["ck"], model=f"{model}:build_model")
                outcomes["ran"] += 1
            except CheckpointError:
                outcomes["refused"] += 1
    finally:
        stop.set()
        thread.join()
    assert not marker.exists(), f"the unhashed version ran ({outcomes})"
    assert outcomes["ran"] + outcomes["refused"] == 30


def _writers(f):
    """(command, the input it must not destroy) for every command that writes a file."""
    t, m, ck = f["tmp"], f["model"], f["ck"]
    return {
        "convert -o": (["convert", m, "-o", m, "--force"], m),
        "export -o": (["export", ck, "--model", m, "-o", ck, "--force"], ck),
        "finetune -o": (["finetune", ck, "--model", m, "--data", DIGITS, "-o", ck, "--force"], ck),
        "finetune --plot": (["finetune", ck, "--model", m, "--data", DIGITS, "-o", t / "w.safetensors",
                             "--plot", m, "--force"], m),
        "audit --plot": (["audit", ck, "--model", m, "--data", DIGITS, "--plot", m, "--force"], m),
        "sweep -o model": (["sweep", m, "--data", DIGITS, "-o", m, "--force"], m),
        "sweep -o data": (["sweep", m, "--data", DIGITS, "-o", DIGITS, "--force"], DIGITS),
        "sweep --plot": (["sweep", m, "--data", DIGITS, "--plot", m, "--force"], m),
        "export --int8 -o": (["export", m, "--int8", "--data", DIGITS, "-o", m, "--force"], m),
    }


@pytest.mark.parametrize("writer", ["convert -o", "export -o", "finetune -o", "finetune --plot", "audit --plot",
                                    "sweep -o model", "sweep -o data", "sweep --plot", "export --int8 -o"])
def test_class_2_no_command_writes_over_one_of_its_inputs_even_with_force(files, writer):
    args, victim = _writers(files)[writer]
    before = victim.read_bytes()
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert ("writing it would destroy what this command reads" in res.output
            or "a plot is written as" in res.output), res.output
    assert victim.read_bytes() == before


EXIT_IN_IMPORT = "import sys\nsys.exit(0)\n"


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_class_4_a_model_file_calling_sys_exit_is_exit_2_through_every_command(files, command):
    files["model"].write_text(EXIT_IN_IMPORT)
    res = invoke(*_model_commands(files)[command])
    assert res.exit_code == 2, res.output
    assert "called sys.exit(0) while it was imported" in res.output
    assert len(res.stderr.strip().splitlines()) == 1


DATA_EXIT = ("import sys, torch\ndef train_loader():\n    yield (torch.randn(8, 64), torch.zeros(8, dtype=torch.long))\n"
             "    sys.exit(0)\ndef val_loader():\n    return [(torch.randn(8, 64), torch.zeros(8, dtype=torch.long))]\n")
DATA_RAISE_IN_LOSS = ("import torch\ndef train_loader():\n    return [(torch.randn(8, 64), torch.zeros(8, dtype=torch.long))]\n"
                      "def loss_fn(out, y):\n    raise KeyError('labels')\n")


def _data_readers(f, data):
    t, m, ck = f["tmp"], f["model"], f["ck"]
    return {
        "finetune": ["finetune", ck, "--model", m, "--data", data, "-o", t / "ft.safetensors"],
        "audit": ["audit", ck, "--model", m, "--data", data],
        "export --int8": ["export", m, "--int8", "--data", data, "-o", t / "q.onnx"],
        "sweep": ["sweep", m, "--data", data, "-c", "bsilu", "--seeds", "1", "-o", t / "w.json"],
    }


@pytest.mark.parametrize("command", ["finetune", "audit", "export --int8", "sweep"])
def test_class_4_a_data_file_exiting_while_iterated_is_exit_2_through_every_command(files, command):
    data = files["tmp"] / "exits.py"
    data.write_text(DATA_EXIT)
    res = invoke(*_data_readers(files, data)[command])
    assert res.exit_code == 2, res.output
    assert "raised SystemExit while it was iterated" in res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert not list(files["tmp"].glob("ft.safetensors")) and not list(files["tmp"].glob("w.json"))


@pytest.mark.parametrize("command", ["finetune", "sweep"])
def test_class_4_a_loss_fn_that_raises_is_exit_2_through_every_command_that_trains(files, command):
    data = files["tmp"] / "bad_loss.py"
    data.write_text(DATA_RAISE_IN_LOSS)
    res = invoke(*_data_readers(files, data)[command])
    assert res.exit_code == 2, res.output
    assert "the loss rejected a batch" in res.output and "KeyError" in res.output


def test_class_5_dependency_warnings_are_kept_out_and_shown_under_debug(files, monkeypatch):
    import warnings

    from sugarize.app import workflows

    real = workflows.inspect_file

    def noisy(*args, **kwargs):
        warnings.warn("deprecated thing in /site-packages/dep/internal.py", DeprecationWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(workflows, "inspect_file", noisy)
    res = invoke("inspect", files["model"])
    assert res.exit_code == 0 and "deprecated thing" not in res.output
    res = invoke("--debug", "inspect", files["model"])
    assert res.exit_code == 0 and "deprecated thing" in res.stderr and "DeprecationWarning" in res.stderr


def test_class_5_weights_cast_with_a_loss_warn(files):
    import torch

    import sugarize

    state = sugarize.load_weights(files["ck"])
    state = {k: v.double() + 1e-12 if k.endswith("weight") else v for k, v in state.items()}
    weights = files["tmp"] / "f64.safetensors"
    sugarize.save_weights(state, weights)
    res = invoke("export", files["ck"], "--model", f"{files['model']}:build_model", "--weights", weights,
                 "-o", files["tmp"] / "x.onnx")
    assert res.exit_code in (0, 1), res.output
    assert "change when cast to the model's dtype" in res.output and "float64 -> float32" in res.output
    exact = files["tmp"] / "same.safetensors"
    sugarize.save_weights({k: v.to(torch.float32) for k, v in sugarize.load_weights(files["ck"]).items()}, exact)
    res = invoke("export", files["ck"], "--model", f"{files['model']}:build_model", "--weights", exact,
                 "-o", files["tmp"] / "y.onnx")
    assert res.exit_code == 0 and "change when cast" not in res.output


@pytest.mark.parametrize("args, says", [
    (["convert"], "Missing argument"),
    (["inspect", "m.py", "--bogus"], "No such option: --bogus"),
    (["audit", "m.py", "--data", "d.py", "--plot", "p.xyz"], "a plot is written as"),
    (["audit", "m.py", "--data", "d.py", "--split", "bogus"], "'bogus' is not one of train, val"),
    (["finetune", "ck", "--data", "d.py", "-o", "w", "--seed", str(2**70)], "--seed"),
    (["verify", "m.onnx", "--against", "m.py", "--atol", "nan"], "not a tolerance"),
    (["sweep", "m.py", "--data", "d.py", "--optimizer", "adam"], "'adam' is not one of sgd, adamw"),
    (["export", "m.py", "-o", "m.onnx", "--opset", "x"], "--opset"),
])
def test_class_5_a_usage_mistake_is_one_line_naming_it_and_the_help_to_read(args, says):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith("error:"), res.stderr
    assert "--help" in lines[0] and "Usage:" not in res.output


def test_class_5_under_debug_the_error_line_comes_first_then_the_traceback(tmp_path):
    res = runner.invoke(app, ["--debug", "inspect", str(tmp_path / "missing.py")])
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and "Traceback" in res.stderr


def test_class_1_python_m_sugarize_never_imports_a_module_from_the_current_folder(files):
    """``python -m`` puts the current folder first on sys.path: an openvino.py there was what
    `verify --runtime openvino` imported (exit 3, its code run)."""
    import subprocess
    import sys

    tmp = files["tmp"]
    marker = tmp / "marker"
    (tmp / "openvino.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('stand-in ran')\n")
    res = subprocess.run([sys.executable, "-m", "sugarize", "verify", "m.onnx", "--against", "m.py", "--runtime",
                          "openvino"], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), res.stderr
    assert res.returncode in (0, 1, 2) and "Traceback" not in res.stderr, res.stderr

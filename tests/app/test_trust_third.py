"""Trust, third pass (#32): the hash covers every file of the model's folder that runs, the user
names the function, no output eats an input or another output, and what the user's code raises
(or the disk refuses) is exit 2 in one line. Each test failed on the main before this pass."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sugarize.app.cli import app
from sugarize.errors import InputError

from helpers import FIXTURES, ROOT

runner = CliRunner()
DATA = str(FIXTURES / "digits_data.py")

MLP = """import torch, torch.nn as nn
{head}
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    def forward(self, x):
{forward}
        return self.body(x)
def build_model():
    torch.manual_seed(0)
    return M()
def example_inputs():
    return (torch.randn(4, 64),)
"""


def model_file(folder: Path, head: str = "", forward: str = "        pass", name: str = "model.py") -> Path:
    path = folder / name
    path.write_text(MLP.format(head=head, forward=forward))
    return path


def run(*args):
    """The command in this process, as a fresh process would run it: no model file of an earlier
    command cached (the CLI runs one command a process)."""
    for name in [n for n in sys.modules if n.startswith("sugarize_user_")]:
        del sys.modules[name]
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    return lines[0]


# -- 1. the hash covers all the code that runs -------------------------------------------------

SIBLING = """import torch.nn as nn
open({marker!r}, "w").write("ran")
def body():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
"""


@pytest.fixture()
def with_sibling(tmp_path):
    """model.py imports helper.py beside it; converted to ck.safetensors."""
    marker = tmp_path / "helper-ran"
    (tmp_path / "helper.py").write_text(SIBLING.format(marker=str(marker)))
    model = model_file(tmp_path, head="import helper\ntry:\n    import plugin\nexcept ImportError:\n    plugin = None")
    ck = tmp_path / "ck.safetensors"
    res = run("convert", model, "-o", ck)
    assert res.exit_code == 0, res.output
    recipe = json.loads(__import__("safetensors").safe_open(str(ck), "pt").metadata()["sugarize"])
    assert recipe["model"]["closure"] == {"helper.py": __import__("hashlib").sha256(
        (tmp_path / "helper.py").read_bytes()).hexdigest()}
    marker.unlink()
    return tmp_path, model, ck, marker


def test_a_changed_sibling_module_is_refused_naming_it_and_not_run(with_sibling):
    folder, model, ck, marker = with_sibling
    (folder / "helper.py").write_text(SIBLING.format(marker=str(marker)) + "\n# changed\n")
    line = one_line_error(run("export", ck, "--model", model, "-o", folder / "m.onnx"))
    assert "helper.py changed since the checkpoint was made" in line
    assert not marker.exists() and not (folder / "m.onnx").exists()


def test_a_removed_sibling_is_refused_before_anything_runs(with_sibling):
    folder, model, ck, marker = with_sibling
    (folder / "helper.py").unlink()
    line = one_line_error(run("export", ck, "--model", model, "-o", folder / "m.onnx"))
    assert "helper.py" in line and "is gone" in line


def test_an_added_sibling_is_refused_and_not_run(with_sibling):
    folder, model, ck, marker = with_sibling
    planted = folder / "plugin-ran"
    (folder / "plugin.py").write_text(f"open({str(planted)!r}, 'w').write('ran')\n")
    line = one_line_error(run("export", ck, "--model", model, "-o", folder / "m.onnx"))
    assert "plugin.py" in line and "not in the recipe" in line
    assert not planted.exists()


def test_the_unchanged_closure_opens_and_runs_from_the_hashed_bytes(with_sibling):
    folder, model, ck, marker = with_sibling
    res = run("export", ck, "--model", model, "-o", folder / "m.onnx")
    assert res.exit_code == 0, res.output
    assert marker.read_text() == "ran"  # helper.py ran, from the bytes that were checked
    assert not list(folder.glob("__pycache__/helper*.pyc")), "no bytecode cache written or read"


def test_python_m_sugarize_never_runs_a_typing_py_in_the_current_folder(tmp_path):
    marker = tmp_path / "typing-ran"
    for name in ("typing.py", "ast.py"):
        (tmp_path / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(9)\n")
    res = subprocess.run([sys.executable, "-m", "sugarize", "--version"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and "sugarize" in res.stdout, res.stderr
    assert not marker.exists()


# -- 2. a checkpoint never picks the code that runs ----------------------------------------------

def test_a_recipe_naming_another_function_is_refused_and_that_function_not_called(tmp_path):
    marker = tmp_path / "wiped"
    model = model_file(tmp_path, head=f"def wipe():\n    open({str(marker)!r}, 'a').write('x')\n    return M()")
    ck = tmp_path / "ck.safetensors"
    assert run("convert", f"{model}:wipe", "-o", ck).exit_code == 0  # the user named wipe here
    marker.unlink()
    line = one_line_error(run("export", ck, "--model", model, "-o", tmp_path / "m.onnx"))
    assert f"--model {model}:wipe" in line and "nothing was called" in line
    assert not marker.exists()
    # naming it is the user's choice
    assert run("export", ck, "--model", f"{model}:wipe", "-o", tmp_path / "m.onnx").exit_code == 0
    assert marker.exists()


def test_model_and_trust_recipe_together_are_refused(tmp_path):
    model = model_file(tmp_path)
    ck = tmp_path / "ck.safetensors"
    assert run("convert", model, "-o", ck).exit_code == 0
    line = one_line_error(run("export", ck, "--model", model, "--trust-recipe", "-o", tmp_path / "m.onnx"))
    assert "--model and --trust-recipe were both given" in line


# -- 3. outputs never eat inputs or each other -----------------------------------------------------

def test_convert_refuses_writing_over_its_config(tmp_path):
    model = model_file(tmp_path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"surrogate": "bsilu"}))
    before = cfg.read_bytes()
    line = one_line_error(run("convert", model, "--config", cfg, "-o", cfg, "--force"))
    assert "is the input cfg.json" in line and cfg.read_bytes() == before


@pytest.mark.parametrize("companion,flags", [("m.int8.onnx", ["--int8", "--data", DATA]),
                                             ("m.onnx.data", ["--external-data"])])
def test_export_refuses_a_companion_that_is_an_input(tmp_path, companion, flags):
    import sugarize
    from helpers import load_fixture  # noqa: F401

    model = model_file(tmp_path)
    weights = tmp_path / companion  # the weights file happens to bear the companion's name
    spec = __import__("importlib.util").util.spec_from_file_location("tmodel", model)
    mod = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sugarize.save_weights(mod.build_model(), weights)
    before = weights.read_bytes()
    line = one_line_error(run("export", model, "--weights", weights, "-o", tmp_path / "m.onnx", "--force", *flags))
    assert f"is the input {companion}" in line
    assert weights.read_bytes() == before and not (tmp_path / "m.onnx").exists()


def test_sweep_refuses_one_file_as_both_outputs(tmp_path):
    model = model_file(tmp_path)
    line = one_line_error(run("sweep", model, "--data", DATA, "-o", tmp_path / "x.png", "--plot", tmp_path / "x.png"))
    assert "are the same file" in line


def test_demo_does_not_replace_an_earlier_demos_files_without_force(tmp_path):
    (tmp_path / "demo.png").write_bytes(b"mine")
    line = one_line_error(run("demo", "--out", tmp_path, "--quick"))
    assert "demo.png already exists; pass --force" in line
    assert (tmp_path / "demo.png").read_bytes() == b"mine"


def test_stale_temp_cleanup_leaves_a_users_files_that_match_the_pattern(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no process has it
    user_file = tmp_path / f".notes{'.sugarize-'}{dead}-abc.tmp"
    user_file.write_text("my notes")
    user_dir = tmp_path / f".work{'.sugarize-'}{dead}-def.tmp"
    user_dir.mkdir()
    (user_dir / "data.txt").write_text("mine")
    model = model_file(tmp_path)
    assert run("convert", model, "-o", tmp_path / "ck.safetensors").exit_code == 0
    assert user_file.read_text() == "my notes" and (user_dir / "data.txt").read_text() == "mine"


def test_a_dangling_symlink_output_is_named_as_such(tmp_path):
    model = model_file(tmp_path)
    link = tmp_path / "out.safetensors"
    link.symlink_to(tmp_path / "nowhere" / "x.safetensors")
    line = one_line_error(run("convert", model, "-o", link))
    assert "symbolic link" in line and "does not exist" in line


def test_a_255_byte_output_name_is_written(tmp_path):
    model = model_file(tmp_path)
    out = tmp_path / ("m" * (255 - len(".safetensors")) + ".safetensors")
    res = run("convert", model, "-o", out)
    assert res.exit_code == 0, res.output
    assert out.is_file()


# -- 4. what the user's code raises is the user's: exit 2, one line ---------------------------------

class_boom = "class Boom(BaseException):\n    pass"
CASES = {
    "base exception at import": (f"{class_boom}\nraise Boom('at import')", "        pass", "raised Boom"),
    "base exception in forward": (class_boom, "        raise Boom('in forward')", "raised Boom"),
    "generator exit in forward": ("", "        raise GeneratorExit()", "raised GeneratorExit"),
    "sys.exit(0) in forward": ("import sys", "        sys.exit(0)", "called sys.exit(0)"),
    "module __getattr__ raises": ("def __getattr__(name):\n    raise RuntimeError('no ' + name)", "        pass",
                                  "raised RuntimeError"),
    "recursion limit lowered": ("import sys\nsys.setrecursionlimit(80)", "        pass", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_a_model_file_raises_is_exit_2_naming_the_file(tmp_path, case):
    head, forward, expect = CASES[case]
    model = model_file(tmp_path, head=head, forward=forward)
    limit = sys.getrecursionlimit()
    res = run("export", model, "-o", tmp_path / "m.onnx")
    assert sys.getrecursionlimit() == limit
    if expect is None:  # the limit came back after the file ran: the export works
        assert res.exit_code == 0, res.output
        return
    line = one_line_error(res)
    assert "model.py line" in line and expect in line
    assert not (tmp_path / "m.onnx").exists()


def test_parameters_that_raise_are_the_users(tmp_path):
    model = model_file(tmp_path, head="")
    model.write_text(model.read_text().replace(
        "    def forward(self, x):", "    def parameters(self, recurse=True):\n        raise ValueError('mine')\n"
                                    "    def forward(self, x):"))
    line = one_line_error(run("convert", model, "-o", tmp_path / "ck.safetensors"))
    assert "model.py line" in line and "ValueError: mine" in line


DATA_FILE = """import torch
class Boom(BaseException):
    pass
def train_loader():
{loader}
def val_loader():
    return [(torch.randn(4, 64), torch.randint(0, 10, (4,)))]
{loss}
"""


@pytest.mark.parametrize("case,loader,loss,expect", [
    ("base exception in the loader", "    raise Boom('loader')\n    yield None", "", "raised Boom"),
    ("base exception in loss_fn", "    yield torch.randn(4, 64), torch.randint(0, 10, (4,))",
     "def loss_fn(out, y):\n    raise Boom('loss')", "Boom"),
    ("constant loss", "    yield torch.randn(4, 64), torch.randint(0, 10, (4,))",
     "def loss_fn(out, y):\n    return torch.tensor(1.0)", "does not depend on the model's output"),
])
def test_what_a_data_file_raises_is_exit_2(tmp_path, case, loader, loss, expect):
    model = model_file(tmp_path)
    ck = tmp_path / "ck.safetensors"
    assert run("convert", model, "-o", ck).exit_code == 0
    data = tmp_path / "data.py"
    data.write_text(DATA_FILE.format(loader=loader, loss=loss))
    line = one_line_error(run("finetune", ck, "--model", model, "--data", data, "-o", tmp_path / "ft.safetensors"))
    assert expect in line


def test_a_model_package_named_like_a_module_we_use_is_refused(tmp_path):
    pkg = tmp_path / "sugarize"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    model = model_file(pkg, name="errors.py")
    line = one_line_error(run("inspect", model))
    assert "package folder named 'sugarize'" in line
    import sugarize.errors

    assert Path(sugarize.errors.__file__).parent.parent == ROOT  # the real module stayed


# -- 5. the environment's failures are the environment's -----------------------------------------

def test_a_full_disk_is_exit_2_naming_the_folder(tmp_path, monkeypatch):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)],
                             capture_output=True).returncode == 0
    try:
        if mounted:  # filled up, a folder left to hold the temporary: the checkpoint's bytes find no room
            (tiny / ".keep").mkdir()
            fd = os.open(tiny / ".keep" / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 1024):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
        if not mounted:  # no tmpfs here: a write that fails the way safetensors does on a full disk
            import safetensors.torch

            def full(*a, **k):
                raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                                  "StorageFull, message: \"No space left on device\" })")

            monkeypatch.setattr(safetensors.torch, "save_file", full)
        model = model_file(tmp_path)
        line = one_line_error(run("convert", model, "-o", tiny / "ck.safetensors"))
        assert "the disk is full in folder" in line and str(tiny) in line
        assert [p.name for p in tiny.iterdir() if p.name != ".keep"] == []
    finally:
        if mounted:
            subprocess.run(["umount", str(tiny)], check=False)


@pytest.mark.parametrize("role", ["model", "data"])
def test_a_fifo_is_refused_not_read(tmp_path, role):
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    model = model_file(tmp_path)
    args = ["inspect", fifo] if role == "model" else ["audit", model, "--data", fifo]
    res = subprocess.run([sys.executable, "-m", "sugarize", *map(str, args)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "is a FIFO, not a regular file" in res.stderr, res.stderr


def test_counts_have_sane_upper_bounds(tmp_path):
    res = run("finetune", "x.safetensors", "--data", DATA, "-o", tmp_path / "o.safetensors", "--epochs", str(2**64))
    assert res.exit_code == 2 and "--epochs" in res.output


# -- 6. paths are data, not markup --------------------------------------------------------------

def test_a_path_with_brackets_is_reported_as_not_found(tmp_path):
    name = str(tmp_path / "a[/]b.py")
    line = one_line_error(run("inspect", name))
    assert "not found" in line and "a[/]b.py" in line


def test_a_bracketed_name_is_printed_as_it_is(tmp_path):
    folder = tmp_path / "x[bold]y"
    folder.mkdir()
    model = model_file(folder)
    res = run("convert", model, "-o", folder / "ck.safetensors")
    assert res.exit_code == 0 and "x[bold]y" in "".join(res.output.split()), res.output


def test_the_install_hint_keeps_its_brackets(tmp_path):
    res = subprocess.run([sys.executable, "-c", (
        "import sys\n"
        "class NoOV:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'openvino' or name.startswith('openvino.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoOV())\n"
        "from sugarize.app.cli import main\n"
        "sys.argv = ['sugarize', 'verify', sys.argv[1], '--against', sys.argv[2], '--runtime', 'openvino']\n"
        "main()\n"), str(_onnx(tmp_path)), str(tmp_path / "model.py")], capture_output=True, text=True, timeout=300,
        cwd=ROOT)
    assert res.returncode == 2 and "pip install 'sugarize[openvino]'" in res.stderr, res.stderr


def _onnx(tmp_path: Path) -> Path:
    model = model_file(tmp_path)
    out = tmp_path / "m.onnx"
    assert run("export", model, "-o", out).exit_code == 0
    return out


def _loop_file(tmp_path, trips: int, name: str = "loop.onnx"):
    """An ONNX graph whose Loop adds 1, ``trips`` times."""
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "one"], ["v_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["n"], value=helper.make_tensor("n", TensorProto.INT64, [], [trips])),
         helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
         helper.make_node("Loop", ["n", "c", "x"], ["y"], body=body)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_an_onnx_loop_with_a_huge_trip_count_is_stopped_by_the_run_timeout(tmp_path):
    import time

    import numpy as np

    from sugarize.deploy.runtimes import OrtRunner
    from sugarize.errors import ExportError

    path = _loop_file(tmp_path, 2**62)
    runner = OrtRunner(path, timeout_s=1.0)
    start = time.perf_counter()
    with pytest.raises(ExportError, match="did not finish one run of loop.onnx in 1 s"):
        runner.run([np.zeros(1, np.float32)])
    assert time.perf_counter() - start < 30


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the openvino extra is not installed")
def test_an_onnx_loop_with_a_huge_trip_count_is_refused_before_it_runs_in_openvino(tmp_path):
    """OpenVINO's CPU plugin cannot be stopped mid-run (cancel does not stop a Loop): the loop's
    trip count bounds it before it runs; a small one runs."""
    import numpy as np

    from sugarize.deploy.runtimes import MAX_LOOP_ITERATIONS, OpenVinoRunner

    path = _loop_file(tmp_path, 2**62)
    with pytest.raises(InputError, match="holds a Loop whose trip count is 4611686018427387904: OpenVINO cannot"):
        OpenVinoRunner(path)
    small = OpenVinoRunner(_loop_file(tmp_path, 5, "small.onnx"))
    assert small.run([np.zeros(1, np.float32)])[0].tolist() == [5.0]
    assert MAX_LOOP_ITERATIONS == 10**6

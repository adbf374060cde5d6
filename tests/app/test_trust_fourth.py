"""Trust, fourth pass (#39): the closure covers code that runs late and files the model reads, no
output over the model's own files, bounds and messages. Each test is one class of the hostile
sweep, with the canary, lost-file or exit-code check that failed before."""

from __future__ import annotations

import errno
import importlib.util
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_trust_third import DATA, model_file, one_line_error, run

from helpers import MODELS, ROOT

CANARY = "open({path!r}, 'w').write('ran')\n"


def convert(folder: Path, model: Path) -> Path:
    ck = folder / "ck.safetensors"
    res = run("convert", model, "-o", ck)
    assert res.exit_code == 0, res.output
    return ck


def recipe_closure(ck: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(ck), "pt") as f:
        return json.loads(f.metadata()["sugarize"])["model"]["closure"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_refused(folder: Path, ck: Path, model: Path, canary: Path, *words: str) -> str:
    line = one_line_error(run("export", ck, "--model", model, "-o", folder / "m.onnx"))
    for w in words:
        assert w in line, line
    assert not canary.exists(), "code that was not hashed ran"
    assert not (folder / "m.onnx").exists()
    return line


# -- 1. the closure covers all the code that runs, for as long as the model's code runs -----------

def refused_after_change(folder: Path, model: Path, changed: Path, key: str, body: str) -> None:
    """Convert (the recipe records ``key`` with ``changed``'s hash), then ``changed`` gets a
    canary: the export is refused naming ``key``, and the canary is not written."""
    canary = folder / "canary"
    changed.write_text(body)
    ck = convert(folder, model)
    assert recipe_closure(ck)[key] == sha(changed)
    changed.write_text(body + CANARY.format(path=str(canary)))
    export_refused(folder, ck, model, canary, f"{key} changed since the checkpoint was made")


def package(folder: Path, name: str) -> Path:
    pkg = folder / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    return pkg


def test_a_symlinked_sibling_is_hashed_by_the_bytes_it_points_at(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    outside = tmp_path / "elsewhere" / "helper.py"
    outside.write_text("")
    (tmp_path / "helper.py").symlink_to(outside)
    refused_after_change(tmp_path, model_file(tmp_path, head="import helper"), outside, "helper.py", "X = 1\n")


def test_a_package_model_importing_from_the_package_parent_folder_is_covered(tmp_path):
    model = model_file(package(tmp_path, "pkg"), head="import shared")
    refused_after_change(tmp_path, model, tmp_path / "shared.py", "../shared.py", "WIDTH = 16\n")


def test_an_import_in_forward_after_the_file_put_its_folder_on_sys_path_is_covered(tmp_path):
    model = model_file(tmp_path, head=f"import sys\nsys.path.insert(0, {str(tmp_path)!r})", forward="        import lazy")
    try:  # imported by the forward convert ran
        refused_after_change(tmp_path, model, tmp_path / "lazy.py", "lazy.py", "Y = 2\n")
    finally:
        sys.path[:] = [p for p in sys.path if p != str(tmp_path)]
        sys.modules.pop("lazy", None)


def test_a_relative_import_in_forward_works_for_a_package_model_and_is_covered(tmp_path):
    pkg = package(tmp_path, "pkgrel")
    model = model_file(pkg, forward="        import importlib\n        importlib.import_module('.sub', __package__)\n"
                                    "        from . import sub")
    refused_after_change(tmp_path, model, pkg / "sub.py", "sub.py", "Z = 3\n")  # before: "No module named 'pkgrel'"


THREADED = """import threading
_go = threading.Event()
def _late():
    _go.wait()
    import late
_thread = threading.Thread(target=_late)
_thread.start()
"""


def test_an_import_in_a_thread_the_model_started_is_covered(tmp_path):
    canary = tmp_path / "canary"
    (tmp_path / "late.py").write_text("W = 4\n")
    model = model_file(tmp_path, head=THREADED, forward="        _go.set()\n        _thread.join()")
    ck = convert(tmp_path, model)
    assert "late.py" in recipe_closure(ck)
    (tmp_path / "late.py").write_text("W = 4\n" + CANARY.format(path=str(canary)))
    run("export", ck, "--model", model, "-o", tmp_path / "m.onnx")  # the thread's import fails in the thread
    assert not canary.exists(), "code that was not hashed ran"


@pytest.mark.parametrize("how", ["exec", "runpy", "exec_module", "pickle"])
def test_a_file_of_the_folder_the_model_reads_and_runs_is_recorded_and_checked(tmp_path, how):
    canary = tmp_path / "canary"
    read = {
        "exec": "exec(open(HERE + '/helper.py').read())",
        "runpy": "import runpy\nrunpy.run_path(HERE + '/helper.py')",
        "exec_module": "import importlib.util\n_s = importlib.util.spec_from_file_location('h', HERE + '/helper.py')\n"
                       "_s.loader.exec_module(importlib.util.module_from_spec(_s))",
        "pickle": "import pickle\nwith open(HERE + '/state.pkl', 'rb') as _f:\n    STATE = pickle.load(_f)",
    }[how]
    name = "state.pkl" if how == "pickle" else "helper.py"
    if how == "pickle":
        import pickle

        (tmp_path / name).write_bytes(pickle.dumps({"width": 16}))
    else:
        (tmp_path / name).write_text("V = 5\n")
    model = model_file(tmp_path, head=f"import os\nHERE = os.path.dirname(os.path.abspath(__file__))\n{read}")
    ck = convert(tmp_path, model)
    assert recipe_closure(ck)[name] == sha(tmp_path / name)
    if how == "pickle":  # a pickle that runs code when loaded
        (tmp_path / name).write_bytes(b"cos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR.")
    else:
        (tmp_path / name).write_text("V = 5\n" + CANARY.format(path=str(canary)))
    export_refused(tmp_path, ck, model, canary, f"{name} changed since the checkpoint was made")


# -- 2. no output over the model's own files; companions both or neither ---------------------------

def test_an_output_over_the_models_own_sibling_is_refused_even_with_force(tmp_path):
    (tmp_path / "helper.py").write_text("X = 1\n")
    model = model_file(tmp_path, head="import helper")
    ck = convert(tmp_path, model)
    before = (tmp_path / "helper.py").read_bytes()
    line = one_line_error(run("export", ck, "--model", model, "-o", tmp_path / "helper.py", "--force"))
    assert "is helper.py, a file of the model's own code" in line
    line = one_line_error(run("export", model, "-o", model, "--force"))
    assert "model.py" in line
    assert (tmp_path / "helper.py").read_bytes() == before


def test_ctrl_c_during_int8_leaves_neither_file(tmp_path, monkeypatch):
    from sugarize.deploy.onnx_target import OnnxTarget

    real = OnnxTarget.quantize

    def interrupted(self, *args, **kwargs):
        report = real(self, *args, **kwargs)  # the int8 file is written ...
        raise KeyboardInterrupt  # ... and Ctrl-C comes before the float file takes its place

    monkeypatch.setattr(OnnxTarget, "quantize", interrupted)
    res = run("export", MODELS / "dead_mlp.py", "-o", tmp_path / "q.onnx", "--int8", "--data", DATA,
              "--calibration-batches", "2")
    assert res.exit_code == 130, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- 3. bounds and messages ------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_ck(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck")
    model = model_file(folder)
    return folder, model, convert(folder, model)


def test_a_learning_rate_that_overflows_float32_is_exit_2(small_ck, tmp_path):
    folder, model, ck = small_ck
    line = one_line_error(run("finetune", ck, "--model", model, "--data", DATA, "-o", tmp_path / "w.safetensors",
                              "--lr", "1e308", "--epochs", "1"))
    assert "learning rate 1e+308 does not fit the model's float32 parameters" in line
    assert not (tmp_path / "w.safetensors").exists()


def test_a_nul_byte_in_a_recipe_path_is_exit_2(small_ck, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, model, ck = small_ck
    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recipe = json.loads(meta["sugarize"])
    recipe["model"]["relpath"] = "mo\x00del.py"
    crafted = tmp_path / "crafted.safetensors"
    save_file(tensors, str(crafted), metadata={**meta, "sugarize": json.dumps(recipe)})
    line = one_line_error(run("export", crafted, "--trust-recipe", "-o", tmp_path / "m.onnx"))
    assert "NUL byte" in line


def test_the_error_names_the_sibling_that_is_broken(tmp_path):
    (tmp_path / "helper.py").write_bytes(b"\x08\x00\x12binary artifact bytes\x00")
    model = model_file(tmp_path, head="import helper", name="model2.py")
    line = one_line_error(run("convert", model, "-o", tmp_path / "ck.safetensors"))
    assert "in helper.py (imported by model2.py)" in line and "line None" not in line


def test_a_zipped_module_in_the_folder_is_refused_in_one_line(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "lib.zip", "w") as z:
        z.writestr("zmod.py", "Q = 1\n")
    model = model_file(tmp_path, head=f"import sys\nsys.path.insert(0, {str(tmp_path / 'lib.zip')!r})\nimport zmod")
    try:
        line = one_line_error(run("convert", model, "-o", tmp_path / "ck.safetensors"))
    finally:
        sys.path[:] = [p for p in sys.path if p != str(tmp_path / "lib.zip")]
    assert "imports zmod from lib.zip, a zip archive in its folder" in line


def test_disk_full_names_the_users_folder_and_file(tmp_path, monkeypatch):
    from sugarize.deploy import ort_target

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ort_target, "_convert", full)
    line = one_line_error(run("export", MODELS / "dead_mlp.py", "-o", tmp_path / "y.ort"))
    assert line.startswith("error: cannot write y.ort:") and f"in folder {tmp_path} " in line, line
    assert ".sugarize-" not in line and list(tmp_path.iterdir()) == []


def test_a_symlink_loop_is_named_as_one(tmp_path):
    for name in ("loop.py", "loop.onnx", "loop.safetensors"):
        (tmp_path / name).symlink_to(tmp_path / name)
    assert "is a symlink loop" in one_line_error(run("convert", tmp_path / "loop.py", "-o", tmp_path / "c.st"))
    assert "is a symlink loop" in one_line_error(run("verify", tmp_path / "loop.onnx", "--against",
                                                     MODELS / "dead_mlp.py"))
    assert "is a symlink loop" in one_line_error(run("export", tmp_path / "loop.safetensors", "-o",
                                                     tmp_path / "m.onnx"))


def test_a_suffix_that_contradicts_format_is_exit_2(tmp_path):
    line = one_line_error(run("export", MODELS / "dead_mlp.py", "-o", tmp_path / "x.onnx", "--format", "pte"))
    assert "-o x.onnx is named as ONNX (.onnx) but --format pte writes ExecuTorch" in line
    assert list(tmp_path.iterdir()) == []


# -- 4. the CLI ends when its work ends ----------------------------------------------------------

def test_the_cli_exits_when_its_work_is_done_though_the_model_left_a_thread_running(tmp_path):
    model = model_file(tmp_path, head="import threading, time\nthreading.Thread(target=time.sleep, args=(600,), "
                                      "name='model-sleeper').start()")
    res = subprocess.run([sys.executable, "-m", "sugarize", "inspect", str(model)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "1 thread(s) were still running when the command ended (model-sleeper:" in res.stderr


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="the executorch extra is not installed")
def test_an_executorch_program_with_a_loop_is_refused_before_it_runs(tmp_path):
    """ExecuTorch's runtime cannot be stopped mid-run: a backward jump is refused; the same
    program without it runs (the negative control)."""
    import torch
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary
    from executorch.exir.schema import Instruction, JumpFalseCall

    from sugarize.deploy.pte_target import PteRunner, export_pte
    from sugarize.errors import InputError

    good = export_pte(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), tmp_path / "g.pte",
                      (torch.randn(2, 4),), backend="portable").path
    assert PteRunner(good).run([torch.randn(2, 4).numpy()])[0].shape == (2, 4)
    pte = deserialize_pte_binary(good.read_bytes())
    pte.program.execution_plan[0].chains[0].instructions.append(Instruction(JumpFalseCall(0, 0)))
    (tmp_path / "loop.pte").write_bytes(bytes(serialize_pte_binary(pte)))
    with pytest.raises(InputError, match=r"loop.pte holds a loop \(instruction \d+ of forward jumps back to 0\)"):
        PteRunner(tmp_path / "loop.pte")


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="the executorch extra is not installed")
def test_third_party_tools_output_is_kept_off_the_terminal_unless_verbose(tmp_path):
    """ExecuTorch prints cpuinfo lines from C++ straight to file descriptor 2 on first run."""
    def export(*flags):
        return subprocess.run([sys.executable, "-m", "sugarize", *flags, "export", str(MODELS / "dead_mlp.py"), "-o",
                               str(tmp_path / "p.pte"), "--backend", "portable", "--force"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)

    quiet = export()
    assert quiet.returncode == 0 and "cpuinfo" not in quiet.stderr + quiet.stdout, quiet.stderr
    loud = export("--verbose")
    assert loud.returncode == 0 and "cpuinfo" in loud.stderr  # the negative control: they are there to hide

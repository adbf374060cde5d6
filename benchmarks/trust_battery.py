"""Careless and hostile inputs through the CLI, before and after the trust work (issues #22, #32, #39).

    python benchmarks/trust_battery.py [--before CHECKOUT] [--out benchmarks/results]

Each case builds its files in a fresh folder and runs ``python -m sugarize ...`` in a fresh
process, with ``PYTHONPATH`` set to a checkout: this one, and with ``--before`` an older one
(a ``git worktree`` of the commit to compare with). Writes ``trust_battery.md`` and ``.json``:
per case the exit code, the first line of stderr, and what the case checks afterwards (a
marker file that planted code would write, an input that must be intact, a file that must
not exist).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, machine, machine_line, md_table, write  # noqa: E402

MODEL = """import torch, torch.nn as nn
def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
def other():
    import pathlib; pathlib.Path(__file__).with_name('marker').write_text('other() ran')
    return build_model()
def example_inputs():
    return (torch.randn(4, 64),)
"""
DATA = ("import torch\ndef train_loader():\n    g = torch.Generator().manual_seed(0)\n"
        "    return [(torch.randn(8, 64, generator=g), torch.randint(0, 10, (8,), generator=g))]\n"
        "def val_loader():\n    return train_loader()\n")
RAISING = ("import torch\ndef train_loader():\n    yield (torch.randn(8, 64), torch.zeros(8, dtype=torch.long))\n"
           "    raise ValueError('shard 2 is corrupt')\n")


def _recipe(ck: Path, out: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(ck), framework="pt") as f:
        meta = dict(f.metadata() or {})
    recipe = json.loads(meta["sugarize"])
    edit(recipe)
    try:
        meta["sugarize"] = json.dumps(recipe)
    except RecursionError:
        meta["sugarize"] = "[" * 100_000 + "]" * 100_000
    save_file(load_file(str(ck)), str(out), metadata=meta)


def _deep(recipe):
    out = []
    for _ in range(5000):
        out = [out]
    recipe["report"]["notes"] = out


def _plant_pyc(d: Path):
    import importlib.util
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    src = d / "m.py"
    evil = compile("import pathlib; pathlib.Path(__file__).with_name('marker').write_text('pyc ran')\n" + MODEL,
                   str(src), "exec")
    st = src.stat()
    (d / "__pycache__").mkdir(exist_ok=True)
    Path(importlib.util.cache_from_source(str(src))).write_bytes(
        _code_to_timestamp_pyc(evil, int(st.st_mtime), st.st_size))


def _int_weights(d: Path):
    from safetensors.torch import load_file, save_file

    state = {k: (v * 100).round().to(__import__("torch").int64) for k, v in load_file(str(d / "ck.safetensors")).items()}
    save_file(state, str(d / "int.safetensors"))


_ENV: dict = {}  # the checkout's environment, for setups that run sugarize themselves


def _cli(d: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "sugarize", *args], env=_ENV, capture_output=True, check=True, cwd=d)


HELPER = "import torch.nn as nn\ndef body():\n    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))\n"
FORWARD_MODEL = """import torch, torch.nn as nn, sys
{head}
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    def forward(self, x):
{forward}
        return self.body(x)
def build_model():
    return M()
def example_inputs():
    return (torch.randn(4, 64),)
"""


def _forward_model(name: str, head: str = "", forward: str = "        pass"):
    def setup(d: Path):
        (d / name).write_text(FORWARD_MODEL.format(head=head, forward=forward))
    return setup


def _changed_sibling(d: Path):
    (d / "helper.py").write_text(HELPER)
    (d / "hm.py").write_text(MODEL.replace("import torch, torch.nn as nn", "import torch, torch.nn as nn, helper"))
    _cli(d, "convert", str(d / "hm.py"), "-o", str(d / "hck.safetensors"))
    (d / "helper.py").write_text("import pathlib\npathlib.Path(__file__).with_name('marker').write_text('changed "
                                 "helper ran')\n" + HELPER)


def _weights_named(name: str):
    def setup(d: Path):
        import shutil

        shutil.copy(d / "ck.safetensors", d / "ck-copy.safetensors")
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(d / "ck.safetensors")), str(d / name))
    return setup


def _user_temp(d: Path):
    dead = 2**22 + 12345
    (d / f".notes.sugarize-{dead}-abc.tmp").write_text("my notes")


def _fifo(d: Path):
    os.mkfifo(d / "pipe.py")


def _pkg_sugarize(d: Path):
    # under pkg/: a sugarize/ package in the current folder would be what `python -m sugarize` runs,
    # before any code of ours (Python's own rule)
    (d / "pkg" / "sugarize").mkdir(parents=True)
    (d / "pkg" / "sugarize" / "__init__.py").write_text("")
    (d / "pkg" / "sugarize" / "errors.py").write_text(MODEL)


def _opset99(d: Path):
    import onnx

    m = onnx.load(str(d / "m.onnx"))
    m.opset_import[0].version = 99
    onnx.save(m, str(d / "future.onnx"))


# -- the fourth pass (#39): code that runs late, files the model reads, bounds ----------------------
MARK = "import pathlib\npathlib.Path({marker!r}).write_text('unhashed code ran')\n"


def _converted(d: Path, name: str, source: str, change, ck: str = "ck4.safetensors"):
    """``name`` (in ``d``) holding ``source``, converted to ``ck``; then ``change(d)``, the edit
    after the checkpoint was made."""
    (d / name).parent.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(source)
    _cli(d, "convert", str(d / name), "-o", str(d / ck))
    change(d)


def _mark(d: Path) -> str:
    return MARK.format(marker=str(d / "marker"))


def _late(kind: str):
    """A model whose code imports or reads helper.py by ``kind``, converted; then helper.py
    changed to write the marker."""
    head = {"symlink": "import helper",
            "forward-import": "",
            "thread": "import threading\n_go = threading.Event()\ndef _late():\n    _go.wait()\n    import helper\n"
                      "_t = threading.Thread(target=_late)\n_t.start()",
            "exec": "import os\nexec(open(os.path.join(os.path.dirname(__file__), 'helper.py')).read())",
            "runpy": "import os, runpy\nrunpy.run_path(os.path.join(os.path.dirname(__file__), 'helper.py'))",
            "pickle": "import os, pickle\nwith open(os.path.join(os.path.dirname(__file__), 'state.pkl'), 'rb') as f:\n"
                      "    STATE = pickle.load(f)"}[kind]
    forward = {"forward-import": "        import sys, os\n        sys.path.insert(0, os.path.dirname(__file__))\n"
                                 "        import helper",
               "thread": "        _go.set()\n        _t.join()"}.get(kind, "        pass")

    def setup(d: Path):
        import pickle

        target = d / "helper.py"
        if kind == "symlink":
            (d / "elsewhere").mkdir()
            target = d / "elsewhere" / "helper.py"
            target.write_text("X = 1\n")
            (d / "late").mkdir()
            (d / "late" / "helper.py").symlink_to(target)
        elif kind == "pickle":
            (d / "late").mkdir()
            (d / "late" / "state.pkl").write_bytes(pickle.dumps({"width": 16}))
        else:
            (d / "late").mkdir()
            target = d / "late" / "helper.py"
            target.write_text("X = 1\n")

        def change(d: Path):
            if kind == "pickle":
                cmd = f"touch {d / 'marker'}".encode()
                (d / "late" / "state.pkl").write_bytes(b"cos\nsystem\n(S'" + cmd + b"'\ntR.")
            else:
                target.write_text("X = 1\n" + _mark(d))
        _converted(d, "late/lm.py", FORWARD_MODEL.format(head=head, forward=forward), change)
    return setup


def _package_parent(d: Path):
    (d / "pkg").mkdir()
    (d / "pkg" / "__init__.py").write_text("")
    (d / "shared.py").write_text("W = 16\n")
    _converted(d, "pkg/pm.py", FORWARD_MODEL.format(head="import shared", forward="        pass"),
               lambda d: (d / "shared.py").write_text("W = 16\n" + _mark(d)))


def _package_relative(d: Path):
    (d / "pkgr").mkdir()
    (d / "pkgr" / "__init__.py").write_text("")
    (d / "pkgr" / "sub.py").write_text("Z = 3\n")
    (d / "pkgr" / "rm.py").write_text(FORWARD_MODEL.format(head="", forward="        from . import sub"))


def _helper_sibling(d: Path):
    (d / "helper.py").write_text("X = 1\n")
    _converted(d, "hm4.py", FORWARD_MODEL.format(head="import helper", forward="        pass"), lambda d: None)


def _broken_sibling(d: Path):
    (d / "helper.py").write_bytes((d / "m.onnx").read_bytes()[:200])  # an artifact written over it
    (d / "model2.py").write_text(FORWARD_MODEL.format(head="import helper", forward="        pass"))


def _zipped(d: Path):
    import zipfile

    with zipfile.ZipFile(d / "lib.zip", "w") as z:
        z.writestr("zmod.py", "Q = 1\n")
    (d / "zm.py").write_text(FORWARD_MODEL.format(
        head="import os, sys\nsys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib.zip'))\nimport zmod",
        forward="        pass"))


def _nul_recipe(d: Path):
    _recipe(d / "ck.safetensors", d / "nul.safetensors", lambda r: r["model"].update(relpath="m\x00.py"))


def _renamed_onnx(d: Path):
    import shutil

    shutil.copy(d / "m.onnx", d / "m.pte")


def _symlink_loop(d: Path):
    (d / "loop.py").symlink_to(d / "loop.py")


def _huge_loop(d: Path):
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "one"], ["v_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4, 10])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4, 10])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["n"], value=helper.make_tensor("n", TensorProto.INT64, [], [2**62])),
         helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
         helper.make_node("Gemm", ["x", "w"], ["h"]), helper.make_node("Loop", ["n", "c", "h"], ["y"], body=body)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])],
        [helper.make_tensor("w", TensorProto.FLOAT, [64, 10], [0.0] * 640)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(d / "loop.onnx"))


def _sleeper(d: Path):
    (d / "sleeper.py").write_text(FORWARD_MODEL.format(
        head="import threading, time\nthreading.Thread(target=time.sleep, args=(600,), name='sleeper').start()",
        forward="        pass"))


# (name, class, setup(folder) or None, args (with {d} for the folder), checks: {kind: file name})
CASES = [
    ("recipe names another function of the file, --model FILE", "1 code not named",
     lambda d: _recipe(d / "ck.safetensors", d / "other.safetensors", lambda r: r["model"].update(name="other")),
     ["inspect", "{d}/other.safetensors", "--model", "{d}/m.py"], {"not_created": "marker"}),
    ("planted __pycache__/m.cpython-*.pyc, --model", "1 code not named", _plant_pyc,
     ["export", "{d}/ck.safetensors", "--model", "{d}/m.py", "-o", "{d}/x.onnx"], {"not_created": "marker"}),
    ("openvino.py beside the model, verify --runtime openvino", "1 code not named",
     lambda d: (d / "openvino.py").write_text("import pathlib\npathlib.Path(__file__).with_name('marker')"
                                              ".write_text('stand-in ran')\n"),
     ["verify", "{d}/m.onnx", "--against", "{d}/m.py", "--runtime", "openvino"], {"not_created": "marker"}),
    ("audit --plot onto an existing file, no --force", "2 files lost",
     lambda d: (d / "plot.png").write_text("mine"),
     ["audit", "{d}/m.py", "--data", "{d}/data.py", "--plot", "{d}/plot.png"], {"intact": "plot.png"}),
    ("convert m.py -o m.py --force", "2 files lost", None,
     ["convert", "{d}/m.py", "-o", "{d}/m.py", "--force"], {"intact": "m.py"}),
    ("finetune ck -o ck --force", "2 files lost", None,
     ["finetune", "{d}/ck.safetensors", "--model", "{d}/m.py", "--data", "{d}/data.py", "-o", "{d}/ck.safetensors",
      "--force"], {"intact": "ck.safetensors"}),
    ("export ck -o ck --force", "2 files lost", None,
     ["export", "{d}/ck.safetensors", "--model", "{d}/m.py", "-o", "{d}/ck.safetensors", "--force"],
     {"intact": "ck.safetensors"}),
    ("recipe nested 5,000 deep", "3 exit 3 on mistakes",
     lambda d: _recipe(d / "ck.safetensors", d / "deep.safetensors", _deep), ["inspect", "{d}/deep.safetensors"], {}),
    ("recipe site with an extra key", "3 exit 3 on mistakes",
     lambda d: _recipe(d / "ck.safetensors", d / "extra.safetensors",
                       lambda r: r["report"]["sites"][0].update(bogus=1)),
     ["inspect", "{d}/extra.safetensors"], {}),
    ("recipe config.relufy holding a number", "3 exit 3 on mistakes",
     lambda d: _recipe(d / "ck.safetensors", d / "relufy.safetensors", lambda r: r["config"].update(relufy=3)),
     ["export", "{d}/relufy.safetensors", "--model", "{d}/m.py", "-o", "{d}/x.onnx"], {"not_created": "x.onnx"}),
    ("data loader raising while iterated (finetune)", "3 exit 3 on mistakes",
     lambda d: (d / "raising.py").write_text(RAISING),
     ["finetune", "{d}/ck.safetensors", "--model", "{d}/m.py", "--data", "{d}/raising.py", "-o", "{d}/w.safetensors"],
     {"not_created": "w.safetensors"}),
    ("data loader raising in int8 calibration", "3 exit 3 on mistakes",
     lambda d: (d / "raising.py").write_text(RAISING),
     ["export", "{d}/m.py", "--int8", "--data", "{d}/raising.py", "-o", "{d}/q.onnx"], {"not_created": "q.onnx"}),
    ("--plot with an unknown suffix", "3 exit 3 on mistakes", None,
     ["audit", "{d}/m.py", "--data", "{d}/data.py", "--plot", "{d}/p.xyz"], {"not_created": "p.xyz"}),
    ("demo --out onto an existing file", "3 exit 3 on mistakes", lambda d: (d / "afile").write_text("x"),
     ["demo", "--quick", "--out", "{d}/afile"], {"intact": "afile"}),
    ("--seed 2**70", "3 exit 3 on mistakes", None,
     ["finetune", "{d}/ck.safetensors", "--model", "{d}/m.py", "--data", "{d}/data.py", "-o", "{d}/w.safetensors",
      "--seed", str(2**70)], {"not_created": "w.safetensors"}),
    ("model file calling sys.exit(0) at import", "4 wrong exit codes",
     lambda d: (d / "exits.py").write_text("import sys\nsys.exit(0)\n"),
     ["convert", "{d}/exits.py", "-o", "{d}/e.safetensors"], {"not_created": "e.safetensors"}),
    ("model factory calling sys.exit(1)", "4 wrong exit codes",
     lambda d: (d / "exits1.py").write_text("import sys\ndef build_model():\n    sys.exit(1)\n"),
     ["export", "{d}/exits1.py", "-o", "{d}/e.onnx"], {"not_created": "e.onnx"}),
    ("--debug on a missing model file", "4 wrong exit codes", None,
     ["--debug", "inspect", "{d}/missing.py"], {}),
    ("audit --split bogus", "4 wrong exit codes", None,
     ["audit", "{d}/m.py", "--data", "{d}/data.py", "--split", "bogus"], {}),
    ("verify --atol nan", "4 wrong exit codes", None,
     ["verify", "{d}/m.onnx", "--against", "{d}/m.py", "--atol", "nan"], {}),
    ("verify --atol -1", "4 wrong exit codes", None,
     ["verify", "{d}/m.onnx", "--against", "{d}/m.py", "--atol", "-1"], {}),
    ("verify a file declaring opset 99 (no --opset given)", "5 messages", _opset99,
     ["verify", "{d}/future.onnx", "--against", "{d}/m.py"], {}),
    ("an existing folder as -o", "5 messages", lambda d: (d / "outdir").mkdir(),
     ["convert", "{d}/m.py", "-o", "{d}/outdir"], {}),
    ("integer weights into a float model", "5 messages", _int_weights,
     ["export", "{d}/ck.safetensors", "--model", "{d}/m.py:build_model", "--weights", "{d}/int.safetensors",
      "-o", "{d}/w.onnx"], {}),
    # the third pass (#32)
    ("sibling helper.py changed after convert, export --model", "6 code not hashed", _changed_sibling,
     ["export", "{d}/hck.safetensors", "--model", "{d}/hm.py", "-o", "{d}/x.onnx"],
     {"not_created": "marker", "not_created ": "x.onnx"}),
    ("--model together with --trust-recipe", "6 code not hashed", None,
     ["export", "{d}/ck.safetensors", "--model", "{d}/m.py", "--trust-recipe", "-o", "{d}/x.onnx"],
     {"not_created": "x.onnx"}),
    ("convert --config cfg.json -o cfg.json --force", "7 outputs eat inputs",
     lambda d: (d / "cfg.json").write_text('{"surrogate": "bsilu"}'),
     ["convert", "{d}/m.py", "--config", "{d}/cfg.json", "-o", "{d}/cfg.json", "--force"], {"intact": "cfg.json"}),
    ("export --int8 whose OUT.int8.onnx is the --weights file", "7 outputs eat inputs", _weights_named("q.int8.onnx"),
     ["export", "{d}/m.py", "--weights", "{d}/q.int8.onnx", "-o", "{d}/q.onnx", "--int8", "--data", "{d}/data.py",
      "--force"], {"intact": "q.int8.onnx"}),
    ("export --external-data whose OUT.onnx.data is the --weights file", "7 outputs eat inputs",
     _weights_named("e.onnx.data"),
     ["export", "{d}/m.py", "--weights", "{d}/e.onnx.data", "-o", "{d}/e.onnx", "--external-data", "--force"],
     {"intact": "e.onnx.data"}),
    ("sweep -o x.png --plot x.png", "7 outputs eat inputs", None,
     ["sweep", "{d}/m.py", "--data", "{d}/data.py", "-o", "{d}/x.png", "--plot", "{d}/x.png", "--steps", "1"],
     {"not_created": "x.png"}),
    ("demo --out DIR holding a demo.png, no --force", "7 outputs eat inputs",
     lambda d: (d / "demo.png").write_text("mine"), ["demo", "--quick", "--out", "{d}"], {"intact": "demo.png"}),
    ("a user's file matching the temp-name pattern", "7 outputs eat inputs", _user_temp,
     ["convert", "{d}/m.py", "-o", "{d}/c.safetensors"], {"intact": ".notes.sugarize-4206649-abc.tmp"}),
    ("BaseException subclass raised in forward (export)", "8 user code's failures",
     _forward_model("boom.py", "class Boom(BaseException):\n    pass", "        raise Boom('x')"),
     ["export", "{d}/boom.py", "-o", "{d}/x.onnx"], {"not_created": "x.onnx"}),
    ("GeneratorExit raised in forward (export)", "8 user code's failures",
     _forward_model("gen.py", "", "        raise GeneratorExit()"),
     ["export", "{d}/gen.py", "-o", "{d}/x.onnx"], {"not_created": "x.onnx"}),
    ("sys.exit(0) in forward (export)", "8 user code's failures",
     _forward_model("ex0.py", "", "        sys.exit(0)"), ["export", "{d}/ex0.py", "-o", "{d}/x.onnx"],
     {"not_created": "x.onnx"}),
    ("module-level __getattr__ that raises", "8 user code's failures",
     _forward_model("ga.py", "def __getattr__(name):\n    raise RuntimeError('no ' + name)"),
     ["inspect", "{d}/ga.py"], {}),
    ("parameters() that raises", "8 user code's failures",
     _forward_model("pr.py", "", "        pass\n    def parameters(self, recurse=True):\n        raise ValueError('x')"),
     ["convert", "{d}/pr.py", "-o", "{d}/p.safetensors"], {"not_created": "p.safetensors"}),
    ("loss_fn returning a constant (finetune)", "8 user code's failures",
     lambda d: (d / "const.py").write_text(DATA + "def loss_fn(out, y):\n    return torch.tensor(1.0)\n"),
     ["finetune", "{d}/ck.safetensors", "--model", "{d}/m.py", "--data", "{d}/const.py", "-o", "{d}/w.safetensors"],
     {"not_created": "w.safetensors"}),
    ("model file lowering the recursion limit", "8 user code's failures",
     _forward_model("rec.py", "sys.setrecursionlimit(80)"), ["export", "{d}/rec.py", "-o", "{d}/x.onnx"], {}),
    ("model file at sugarize/errors.py (a package named sugarize)", "8 user code's failures", _pkg_sugarize,
     ["inspect", "{d}/pkg/sugarize/errors.py"], {}),
    ("a FIFO as the model file", "9 environment", _fifo, ["inspect", "{d}/pipe.py"], {}),
    ("--epochs 2**64", "9 environment", None,
     ["finetune", "{d}/ck.safetensors", "--model", "{d}/m.py", "--data", "{d}/data.py", "-o", "{d}/w.safetensors",
      "--epochs", str(2**64)], {"not_created": "w.safetensors"}),
    ("a model path holding [/]", "10 paths are data", None, ["inspect", "{d}/a[/]b.py"], {}),
    ("a 252-character output name", "11 smaller", None,
     ["convert", "{d}/m.py", "-o", "{d}/" + "n" * 240 + ".safetensors"], {}),
    ("a dangling symlink as the output", "11 smaller", lambda d: (d / "link.safetensors").symlink_to(d / "gone" / "x"),
     ["convert", "{d}/m.py", "-o", "{d}/link.safetensors"], {}),
    # the fourth pass (#39)
    ("symlinked sibling whose target changed after convert", "12 code that runs late", _late("symlink"),
     ["export", "{d}/ck4.safetensors", "--model", "{d}/late/lm.py", "-o", "{d}/x.onnx"], {"not_created": "marker"}),
    ("package model importing from the package's parent folder, changed", "12 code that runs late", _package_parent,
     ["export", "{d}/ck4.safetensors", "--model", "{d}/pkg/pm.py", "-o", "{d}/x.onnx"], {"not_created": "marker"}),
    ("import in forward() after the file put its folder on sys.path", "12 code that runs late",
     _late("forward-import"), ["export", "{d}/ck4.safetensors", "--model", "{d}/late/lm.py", "-o", "{d}/x.onnx"],
     {"not_created": "marker"}),
    ("a thread the model started imports a sibling late", "12 code that runs late", _late("thread"),
     ["export", "{d}/ck4.safetensors", "--model", "{d}/late/lm.py", "-o", "{d}/x.onnx"], {"not_created": "marker"}),
    ("exec(open('helper.py').read()) of a changed file", "12 code that runs late", _late("exec"),
     ["export", "{d}/ck4.safetensors", "--model", "{d}/late/lm.py", "-o", "{d}/x.onnx"], {"not_created": "marker"}),
    ("runpy.run_path of a changed file", "12 code that runs late", _late("runpy"),
     ["export", "{d}/ck4.safetensors", "--model", "{d}/late/lm.py", "-o", "{d}/x.onnx"], {"not_created": "marker"}),
    ("pickle.load of a changed file in the model's folder", "12 code that runs late", _late("pickle"),
     ["export", "{d}/ck4.safetensors", "--model", "{d}/late/lm.py", "-o", "{d}/x.onnx"], {"not_created": "marker"}),
    ("export -o helper.py --force (the model's own sibling)", "13 output over the model's files", _helper_sibling,
     ["export", "{d}/ck4.safetensors", "--model", "{d}/hm4.py", "-o", "{d}/helper.py", "--force"],
     {"intact": "helper.py"}),
    ("finetune --lr 1e308", "14 bounds and messages", None,
     ["finetune", "{d}/ck.safetensors", "--model", "{d}/m.py", "--data", "{d}/data.py", "-o", "{d}/w.safetensors",
      "--lr", "1e308"], {"not_created": "w.safetensors"}),
    ("recipe model path with a NUL byte, --trust-recipe", "14 bounds and messages", _nul_recipe,
     ["export", "{d}/nul.safetensors", "--trust-recipe", "-o", "{d}/x.onnx"], {"not_created": "x.onnx"}),
    ("a valid .onnx renamed .pte, verify", "14 bounds and messages", _renamed_onnx,
     ["verify", "{d}/m.pte", "--against", "{d}/m.py"], {}),
    ("a sibling clobbered by an artifact, convert", "14 bounds and messages", _broken_sibling,
     ["convert", "{d}/model2.py", "-o", "{d}/b.safetensors"], {"not_created": "b.safetensors"}),
    ("from . import sub in forward() of a package model, convert", "14 bounds and messages", _package_relative,
     ["convert", "{d}/pkgr/rm.py", "-o", "{d}/r.safetensors"], {}),
    ("a model importing from lib.zip in its folder", "14 bounds and messages", _zipped,
     ["convert", "{d}/zm.py", "-o", "{d}/z.safetensors"], {"not_created": "z.safetensors"}),
    ("a symlink loop as the model file", "14 bounds and messages", _symlink_loop, ["inspect", "{d}/loop.py"], {}),
    ("-o x.onnx --format pte", "14 bounds and messages", None,
     ["export", "{d}/m.py", "-o", "{d}/x.onnx", "--format", "pte"], {"not_created": "x.onnx"}),
    ("an ONNX Loop of 2**62 trips, verify --runtime openvino", "14 bounds and messages", _huge_loop,
     ["verify", "{d}/loop.onnx", "--against", "{d}/m.py", "--runtime", "openvino"], {}),
    ("--backend portable prints cpuinfo lines", "15 noise", None,
     ["export", "{d}/m.py", "-o", "{d}/p.pte", "--backend", "portable"], {}),
    ("a model file leaving a non-daemon thread running", "16 the CLI ends", _sleeper, ["inspect", "{d}/sleeper.py"],
     {}),
]


def _prepare(d: Path, checkout: Path) -> None:
    (d / "m.py").write_text(MODEL)
    (d / "data.py").write_text(DATA)
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    for args in (["convert", str(d / "m.py"), "-o", str(d / "ck.safetensors")],
                 ["export", str(d / "m.py"), "-o", str(d / "m.onnx")]):
        subprocess.run([sys.executable, "-m", "sugarize", *args], env=env, capture_output=True, check=True, cwd=d)


def run_case(case, checkout: Path) -> dict:
    name, klass, setup, args, checks = case
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _prepare(d, checkout)
        env = {**os.environ, "PYTHONPATH": str(checkout), "COLUMNS": "2000"}
        _ENV.clear()
        _ENV.update(env)
        if setup:
            setup(d)
        before = {f: (d / f).read_bytes() for f in checks.values() if (d / f).is_file()}
        try:
            res = subprocess.run([sys.executable, "-m", "sugarize", *[a.format(d=d) for a in args]], env=env,
                                 capture_output=True, text=True, cwd=d, timeout=120)
        except subprocess.TimeoutExpired:  # a FIFO read blocks forever: killed after 120 s
            res = subprocess.CompletedProcess(args, "timeout", "", "(no answer in 120 s: killed)")
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        first = lines[0] if lines else (res.stdout.strip().splitlines() or [""])[0]
        first = first.replace(str(d), "<dir>")
        kept = []
        for kind, f in checks.items():
            kind, p = kind.strip(), d / f
            if kind == "not_created":
                kept.append(f"{f} absent" if not p.exists() else f"{f} WRITTEN")
            elif kind == "intact":
                kept.append(f"{f} intact" if p.is_file() and p.read_bytes() == before.get(f) else
                            f"{f} REPLACED" if p.exists() else f"{f} DELETED")
        warned = "warn" in res.stderr.lower() or "change when cast" in res.stderr
        return {"case": name, "class": klass, "exit": res.returncode, "first_line": first[:200],
                "stderr_lines": len(lines), "traceback": "Traceback" in res.stderr, "checks": ", ".join(kept),
                "warned": warned}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, default=None, help="an older checkout to compare with")
    ap.add_argument("--before-label", default="before")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cases", default=None, help="run only the cases whose name holds this text, or whose class "
                    "starts with it (comma-separated); the other rows are taken from the committed results")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    chosen = [c for c in CASES if args.cases is None or any(w in c[0] or c[1].startswith(w)
                                                            for w in args.cases.split(","))]
    after = {c[0]: run_case(c, ROOT) for c in chosen}
    before = {c[0]: run_case(c, args.before) for c in chosen} if args.before else None
    if args.cases is not None:  # the rest from the last full run
        old = json.loads(((args.out or RESULTS) / "trust_battery.json").read_text())
        after = {**{r["case"]: r for r in old["after"]}, **after}
        if before is not None:
            before = {**{r["case"]: r for r in old["before"] or []}, **before}
    after = [after[c[0]] for c in CASES]
    before = [before[c[0]] for c in CASES] if before else None
    m = machine()
    md = ["# Careless and hostile inputs through the CLI", "",
          f"`python benchmarks/trust_battery.py{' --before ' + args.before_label if args.before else ''}` on "
          f"{machine_line(m)}. Each case: a fresh folder, a fresh `python -m sugarize` process; *checks*: what "
          "must hold afterwards (planted code's marker absent, an input intact, nothing written).", ""]
    rows = []
    for i, a in enumerate(after):
        row = [a["class"], a["case"]]
        if before:
            b = before[i]
            row += [str(b["exit"]) + (" +traceback" if b["traceback"] else ""), f"`{b['first_line'][:90]}`",
                    b["checks"] or f"{b['stderr_lines']} stderr line(s)"]
        row += [str(a["exit"]) + (" +traceback" if a["traceback"] else ""), f"`{a['first_line'][:120]}`",
                a["checks"] or f"{a['stderr_lines']} stderr line(s)"]
        rows.append(row)
    head = ["class", "input"]
    if before:
        head += [f"{args.before_label}: exit", "first line", "checks"]
    head += ["now: exit", "first line", "checks"]
    md += [md_table(head, rows), "", f"Total: {time.perf_counter() - start:.0f} s."]
    write("trust_battery", "\n".join(md) + "\n", {"machine": m, "after": after, "before": before}, args.out)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

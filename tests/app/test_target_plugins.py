"""A deploy target from outside the package, through the stock CLI: one class in this file, one
``register_target`` call (or an entry point), and `sugarize export` / `verify` take it, its own
flag included; its negative control fails. And a file's kind comes from its bytes: an ONNX
file named ``.pte`` verifies as ONNX."""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sugarize
from sugarize.app.cli import app
from sugarize.deploy.artifact import ExportResult, Structure, file_digest
from sugarize.deploy.targets import TARGETS, load_entry_points, target_of_file, unregister_target
from sugarize.errors import InputError

from helpers import MODELS

runner = CliRunner()
MLP = str(MODELS / "dead_mlp.py")
MAGIC = b'{"toy-mlp": 1'

TWIN = """
import torch, torch.nn as nn
import importlib.util
spec = importlib.util.spec_from_file_location("dead_mlp_fixture", {path!r})
fixture = importlib.util.module_from_spec(spec); spec.loader.exec_module(fixture)

def build_model():
    m = fixture.build_model()
    for i, layer in enumerate(m.body):
        if isinstance(layer, nn.ReLU):
            m.body[i] = nn.LeakyReLU({slope})
    return m

example_inputs = fixture.example_inputs
"""


class ToyRunner:
    def __init__(self, path, dtype):
        self.layers = json.loads(Path(path).read_text())["layers"]
        self.dtype = dtype
        self.inputs, self.outputs = ["x"], ["y"]
        self.version, self.providers, self.optimization = "toy-numpy 1", ["numpy"], "none"

    def run(self, arrays):
        x = arrays[0].astype(self.dtype)
        for layer in self.layers:
            if layer["op"] == "linear":
                x = x @ np.asarray(layer["w"], self.dtype).T + np.asarray(layer["b"], self.dtype)
            elif layer["op"] == "relu":
                x = np.maximum(x, 0)
            else:
                x = np.where(x > 0, x, x * layer["slope"])
        return [x.astype(np.float32)]


class ToyTarget(sugarize.Target):
    """A JSON list of Linear / ReLU / LeakyReLU layers, run in numpy: what a third-party target
    (LiteRT, Core ML) is to the interface, in 60 lines."""

    name = "toy"
    title = "Toy MLP"
    suffix = ".toy"
    runtimes = ("toy-numpy",)
    options = (sugarize.TargetOption("toy_precision", "--toy-precision", "numpy dtype the toy runtime computes in.",
                                     str, None, ("float32", "float64")),)

    def export(self, model, path, example_args, options):
        ops = {torch.ops.aten.linear.default: "linear", torch.ops.aten.relu.default: "relu",
               torch.ops.aten.leaky_relu.default: "leaky"}
        ep = torch.export.export(model, tuple(example_args))
        state = {**dict(ep.named_parameters()), **dict(ep.named_buffers())}
        sig = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.target}
        layers = []
        for node in ep.graph.nodes:
            if node.op != "call_function":
                continue
            op = ops[node.target]
            layer = {"op": op}
            if op == "linear":
                w, b = (state[sig[a.name]] for a in node.args[1:3])
                layer.update(w=w.tolist(), b=b.tolist())
            if op == "leaky":
                layer["slope"] = float(node.args[1])
            layers.append(layer)
        text = json.dumps({"toy-mlp": 1, "precision": options.toy_precision or "float32", "layers": layers})
        Path(path).write_text(text)
        return ExportResult(Path(path), None, [layer["op"] for layer in layers], ["x"], ["y"], 0, False, format="toy")

    def sniff(self, path, head):
        return head.startswith(MAGIC)

    def check_file(self, path):
        try:
            json.loads(Path(path).read_text())["layers"]
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise InputError(f"{Path(path).name} is not a toy MLP ({exc})") from None

    def runner(self, path, *, runtime=None, optimization="all"):
        return ToyRunner(path, json.loads(Path(path).read_text())["precision"])

    def describe(self, path, *, full=True):
        layers = json.loads(Path(path).read_text())["layers"]
        nodes = tuple((la["op"], "toy", (("slope", la["slope"]),) if "slope" in la else ()) for la in layers)
        params = tuple((np.shape(la["w"]), np.shape(la["b"])) for la in layers if la["op"] == "linear")
        return Structure("toy", (("x",),), (("y",),), nodes, params, digest=file_digest(path))


@pytest.fixture
def toy():
    sugarize.register_target(ToyTarget)
    yield TARGETS["toy"]
    unregister_target("toy")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_a_target_registered_from_outside_exports_verifies_and_fails_its_negative_control(toy, tmp_path):
    out = tmp_path / "m.toy"
    res = run("export", MLP, "-o", out, "--toy-precision", "float64", "--json")  # its own flag, from its declaration
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["format"] == "toy" and data["written"] and data["parity"]["passed"]
    assert json.loads(out.read_text())["precision"] == "float64"  # read back from the artifact
    assert data["parity"]["structure"]["passed"] and data["parity"]["runtime"] == "toy-numpy 1"
    assert [p.name for p in tmp_path.iterdir()] == ["m.toy"]
    renamed = tmp_path / "m.bin"  # told by its bytes
    renamed.write_bytes(out.read_bytes())
    res = run("verify", renamed, "--against", MLP)
    assert res.exit_code == 0 and "structure IDENTICAL" in " ".join(res.stdout.split()), res.output

    # the negative control: the original with LeakyReLU(0.0), which computes ReLU's numbers
    twin = tmp_path / "twin.py"
    twin.write_text(TWIN.format(path=MLP, slope=0.0))
    assert run("export", twin, "-o", tmp_path / "twin.toy").exit_code == 0
    res = run("verify", tmp_path / "twin.toy", "--against", MLP)
    assert res.exit_code == 1 and "structure DIFFERS: graph node 1: toy::leaky(slope=0.0) (reference: toy::relu)" \
        in " ".join(res.stdout.split()), res.output

    res = run("export", MLP, "-o", tmp_path / "x.toy", "--toy-precision", "float16")
    assert res.exit_code == 2 and "--toy-precision 'float16' is not one of float32, float64" in res.output
    res = run("export", MLP, "-o", tmp_path / "x.onnx", "--toy-precision", "float64")
    assert res.exit_code == 2 and "--toy-precision does not apply to --format onnx" in res.output
    res = run("export", MLP, "-o", tmp_path / "x.toy", "--int8", "--data", MLP)
    assert res.exit_code == 2 and "--int8 applies to --format onnx, pte, not toy" in res.output


def test_unregistered_the_target_and_its_flag_are_gone(tmp_path):
    sugarize.register_target(ToyTarget)
    assert "toy" in TARGETS and "--toy-precision" in run("export", "--help").output
    unregister_target("toy")
    assert "toy" not in TARGETS
    res = run("export", MLP, "-o", tmp_path / "m.toy", "--format", "toy")
    assert res.exit_code == 2 and "--format 'toy' is not one of" in res.output
    res = run("export", MLP, "-o", tmp_path / "m.onnx", "--toy-precision", "float64")
    assert res.exit_code == 2 and "No such option: --toy-precision" in res.output


def test_register_target_refuses_a_taken_name_and_a_clashing_option():
    class Other(ToyTarget):
        pass

    class Clash(ToyTarget):
        name = "clash"
        options = (sugarize.TargetOption("opset", "--the-opset", "x", int),)

    sugarize.register_target(ToyTarget, before="onnx")
    try:
        assert list(TARGETS)[0] == "toy"
        with pytest.raises(ValueError, match="a target named 'toy' is registered already"):
            sugarize.register_target(Other)
        with pytest.raises(ValueError, match="option 'opset' is declared as --opset"):
            sugarize.register_target(Clash)
    finally:
        unregister_target("toy")


def test_a_target_installed_as_an_entry_point_works_with_the_stock_command(tmp_path, monkeypatch, capsys):
    """An installed distribution's ``[project.entry-points."sugarize.targets"]``: read when the
    CLI starts (``main``), here with importlib.metadata's entry points monkeypatched."""
    import importlib.metadata

    from sugarize.app import cli

    ep = EntryPoint(name="toy", value=f"{__name__}:ToyTarget", group="sugarize.targets")
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        return [ep] if kw.get("group") == "sugarize.targets" else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(sys, "argv", ["sugarize", "export", MLP, "-o", str(tmp_path / "m.toy"), "--toy-precision",
                                      "float64"])
    try:
        with pytest.raises(SystemExit) as done:
            cli.main()
        assert done.value.code == 0, capsys.readouterr()
        assert "wrote" in capsys.readouterr().out and target_of_file(tmp_path / "m.toy").name == "toy"
        assert load_entry_points() == []  # once per process
    finally:
        unregister_target("toy")


def test_a_broken_entry_point_is_a_warning_and_the_builtins_still_work(monkeypatch):
    import importlib.metadata

    ep = EntryPoint(name="gone", value="no_such_module_xyz:Target", group="sugarize.targets")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [ep])
    with pytest.warns(sugarize.SugarizeWarning, match="the deploy target 'gone' .* was not loaded"):
        assert load_entry_points() == []
    assert "onnx" in TARGETS


def test_an_onnx_file_named_pte_or_ort_verifies_as_onnx(tmp_path):
    assert run("export", MLP, "-o", tmp_path / "m.onnx").exit_code == 0
    for name in ("m.pte", "m.ort"):
        renamed = tmp_path / name
        renamed.write_bytes((tmp_path / "m.onnx").read_bytes())
        res = run("verify", renamed, "--against", MLP)
        assert res.exit_code == 0 and "parity PASS (onnxruntime" in res.stdout, res.output


def test_an_onnx_file_whose_producer_name_looks_like_a_magic_number_is_onnx(tmp_path):
    """protobuf puts ir_version (tag 0x08), then producer_name (0x12, length) first: a producer
    named "ET12..." has "ET" at byte 4, where ExecuTorch's magic number sits."""
    import onnx

    assert run("export", MLP, "-o", tmp_path / "m.onnx").exit_code == 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    for producer in ("ET12-lookalike", "ORTM-lookalike"):
        proto.producer_name = producer
        path = tmp_path / f"{producer}.pte"
        onnx.save(proto, str(path))
        head = path.read_bytes()[:8]
        assert head[4:6] == b"ET" or head[4:8] == b"ORTM"
        assert target_of_file(path).name == "onnx"


def test_sugarize_targets_lists_the_table_a_registered_target_included(toy):
    rows = json.loads(run("targets", "--json").stdout)
    assert [r["format"] for r in rows] == ["onnx", "pte", "ort", "openvino", "toy"]
    toy_row = rows[-1]
    assert toy_row["options"] == ["--toy-precision"] and toy_row["int8"] is None and toy_row["installed"] == "yes"
    assert next(r for r in rows if r["format"] == "onnx")["options"] == [
        "--opset", "--dynamic-batch", "--dynamic-sequence", "--external-data/--no-external-data"]

"""`sugarize export --format ort|pte` and `sugarize verify` on the files they write, as a user runs them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sugarize.app.cli import app

from helpers import FIXTURES, MODELS, ROOT

runner = CliRunner()
MLP = str(MODELS / "dead_mlp.py")
DATA = str(FIXTURES / "digits_data.py")
needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                      reason="the executorch extra is not installed")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_export_ort_by_suffix_writes_both_files_and_verify_reads_the_ort(tmp_path):
    out = tmp_path / "m.ort"
    res = run("export", MLP, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["format"] == "ort" and data["written"] and data["parity"]["passed"]
    assert data["companions"] == [str(tmp_path / "m.required_operators.config")]
    assert data["parity"]["structure"]["operators_equal"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ort", "m.required_operators.config"]
    res = run("verify", out, "--against", MLP)
    assert res.exit_code == 0 and "parity PASS (onnxruntime" in res.stdout, res.output
    assert "operators for a reduced build" in " ".join(res.stdout.split())


def test_an_existing_companion_is_refused_before_any_work(tmp_path):
    (tmp_path / "m.required_operators.config").write_text("mine")
    res = run("export", MLP, "-o", tmp_path / "m.ort")
    assert res.exit_code == 2 and "m.required_operators.config already exists" in res.output
    assert (tmp_path / "m.required_operators.config").read_text() == "mine"
    assert not (tmp_path / "m.ort").exists()


@needs_executorch
def test_export_pte_is_the_originals_program_byte_for_byte_and_verify_passes(tmp_path):
    out = tmp_path / "m.pte"
    res = run("export", MLP, "--format", "pte", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["format"] == "pte" and data["backend"] == "xnnpack" and data["opset"] is None
    assert data["parity"]["passed"] and data["parity"]["structure"]["identical_bytes"]
    assert data["parity"]["runtime"].startswith("executorch ")
    res = run("verify", out, "--against", MLP)
    assert res.exit_code == 0 and "byte-identical" in " ".join(res.stdout.split()), res.output
    res = run("verify", out, "--against", MLP, "--runtime", "openvino")
    assert res.exit_code == 2 and "does not run ExecuTorch files" in res.output


@needs_executorch
def test_export_pte_int8_checks_the_quantised_program_and_prints_accuracy(tmp_path):
    out = tmp_path / "m.pte"
    res = run("export", MLP, "-o", out, "--int8", "--data", DATA, "--calibration-batches", "8", "--json")
    assert res.exit_code == 0, res.output
    q = json.loads(res.stdout)["int8"]
    assert q["path"] == str(tmp_path / "m.int8.pte") and Path(q["path"]).is_file()
    assert q["passed"] and q["structure"]["passed"] and q["qdq_nodes"] > 0
    assert q["scheme"].startswith("PT2E") and 0 <= q["float_accuracy"] <= 1 and 0 <= q["int8_accuracy"] <= 1


@needs_executorch
def test_a_corrupt_pte_is_exit_2_in_one_line(tmp_path):
    good = tmp_path / "m.pte"
    assert run("export", MLP, "-o", good).exit_code == 0
    bad = tmp_path / "bad.pte"
    bad.write_bytes(good.read_bytes()[:500])
    res = run("verify", bad, "--against", MLP)
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "not a readable ExecuTorch program" in res.output


def test_an_option_the_format_does_not_take_is_exit_2(tmp_path):
    res = run("export", MLP, "-o", tmp_path / "m.pte", "--opset", "17")
    assert res.exit_code == 2 and "--opset does not apply to --format pte" in res.output
    res = run("export", MLP, "-o", tmp_path / "m.onnx", "--format", "tflite")
    assert res.exit_code == 2 and "is not one of onnx, openvino, ort, pte" in res.output
    assert list(tmp_path.iterdir()) == []


BLOCK_EXECUTORCH = """
import sys
class _NoExecuTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "executorch" or name.startswith("executorch."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoExecuTorch())
from sugarize.app.cli import main
sys.argv = ["sugarize"] + sys.argv[1:]
main()
"""


def test_without_the_extra_pte_is_exit_2_naming_what_to_install(tmp_path):
    res = subprocess.run([sys.executable, "-c", BLOCK_EXECUTORCH, "export", MLP, "-o", str(tmp_path / "m.pte")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "error: --format pte needs ExecuTorch: pip install 'sugarize[executorch]'"
    assert list(tmp_path.iterdir()) == []


needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the openvino extra is not installed")


@needs_openvino
def test_export_openvino_writes_the_ir_pair_and_verify_refuses_a_missing_or_altered_bin(tmp_path):
    from sugarize.deploy.openvino_target import describe_openvino

    out = tmp_path / "m.xml"
    res = run("export", MLP, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["format"] == "openvino" and data["companions"] == [str(tmp_path / "m.bin")]
    assert data["parity"]["passed"] and data["parity"]["runtime"].startswith("openvino ")
    assert "inference precision f32" in data["parity"]["runtime"]
    assert data["parity"]["structure"]["passed"] and data["parity"]["structure"]["sections"] == \
        ["CPU plugin's executed graph"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    ir = describe_openvino(out)  # read back from the IR: ten ReLUs, fused into the FullyConnected layers
    assert [n[0] for n in ir.nodes].count("Relu") == 10
    assert all(n[0] == "FullyConnected" for n in dict(ir.sections)["CPU plugin's executed graph"])
    res = run("verify", out, "--against", MLP)
    assert res.exit_code == 0 and "parity PASS (openvino" in res.stdout, res.output
    assert "(informative; the verdict is judged at f32)" in " ".join(res.stdout.split())

    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "m.xml").write_bytes(out.read_bytes())
    res = run("verify", lone / "m.xml", "--against", MLP)
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "m.bin (the weights of m.xml) not found beside it" in res.output
    weights = bytearray((tmp_path / "m.bin").read_bytes())
    weights[100] ^= 0xFF
    (lone / "m.bin").write_bytes(bytes(weights))  # same size, one byte changed
    res = run("verify", lone / "m.xml", "--against", MLP)
    assert res.exit_code == 2 and "m.bin is not the weights file m.xml was exported with" in res.output
    (lone / "m.bin").write_bytes(bytes(weights[:1000]))
    res = run("verify", lone / "m.xml", "--against", MLP)
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "Incorrect weights in bin file" in res.output


@needs_openvino
def test_an_existing_bin_is_refused_before_any_work_and_a_contradicting_suffix_is_exit_2(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"mine")
    res = run("export", MLP, "-o", tmp_path / "m.xml")
    assert res.exit_code == 2 and "m.bin already exists" in res.output
    res = run("export", MLP, "-o", tmp_path / "x.onnx", "--format", "openvino")
    assert res.exit_code == 2 and "-o x.onnx is named as ONNX (.onnx) but --format openvino writes OpenVINO IR" \
        in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"] and (tmp_path / "m.bin").read_bytes() == b"mine"

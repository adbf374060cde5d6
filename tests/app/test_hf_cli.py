"""A Hugging Face causal LM through every command, as a user runs it: convert with relufy,
finetune, export, verify, audit; results read back from the files written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import FIXTURES, MODELS

pytest.importorskip("transformers")

from sugarize.app.cli import app  # noqa: E402

runner = CliRunner()
MODEL = str(MODELS / "hf_llama.py")
DATA = str(FIXTURES / "lm_data.py")


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (args, res.output)
    return res


def test_a_relufied_llama_through_convert_finetune_export_verify_and_audit(tmp_path):
    import onnx

    ck, ft, out = tmp_path / "ck.safetensors", tmp_path / "ft.safetensors", tmp_path / "lm.onnx"
    report = json.loads(_ok(["convert", MODEL, "-o", str(ck), "--relufy", "silu", "--json"]).stdout)["report"]
    assert report["capture"] == "modules"
    assert [(s["path"], s["status"], s["capture"]) for s in report["sites"]] == [
        (f"model.layers.{i}.mlp.act_fn", "converted", "modules") for i in range(2)]
    _ok(["finetune", str(ck), "--model", MODEL, "--data", DATA, "--epochs", "1", "--lr", "0.01", "-o", str(ft)])
    res = json.loads(_ok(["export", str(ck), "--model", MODEL, "--weights", str(ft), "-o", str(out), "--json"]).stdout)
    assert res["written"] and res["parity"]["passed"]
    assert any("without the KV cache" in n for n in res["notes"]) and any("relufied sites" in n for n in res["notes"])
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Relu") == 2  # read from the file: the gated MLPs are ReLU, SiLU is gone
    verified = json.loads(_ok(["verify", str(out), "--against", str(ck), "--model", MODEL, "--weights", str(ft),
                               "--json"]).stdout)
    assert verified["passed"] and verified["structure"]["passed"]
    audit = json.loads(_ok(["audit", str(ck), "--model", MODEL, "--weights", str(ft), "--data", DATA,
                            "--json"]).stdout)
    assert [s["path"] for s in audit["sites"]] == [f"model.layers.{i}.mlp.act_fn" for i in range(2)]
    assert audit["samples"] == 16 and all(s["units"] == 64 for s in audit["sites"])

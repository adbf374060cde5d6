"""ONNX: the stripped model exports to the original's graph; an unstripped one still to Relu."""

from __future__ import annotations

import pytest
import torch

import sugarize
from sugarize.export import export_onnx, onnx_op_types

from helpers import load_fixture

FIXTURES = ["all_spellings", "tiny_resnet", "relu_transformer"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Per fixture model: original, converted and stripped-converted exports (shared)."""
    out = {}
    root = tmp_path_factory.mktemp("onnx")
    for name in FIXTURES:
        mod = load_fixture(name)
        model, args = mod.build_model(), mod.example_inputs()
        sm = sugarize.sugarize(model)
        paths = {
            "original": export_onnx(model, root / f"{name}.orig.onnx", args).path,
            "stripped": export_onnx(sugarize.strip(sm), root / f"{name}.stripped.onnx", args).path,
        }
        out[name] = {"model": model, "sugar": sm, "args": args, **paths}
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_stripped_export_has_the_original_op_types_in_order(exported, name):
    e = exported[name]
    orig, stripped = onnx_op_types(e["original"]), onnx_op_types(e["stripped"])
    assert stripped == orig
    relus = sum(1 for s in sugarize.inspect(e["model"]).sites if s.kind == "relu")
    assert orig.count("Relu") == relus > 0


def test_unstripped_model_exported_with_torch_onnx_export_is_plain_relu(exported, tmp_path):
    e = exported["all_spellings"]
    program = torch.onnx.export(e["sugar"].eval(), e["args"], dynamo=True, verbose=False)
    ops = [n.op_type for n in program.model_proto.graph.node]
    assert ops == onnx_op_types(e["original"])
    assert all(n.domain in ("", "ai.onnx") for n in program.model_proto.graph.node)


def test_export_refuses_to_overwrite_without_force(exported, tmp_path):
    e = exported["all_spellings"]
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep")
    with pytest.raises(sugarize.SugarizeError, match="already exists; pass --force"):
        export_onnx(e["model"], target, e["args"], force=False)
    assert target.read_bytes() == b"keep"
    assert list(tmp_path.iterdir()) == [target]

"""ONNX: the stripped model exports to the original's graph; an unstripped one still to Relu."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import sugarize
from sugarize.deploy.export import export_onnx, max_opset, onnx_op_types

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


# --- edge deployment proof: structure, optimised graphs, opsets, dynamic batch, runtimes, int8 ---

@pytest.mark.parametrize("name", FIXTURES)
def test_stripped_export_is_structurally_identical_including_ort_optimised_graph(exported, name):
    from sugarize.deploy.structure import compare_structure

    e = exported[name]
    rep = compare_structure(e["stripped"], e["original"])
    assert rep.passed, rep.differences
    assert rep.inputs_equal and rep.outputs_equal and rep.nodes_equal and rep.initializers_equal
    assert rep.optimized_equal is True and rep.optimized_nodes > 0


def test_ort_fuses_conv_relu_the_same_way(exported, tmp_path):
    from sugarize.deploy.structure import optimized_model

    e = exported["tiny_resnet"]
    def fused(n):  # ORT folds Relu into the Conv before it (NCHWc Conv or FusedConv, activation=Relu)
        return any(a.name == "activation" and a.s == b"Relu" for a in n.attribute)

    nodes = {k: optimized_model(e[k], tmp_path / f"{k}.opt.onnx").graph.node for k in ("original", "stripped")}
    ops = {k: [(n.op_type, n.domain, fused(n)) for n in v] for k, v in nodes.items()}
    assert ops["original"] == ops["stripped"]
    assert sum(f for _, _, f in ops["original"]) >= 7  # the fusion a stray node would block
    assert "Relu" not in [op for op, _, _ in ops["original"]][:3]


def _swap_one_relu(model):
    import copy

    import torch.nn as nn

    m = copy.deepcopy(model)
    name = next(n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU))
    parent, _, leaf = name.rpartition(".")
    setattr(m.get_submodule(parent) if parent else m, leaf, nn.LeakyReLU(0.1))
    return m


def test_a_different_graph_is_reported_with_its_first_differing_node(exported, tmp_path):
    from sugarize.deploy.structure import compare_structure

    e = exported["tiny_resnet"]
    leaky = export_onnx(_swap_one_relu(e["model"]), tmp_path / "leaky.onnx", e["args"]).path
    rep = compare_structure(leaky, e["original"])
    assert not rep.passed and not rep.nodes_equal
    assert "LeakyRelu" in rep.first_difference and "reference: Relu" in rep.first_difference
    report = sugarize.verify(leaky, e["model"], e["args"], reference_artifact=e["original"])
    assert not report.passed and "structure DIFFERS" in report.summary()


def test_the_papers_fgi_form_exported_without_strip_differs(exported, tmp_path):
    """Forward gradient injection leaves extra nodes in the export; the check must catch it."""
    import torch.nn as nn

    from sugarize.deploy.structure import compare_structure

    class FGI(nn.Module):
        def forward(self, x):
            s = (x + 1.67) * torch.sigmoid(x) - 0.835
            return s - s.detach() + torch.relu(x).detach()

    e = exported["tiny_resnet"]
    model = e["model"]
    import copy

    fgi = copy.deepcopy(model)
    fgi.relu = FGI()
    path = export_onnx(fgi, tmp_path / "fgi.onnx", e["args"]).path
    rep = compare_structure(path, e["original"])
    assert not rep.passed and rep.first_difference.startswith("graph node")


@pytest.mark.parametrize("opset", list(range(13, max_opset() + 1)))
def test_every_opset_from_13_to_torchs_maximum_is_the_file_s_opset_and_passes_parity_and_structure(
        exported, tmp_path, opset):
    """--opset N, 13 to torch's ONNX_MAX_OPSET (23 in torch 2.13): the file declares N (read back
    from its opset_import, not from our argument), and passes parity and the structure check
    against the original at N."""
    import onnx

    from sugarize.deploy.export import default_opset

    assert default_opset() >= 18
    for name in ("all_spellings", "tiny_resnet", "relu_transformer"):
        e = exported[name]
        res = export_onnx(e["sugar"], tmp_path / f"{name}.{opset}.onnx", e["args"], opset=opset)
        declared = [(o.domain, o.version) for o in onnx.load(str(res.path)).opset_import if o.domain in ("", "ai.onnx")]
        assert declared == [("", opset)] and res.opset == opset, (name, declared)
        ref = export_onnx(e["model"], tmp_path / f"{name}.{opset}.orig.onnx", e["args"], opset=opset)
        assert res.op_types.count("Relu") == ref.op_types.count("Relu") == onnx_op_types(e["original"]).count("Relu")
        report = sugarize.verify(res.path, e["model"], e["args"], stripped=sugarize.strip(e["sugar"]),
                                 reference_artifact=ref.path, batches=1)
        assert report.passed, report.summary()


def test_opset_13_with_a_dynamic_batch(exported, tmp_path):
    e = exported["tiny_resnet"]
    res = export_onnx(e["sugar"], tmp_path / "dyn13.onnx", e["args"], opset=13, dynamic_batch=True)
    ref = export_onnx(e["model"], tmp_path / "dyn13.orig.onnx", e["args"], opset=13, dynamic_batch=True)
    report = sugarize.verify(res.path, e["model"], e["args"], reference_artifact=ref.path, batch_sizes=(1, 8), batches=1)
    assert report.passed, report.summary()
    assert res.opset == 13 and report.batches == 2


@pytest.mark.parametrize("opset", [12, max_opset() + 1])
def test_an_opset_out_of_range_is_refused_naming_the_lowest_that_works(exported, tmp_path, opset):
    e = exported["all_spellings"]
    with pytest.raises(sugarize.SugarizeError, match=r"--opset %d is not supported.*lowest that works is 13" % opset):
        export_onnx(e["sugar"], tmp_path / "m.onnx", e["args"], opset=opset)
    assert list(tmp_path.iterdir()) == []


def _poisoned(model, value):
    import copy

    bad = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in bad.parameters() if p.dim() > 1).view(-1)[0] = value
    return bad


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_parity_fails_when_weights_hold_nan_or_inf(exported, tmp_path, value):
    """NaN or inf reaching the outputs is never a PASS (polygraphy's rule), and the export warns."""
    e = exported["tiny_resnet"]
    bad = _poisoned(e["model"], value)
    with pytest.warns(UserWarning, match="weights hold NaN or inf"):
        res = export_onnx(bad, tmp_path / "bad.onnx", e["args"])
    assert any("NaN or inf" in n for n in res.notes)
    report = sugarize.verify(res.path, bad, e["args"], batches=1)
    assert not report.passed and "NaN/inf on both sides" in report.summary(), report.summary()
    assert sum(o.nonfinite for o in report.outputs) > 0
    assert sugarize.verify(res.path, bad, e["args"], batches=1, allow_nonfinite=True).passed
    # the file computes NaN/inf where the model does not: a mismatch, whatever is allowed
    report = sugarize.verify(res.path, e["model"], e["args"], batches=1, allow_nonfinite=True)
    assert not report.passed and sum(o.mismatched for o in report.outputs) > 0


def test_one_sided_nonfinite_values_are_mismatches():
    import numpy as np

    from sugarize.deploy.parity import _compare

    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for ort in ([np.nan, 2, 3, 4], [np.inf, 2, 3, 4], [1, 2, 3, -np.inf]):
        r = _compare("y", "original", np.array(ort, dtype=np.float32), ref, 1e-5, 1e-5, allow_nonfinite=True)
        assert not r.passed and r.mismatched == 1 and r.max_abs == float("inf")
    inf_ref = torch.tensor([np.inf, 1.0])
    assert not _compare("y", "original", np.array([-np.inf, 1.0], dtype=np.float32), inf_ref, 1e-5, 1e-5, True).passed
    assert _compare("y", "original", np.array([np.inf, 1.0], dtype=np.float32), inf_ref, 1e-5, 1e-5, True).passed
    assert not _compare("y", "original", np.array([np.inf, 1.0], dtype=np.float32), inf_ref, 1e-5, 1e-5).passed


def test_dynamic_batch_export_passes_parity_at_batch_1_and_8(exported, tmp_path):
    e = exported["tiny_resnet"]
    res = export_onnx(e["sugar"], tmp_path / "dyn.onnx", e["args"], dynamic_batch=True)
    ref = export_onnx(e["model"], tmp_path / "dyn.orig.onnx", e["args"], dynamic_batch=True)
    report = sugarize.verify(res.path, e["model"], e["args"], reference_artifact=ref.path, batch_sizes=(1, 8), batches=1)
    assert report.passed, report.summary()
    assert sorted({o.shape[0] for o in report.outputs}) == [1, 8]
    assert report.batches == 2 and report.structure.inputs_equal


def test_openvino_parity_in_float32(exported):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'sugarize[openvino]')")
    for name in FIXTURES:
        e = exported[name]
        report = sugarize.verify(e["stripped"], e["model"], e["args"], stripped=sugarize.strip(e["sugar"]),
                                 runtime="openvino", batches=2)
        assert report.passed, report.summary()
        assert report.runtime.startswith("openvino") and "precision f32" in report.runtime
        assert report.notes and "informative" in report.notes[0]


def test_int8_demo_model_keeps_accuracy_and_qdq_structure(tmp_path):
    from sugarize.app.demo import DeepMLP
    from sugarize.training.digits import load_digits_split, loader
    from sugarize.deploy.quantize import onnx_accuracy, qdq_count, quantize_int8
    from sugarize.deploy.structure import compare_structure
    from sugarize.training.train import DataSpec, finetune

    (xt, yt), (xv, yv) = load_digits_split()
    data = DataSpec(lambda: loader(xt, yt, 64, shuffle=True), None, torch.nn.functional.cross_entropy)
    torch.manual_seed(0)
    relu = DeepMLP()  # the demo's model and pretraining recipe, a shorter fine-tune
    finetune(relu, data, epochs=10, lr=0.01, optimizer="adamw", seed=0, audit_dead=False)
    sm = sugarize.sugarize(relu)
    finetune(sm, data, epochs=3, lr=0.003, seed=1, audit_dead=False)
    original = DeepMLP()
    original.load_state_dict(sm.state_dict())
    args = (xt[:32],)
    f_sugar = export_onnx(sm, tmp_path / "sugar.onnx", args, dynamic_batch=True).path
    f_orig = export_onnx(original, tmp_path / "orig.onnx", args, dynamic_batch=True).path
    calib = [(xt[i:i + 64].numpy(),) for i in range(0, 640, 64)]
    q_sugar = quantize_int8(f_sugar, tmp_path / "sugar.int8.onnx", calib)
    q_orig = quantize_int8(f_orig, tmp_path / "orig.int8.onnx", calib)
    rep = compare_structure(q_sugar, q_orig)
    assert rep.passed, rep.differences
    assert qdq_count(q_sugar) > 0
    val = [(xv.numpy(), yv.numpy())]
    acc_f, acc_q = onnx_accuracy(f_sugar, val), onnx_accuracy(q_sugar, val)
    assert acc_f > 0.85
    assert abs(acc_f - acc_q) <= 0.01, (acc_f, acc_q)


def test_cli_export_int8_and_verify_with_openvino(tmp_path):
    from typer.testing import CliRunner

    from helpers import FIXTURES
    from sugarize.app.cli import app

    model = tmp_path / "mlp.py"
    model.write_text("import torch\nfrom sugarize.app.demo import DeepMLP\n"
                     "def build_model():\n    torch.manual_seed(0)\n    return DeepMLP(depth=3, width=16)\n"
                     "def example_inputs():\n    return (torch.randn(4, 64),)\n")
    out = tmp_path / "mlp.onnx"
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(model), "-o", str(out), "--int8", "--data",
                              str(FIXTURES / "digits_data.py"), "--calibration-batches", "4", "--dynamic-batch"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "structure IDENTICAL" in text and "QDQ structure identical to the quantised original" in text
    assert "float32" in text and (tmp_path / "mlp.int8.onnx").exists()
    res = runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "x.onnx"), "--int8"])
    assert res.exit_code == 2 and "--int8 needs calibration data" in res.stderr
    assert not (tmp_path / "x.onnx").exists()
    if importlib.util.find_spec("openvino") is not None:
        res = runner.invoke(app, ["verify", str(out), "--against", str(model), "--runtime", "openvino"])
        assert res.exit_code == 0, res.output
        assert "openvino" in res.output and "informative" in " ".join(res.output.split())


@pytest.mark.parametrize("name", ["relu_in_all_but_name", "all_spellings"])
def test_strip_gives_back_each_spelling_so_the_export_is_the_originals_op_for_op(tmp_path, name):
    """Before, strip wrote every site back as relu: clamp(min=0) exported Max before conversion
    and Relu after strip, and the structure check failed on the user's own model."""
    mod = load_fixture(name)
    model, args = mod.build_model(), mod.example_inputs()
    sm = sugarize.sugarize(model)
    assert len(sugarize.report_of(sm).converted) == (7 if name == "relu_in_all_but_name" else 8)
    plain = sugarize.strip(sm)
    x = torch.randn(64, 16) * 3
    from helpers import same_bits

    assert same_bits(plain(x), model(x))
    orig = export_onnx(model, tmp_path / "orig.onnx", args)
    res = export_onnx(sm, tmp_path / "stripped.onnx", args)  # export strips it
    assert onnx_op_types(res.path) == onnx_op_types(orig.path)
    if name == "relu_in_all_but_name":
        assert onnx_op_types(orig.path).count("Relu") == 1  # the others are not spelled Relu in ONNX
    report = sugarize.verify(res.path, model, args, stripped=plain, reference_artifact=orig.path, batches=1)
    assert report.passed, report.summary()


def test_verify_takes_a_file_torch_onnx_export_wrote_with_its_defaults(exported, tmp_path):
    """torch.onnx.export's own default opset (20 in torch 2.13) was refused before, naming a flag
    the user never passed; verify now builds its reference at the file's opset."""
    import onnx

    from sugarize.app.workflows import verify_file
    from helpers import MODELS

    e = exported["tiny_resnet"]
    own = tmp_path / "own.onnx"
    torch.onnx.export(e["model"].eval(), e["args"], str(own), dynamo=True, verbose=False)  # torch's defaults
    declared = next(o.version for o in onnx.load(str(own)).opset_import if o.domain in ("", "ai.onnx"))
    assert 18 <= declared <= max_opset()
    report = verify_file(str(own), str(MODELS / "tiny_resnet.py"), batches=1)
    assert report.passed, report.summary()
    assert report.graph is not None and report.graph.passed  # against the original exported at the file's opset
    proto = onnx.load(str(own))
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 99
    bad = tmp_path / "future.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(sugarize.SugarizeError, match=r"future.onnx declares opset 99, which is not supported: "
                                                     r"sugarize exports opsets 13 to %d" % max_opset()) as info:
        verify_file(str(bad), str(MODELS / "tiny_resnet.py"), batches=1)
    assert "--opset" not in str(info.value)


def test_external_data_is_written_beside_the_file_and_read_by_verify_and_structure(exported, tmp_path, monkeypatch):
    """Over the threshold (lowered here from 1.5 GiB) the weights go to model.onnx.data; the
    checker, verify and the structure check read the pair, and nothing else is left."""
    import onnx

    from sugarize.deploy import export as ex
    from sugarize.deploy.structure import compare_structure

    e = exported["tiny_resnet"]
    monkeypatch.setattr(ex, "EXTERNAL_DATA_BYTES", 0)
    res = export_onnx(e["sugar"], tmp_path / "m.onnx", e["args"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert res.external_data == tmp_path / "m.onnx.data" and any("ship both files" in n for n in res.notes)
    proto = onnx.load(str(res.path), load_external_data=False)
    assert proto.graph.initializer and all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
                                           if t.dims and len(t.raw_data) == 0)
    assert (tmp_path / "m.onnx.data").stat().st_size > 0 and (tmp_path / "m.onnx").stat().st_size < 100_000
    report = sugarize.verify(res.path, e["model"], e["args"], stripped=sugarize.strip(e["sugar"]),
                             reference_artifact=e["original"], batches=1)
    assert report.passed, report.summary()
    assert compare_structure(res.path, e["original"]).passed
    # both files or neither: a data file in the way (no --force) stops the pair before anything is written
    (tmp_path / "n.onnx.data").write_text("someone else's")
    with pytest.raises(sugarize.SugarizeError, match="n.onnx.data already exists"):
        export_onnx(e["sugar"], tmp_path / "n.onnx", e["args"], force=False)
    assert not (tmp_path / "n.onnx").exists() and (tmp_path / "n.onnx.data").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "n.onnx.data"]


def test_a_dynamic_sequence_passes_parity_at_several_lengths_and_batch_sizes(exported, tmp_path):
    import onnx

    e = exported["relu_transformer"]
    (ids,) = e["args"]
    res = export_onnx(e["sugar"], tmp_path / "t.onnx", e["args"], dynamic_batch=True, dynamic_sequence=True)
    ref = export_onnx(e["model"], tmp_path / "t.orig.onnx", e["args"], dynamic_batch=True, dynamic_sequence=True)
    dims = [d for d in onnx.load(str(res.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0].dim_param and dims[1].dim_param  # read back: batch and sequence are dynamic in the file
    report = sugarize.verify(res.path, e["model"], e["args"], stripped=sugarize.strip(e["sugar"]),
                             reference_artifact=ref.path, batches=1, batch_sizes=(1, 3), sequence_lengths=(5, ids.shape[1]))
    assert report.passed, report.summary()
    assert report.batches == 4  # every batch size at every length (the model pools over the sequence)
    assert {tuple(o.shape) for o in report.outputs} == {(1, 5), (3, 5)}  # 5 classes


def test_cli_export_with_a_dynamic_sequence_and_external_data_then_verify(tmp_path):
    import json

    from typer.testing import CliRunner

    from helpers import MODELS
    from sugarize.app.cli import app

    model = str(MODELS / "relu_transformer.py")
    out = tmp_path / "t.onnx"
    res = CliRunner().invoke(app, ["export", model, "-o", str(out), "--dynamic-sequence", "--external-data", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["external_data"] == str(out) + ".data" and (tmp_path / "t.onnx.data").exists()
    assert data["parity"]["batches"] == 3 * 2  # 3 seeded batches at lengths 6 and 12
    res = CliRunner().invoke(app, ["verify", str(out), "--against", model, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["batches"] == 3 * 2  # verify reads the dynamic sequence from the file

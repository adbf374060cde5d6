"""Every deploy target (ONNX, ORT format, ExecuTorch) on the fixture models: the stripped SUGAR
model's artifact passes parity in the target's runtime and is structurally identical to the
original's; one LeakyReLU in the original (the negative control) fails structure naming the
first differing node; corrupt files are exit 2; outputs are atomic.

Artifacts are made once per test session and shared by the xdist workers (a file lock)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sugarize
from sugarize.deploy.artifact import compare_structures
from sugarize.deploy.targets import TARGETS, ExportOptions, get_target, target_of_file
from sugarize.errors import InputError, OutputPathError

from helpers import MODELS, load_fixture

HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(not HAS_EXECUTORCH, reason="the executorch extra is not installed")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")

MODEL_FIXTURES = ["tiny_resnet", "dead_mlp", "relu_transformer"]  # CNN+BN+residual, MLP, transformer block
FORMATS = ["onnx", "ort", "pte", "openvino"]


def _marks(fmt):
    return {"pte": [needs_executorch], "openvino": [needs_openvino]}.get(fmt, [])


CASES = [pytest.param(f, m, marks=_marks(f), id=f"{f}-{m}") for f in FORMATS for m in MODEL_FIXTURES]


def leaky_one(model: nn.Module) -> nn.Module:
    """The negative control: the original with its first ReLU made a LeakyReLU(0.1)."""
    m = copy.deepcopy(model)
    relus = [n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU)]
    if relus:
        parent, _, leaf = relus[0].rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, nn.LeakyReLU(0.1))
        return m
    block_cls = type(m.blocks[0])  # relu_transformer: F.relu inside Block.forward

    class LeakyBlock(block_cls):
        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
            q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.ff2(F.leaky_relu(self.ff1(self.ln2(x)), 0.1))

    m.blocks[0].__class__ = LeakyBlock
    return m


def _build_one(root: Path, fmt: str, name: str) -> dict:
    mod = load_fixture(name)
    torch.manual_seed(0)
    model, args = mod.build_model().eval(), mod.example_inputs()
    stripped = sugarize.strip(sugarize.sugarize(model))
    t = get_target(fmt)
    paths = {}
    for variant, m in (("original", model), ("stripped", stripped), ("leaky", leaky_one(model))):
        p = root / f"{name}.{variant}{t.suffix}"
        t.export(m, p, args, ExportOptions())
        paths[variant] = str(p)
    return paths


class Artifacts:
    """(format, model) -> {original, stripped, leaky} paths, each made once per test session on
    first use: shared by the xdist workers through a lock and an index file per key, so the
    workers make different ones side by side."""

    def __init__(self, root: Path, shared: bool):
        self.root, self.shared, self.cache = root, shared, {}

    def __getitem__(self, key):
        if key not in self.cache:
            fmt, name = key
            if not self.shared:
                self.cache[key] = _build_one(self.root, fmt, name)
            else:
                from filelock import FileLock

                index = self.root / f"{fmt}-{name}.json"
                with FileLock(str(index) + ".lock"):
                    if not index.is_file():
                        index.write_text(json.dumps(_build_one(self.root, fmt, name)))
                    self.cache[key] = json.loads(index.read_text())
        return self.cache[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, worker_id):
    if worker_id == "master":
        return Artifacts(tmp_path_factory.mktemp("targets"), shared=False)
    shared = tmp_path_factory.getbasetemp().parent / "sugarize-targets"
    shared.mkdir(exist_ok=True)
    return Artifacts(shared, shared=True)


def _model(name):
    mod = load_fixture(name)
    torch.manual_seed(0)
    return mod.build_model().eval(), mod.example_inputs()


@pytest.mark.parametrize("fmt,name", CASES)
def test_stripped_artifact_passes_parity_and_is_structurally_identical(artifacts, fmt, name):
    paths = artifacts[(fmt, name)]
    model, args = _model(name)
    sm = sugarize.sugarize(model)
    assert sugarize.count_sugar(sm) >= 2, "the parity below is of a model that had SUGAR sites, stripped"
    stripped = sugarize.strip(sm)
    report = sugarize.verify(paths["stripped"], model, args, stripped=stripped, reference_artifact=paths["original"])
    assert report.format == fmt and report.passed, report.summary()
    assert report.max_abs < 1e-5 and {o.reference for o in report.outputs} == {"original", "stripped"}
    # read back from the files: the structure as each target describes it
    t = get_target(fmt)
    mine, theirs = t.describe(paths["stripped"]), t.describe(paths["original"])
    assert mine.nodes == theirs.nodes and mine.sections == theirs.sections and mine.params == theirs.params
    assert report.structure.passed and report.structure.kind == fmt
    if fmt == "pte":
        assert report.structure.identical_bytes, "the stripped model's program is the original's, byte for byte"
        calls = [n for n in mine.nodes if n[0] == "delegate"]
        assert calls and len(dict(mine.sections)) == len(calls)  # each delegate's graph is compared
        if name != "relu_transformer":  # a CNN or MLP goes to XNNPACK whole
            assert [n[0] for n in mine.nodes] == ["delegate"]
    if fmt == "ort":
        assert report.structure.operators_equal and mine.operators == theirs.operators
    if fmt == "openvino":  # the .xml and the .bin, byte for byte (OpenVINO's numbered names made stable)
        assert report.structure.identical_bytes


@pytest.mark.parametrize("fmt,name", CASES)
def test_one_leaky_relu_fails_structure_naming_the_first_differing_node(artifacts, fmt, name):
    paths = artifacts[(fmt, name)]
    model, args = _model(name)
    t = get_target(fmt)
    rep = compare_structures(t.describe(paths["leaky"]), t.describe(paths["original"]))
    assert not rep.passed and not rep.identical_bytes
    first = rep.first_difference
    if fmt == "pte":  # in a delegate's graph: a ReLU fused as output_min 0.0 gone, or an XNNLeakyReLU node
        assert re.match(r"delegate \d+ \(XnnpackBackend\) node \d+: xnnpack::", first), first
        assert "LeakyReLU" in first or "output_min=0.0" in first, first
    elif fmt == "openvino":  # OpenVINO's opset has no LeakyRelu: torch's leaky_relu converts to PRelu
        assert "PRelu" in first and "node" in first, first
    else:
        assert "LeakyRelu" in first and "node" in first, first
    report = sugarize.verify(paths["leaky"], model, args, reference_artifact=paths["original"])
    assert not report.passed and "structure DIFFERS" in report.summary()


def test_the_ort_operator_set_is_what_the_required_operators_config_lists(artifacts):
    from sugarize.deploy.ort_target import read_required_operators, required_operators_path

    for name in MODEL_FIXTURES:
        paths = artifacts[("ort", name)]
        ort = Path(paths["stripped"])
        listed = read_required_operators(required_operators_path(ort))
        assert listed == list(get_target("ort").describe(ort).operators)
        assert required_operators_path(ort).read_text().splitlines()[1] == f"# - {ort.name}"


def test_the_leaky_transformer_needs_another_operator_for_a_reduced_build(artifacts):
    paths = artifacts[("ort", "relu_transformer")]
    t = get_target("ort")
    rep = compare_structures(t.describe(paths["leaky"]), t.describe(paths["original"]))
    assert rep.operators_equal is False
    assert any("LeakyRelu" in d and "more" in d for d in rep.differences)


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=_marks(f)) for f in FORMATS])
def test_a_file_is_told_by_its_bytes_not_its_name(artifacts, tmp_path, fmt):
    src = Path(artifacts[(fmt, "dead_mlp")]["stripped"])
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(src.read_bytes())
    if fmt == "onnx":  # protobuf has no magic number: the first field's tag
        assert target_of_file(renamed).name == "onnx"
    else:
        assert target_of_file(renamed).name == fmt


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=_marks(f)) for f in FORMATS])
@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_a_corrupt_file_is_an_input_error_with_one_line(artifacts, tmp_path, fmt, damage):
    src = Path(artifacts[(fmt, "tiny_resnet")]["stripped"])
    data = src.read_bytes()
    bad = tmp_path / f"bad{src.suffix}"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 3])
    elif damage == "flipped":  # the flatbuffer's root offset (or protobuf's first bytes) scrambled
        bad.write_bytes(bytes([data[0] ^ 0xFF, data[1] ^ 0xFF, data[2] ^ 0xFF]) + data[3:])
    else:
        bad.write_bytes(b"")
    with pytest.raises(InputError) as err:
        target = target_of_file(bad)
        target.check_file(bad)
    assert "\n" not in str(err.value)


def test_an_unknown_kind_of_file_and_an_unknown_format_are_input_errors(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(InputError, match="is not ONNX, ExecuTorch, ORT format .* or OpenVINO IR .by its bytes"):
        target_of_file(f)
    with pytest.raises(InputError, match="is not one of onnx, openvino, ort, pte"):
        get_target("tflite")


def test_an_option_a_target_does_not_take_is_refused_naming_the_flag():
    with pytest.raises(InputError, match="--opset does not apply to --format pte"):
        get_target("pte").check_options(ExportOptions(opset=17))
    with pytest.raises(InputError, match="--backend does not apply to --format onnx"):
        get_target("onnx").check_options(ExportOptions(backend="xnnpack"))
    with pytest.raises(InputError, match="--external-data does not apply to --format ort"):
        get_target("ort").check_options(ExportOptions(external_data=True))


def test_every_target_in_the_table_is_tested():
    """A new target gets its row in this file's cases (optimum's test_all_models_tested)."""
    assert sorted(TARGETS) == sorted(FORMATS)


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=_marks(f)) for f in ("ort", "pte", "openvino")])
def test_a_failed_export_leaves_nothing_and_an_old_file_untouched(tmp_path, monkeypatch, fmt):
    """Atomic: the artifact and its companions are both written or neither."""
    t = get_target(fmt)
    model, args = _model("dead_mlp")
    out = tmp_path / f"m{t.suffix}"
    out.write_bytes(b"old")
    companions = t.companions(out, ExportOptions())
    module = importlib.import_module(f"sugarize.deploy.{fmt}_target")

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(module, "describe_" + fmt, boom)
    with pytest.raises(Exception, match="disk on fire"):
        t.export(model, out, args, ExportOptions())
    assert out.read_bytes() == b"old"
    assert not any(c.exists() for c in companions)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_the_ort_format_and_its_operator_config_are_placed_together(tmp_path):
    from sugarize.deploy.ort_target import export_ort, required_operators_path

    model, args = _model("dead_mlp")
    res = export_ort(model, tmp_path / "m.ort", args)
    assert res.companions == [required_operators_path(tmp_path / "m.ort")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ort", "m.required_operators.config"]
    with pytest.raises(OutputPathError, match="already exists"):
        export_ort(model, tmp_path / "m.ort", args, force=False)


@needs_executorch
def test_a_pte_with_other_inputs_is_refused_in_one_line(artifacts):
    model, args = _model("relu_transformer")  # takes (2, 12) token ids
    with pytest.raises(InputError) as err:
        sugarize.verify(artifacts[("pte", "dead_mlp")]["stripped"], model, args)
    assert "\n" not in str(err.value)


@needs_executorch
def test_pte_dynamic_batch_runs_at_batch_1_and_8(tmp_path):
    from sugarize.deploy.pte_target import export_pte

    model, args = _model("dead_mlp")
    stripped = sugarize.strip(sugarize.sugarize(model))
    res = export_pte(stripped, tmp_path / "d.pte", args, dynamic_batch=True)
    assert get_target("pte").dynamic_dims(res.path) == (True, False)
    report = sugarize.verify(res.path, model, args, batch_sizes=(1, 8))
    assert report.passed and {tuple(o.shape) for o in report.outputs} == {(1, 10), (8, 10)}


@needs_executorch
def test_pte_portable_backend_keeps_the_kernels_in_the_program(tmp_path):
    from sugarize.deploy.pte_target import export_pte

    model, args = _model("dead_mlp")
    a = export_pte(sugarize.strip(sugarize.sugarize(model)), tmp_path / "a.pte", args, backend="portable")
    b = export_pte(model, tmp_path / "b.pte", args, backend="portable")
    t = get_target("pte")
    sa = t.describe(a.path)
    assert "relu.out" in [n[0] for n in sa.nodes] and not sa.sections
    assert compare_structures(sa, t.describe(b.path)).passed
    assert sugarize.verify(a.path, model, args, reference_artifact=b.path).passed
    c = export_pte(leaky_one(model), tmp_path / "c.pte", args, backend="portable")
    rep = compare_structures(t.describe(c.path), t.describe(b.path))
    assert not rep.passed and "leaky_relu.out" in rep.first_difference


@pytest.mark.filterwarnings("ignore:sugarize. weights hold NaN")
def test_verify_fails_on_nan_in_every_target(artifacts, tmp_path):
    """Parity's non-finite rule is the same for every target: NaN weights fail."""
    for fmt in [f for f in FORMATS if (f != "pte" or HAS_EXECUTORCH) and (f != "openvino" or HAS_OPENVINO)]:
        model, args = _model("dead_mlp")
        poisoned = copy.deepcopy(model)
        with torch.no_grad():
            poisoned.head.bias[0] = float("nan")
        t = get_target(fmt)
        p = tmp_path / f"nan{t.suffix}"
        t.export(poisoned, p, args, ExportOptions())
        report = sugarize.verify(p, poisoned, args)
        assert not report.passed and sum(o.nonfinite for o in report.outputs) > 0, fmt


def test_the_ort_converter_leaves_sys_path_and_the_root_logger_as_they_were(tmp_path):
    """onnxruntime's converter appends its bindings' folder to sys.path and calls logging.basicConfig
    when first imported: in a fresh process (nothing imported yet, no handler on the root logger)
    both come back as they were."""
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import logging, sys, torch\n"
            "from sugarize.deploy.ort_target import export_ort\n"
            "path, handlers = list(sys.path), list(logging.root.handlers)\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())\n"
            f"export_ort(m, {str(tmp_path / 'm.ort')!r}, (torch.randn(2, 4),))\n"
            "assert sys.path == path, [p for p in sys.path if p not in path]\n"
            "assert logging.root.handlers == handlers, logging.root.handlers\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]

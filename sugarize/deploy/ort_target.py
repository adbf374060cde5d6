"""The ORT-format target (ONNX Runtime Mobile): ``OUT.ort`` and ``OUT.required_operators.config``.

The ONNX export is converted with onnxruntime's own tool
(``onnxruntime.tools.convert_onnx_models_to_ort``, the "Fixed" optimisation style and its default
platform settings), which writes the ``.ort`` flatbuffer and the operator list a reduced-size
build of onnxruntime must contain (``--include_ops_by_config``). Parity runs the ``.ort`` bytes in
onnxruntime; the structure is read from the flatbuffer, tensor and node names left out, with the
operator set as the build sees it: a reduced build made for the original serves the stripped
model exactly when the two sets are equal.

Scoped process state: onnxruntime's flatbuffer bindings are a top-level package
(``ort_flatbuffers_py``) that its tool imports by putting its folder on ``sys.path``. sugarize
imports them once with that folder on ``sys.path`` and takes it off again; the modules stay
loaded under that name, which only onnxruntime uses.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import ExportError, InputError, first_line
from .artifact import ExportResult, Runner, Structure, file_digest
from .target import DYNAMIC_BATCH, DYNAMIC_SEQUENCE, OPSET, ExportOptions, Target

__all__ = ["OrtTarget", "export_ort", "required_operators_path", "read_required_operators"]

ORT_MAGIC = b"ORTM"  # the flatbuffer's file identifier, bytes 4..8
ORT_STANDARD_DOMAINS = ("ai.onnx", "", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.ml")


def required_operators_path(path: str | os.PathLike) -> Path:
    """``model.ort`` -> ``model.required_operators.config``: the name onnxruntime's tool gives it."""
    path = Path(path)
    return path.with_name(path.stem + ".required_operators.config")


def _fbs():
    """onnxruntime's ORT-format flatbuffer bindings, imported with their folder on sys.path for
    that import alone (see the module's docstring)."""
    if "ort_flatbuffers_py.fbs.InferenceSession" in sys.modules:
        return sys.modules["ort_flatbuffers_py.fbs"]
    import importlib
    import pkgutil

    import onnxruntime.tools.ort_format_model as pkg

    before = list(sys.path)
    folder = str(Path(pkg.__file__).parent)
    try:
        if folder not in sys.path:
            sys.path.append(folder)
        fbs = importlib.import_module("ort_flatbuffers_py.fbs")
        for info in pkgutil.iter_modules(fbs.__path__):
            importlib.import_module(f"ort_flatbuffers_py.fbs.{info.name}")
    finally:
        sys.path[:] = before
    return fbs


@contextlib.contextmanager
def _tool_scope():
    """onnxruntime's converter with its sys.path change taken back and its progress lines kept
    off the user's terminal."""
    import logging

    before = list(sys.path)
    root_handlers = list(logging.root.handlers)  # its get_logger calls logging.basicConfig
    loggers = [logging.getLogger(n) for n in ("ort_format_model.utils", "ort_format_model")]
    levels = [lg.level for lg in loggers]
    try:
        _fbs()
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        sys.path[:] = before
        logging.root.handlers[:] = root_handlers
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _convert(onnx_path: Path, folder: Path) -> tuple[Path, Path]:
    """``folder/<stem>.ort`` and ``folder/<stem>.required_operators.config`` from ``onnx_path``."""
    try:
        with _tool_scope():
            from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

            convert_onnx_models_to_ort(onnx_path, output_dir=folder, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as exc:
        raise ExportError(f"onnxruntime's ORT-format converter failed: {first_line(exc)}") from exc
    ort_path = folder / (onnx_path.stem + ".ort")
    config = required_operators_path(ort_path)
    if not ort_path.is_file() or not config.is_file():
        raise ExportError("onnxruntime's ORT-format converter wrote no .ort file and operator config")
    return ort_path, config


def _name_config(config: Path, shown: str) -> None:
    """The tool writes the temporary model's full path in the config's header: the file's own name."""
    lines = config.read_text().splitlines(keepends=True)
    config.write_text("".join(f"# - {shown}\n" if ln.startswith("# - ") else ln for ln in lines))


def read_required_operators(path: str | os.PathLike) -> list[str]:
    """The operators a ``required_operators.config`` lists, as ``domain;opset;op``."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, ops = line.split(";", 2)
        out += [f"{domain};{opset};{op}" for op in ops.split(",") if op]
    return sorted(out)


def export_ort(model, path: str | os.PathLike, example_args: Sequence[Any], *, opset: int | None = None,
               dynamic_batch: bool = False, dynamic_sequence: bool = False, force: bool = True) -> ExportResult:
    """Strips SUGAR, exports ``model`` to ONNX, converts it to the ORT format at ``path`` and writes
    ``required_operators_path(path)`` beside it: both files or neither.

    Raises:
        ExportError: the exporter or the converter failed.
        OutputPathError: an output exists (without ``force``) or is not writable.
    """
    from ..files.fsutil import atomic_folder
    from .export import export_onnx

    path = Path(path)
    config = required_operators_path(path)
    with atomic_folder(path, force=force, companion_files=(config.name,)) as folder:
        work = folder / ".onnx-export"  # a name no output takes: it stays in the temporary folder
        work.mkdir()
        onnx_res = export_onnx(model, work / (path.stem + ".onnx"), example_args, opset=opset,
                               dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence, external_data=False)
        ort_path, written_config = _convert(onnx_res.path, work)
        os.replace(ort_path, folder / path.name)
        os.replace(written_config, folder / config.name)
        _name_config(folder / config.name, path.name)
        OrtTarget().check_file(folder / path.name)
        structure = describe_ort(folder / path.name)
    return ExportResult(path=path, opset=onnx_res.opset, op_types=[n[0] for n in structure.nodes],
                        inputs=onnx_res.inputs, outputs=onnx_res.outputs, stripped_sites=onnx_res.stripped_sites,
                        dynamic_batch=dynamic_batch, notes=onnx_res.notes, dynamic_sequence=dynamic_sequence,
                        format="ort", companions=[config])


def _session(path: str | os.PathLike):
    """The flatbuffer's root, after checking it is one (``InputError`` otherwise)."""
    fbs = _fbs()
    data = bytearray(Path(path).read_bytes())
    if len(data) < 8 or not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(data, 0):
        raise InputError(f"{Path(path).name} is not an ORT-format model (no ORTM identifier); convert it again")
    return fbs, fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0)


def _attr_value(fbs, a) -> Any:
    t = fbs.AttributeType.AttributeType
    kind = a.Type()
    if kind == t.FLOAT:
        return a.F()
    if kind == t.INT:
        return a.I()
    if kind == t.STRING:
        return a.S().decode()
    if kind == t.FLOATS:
        return tuple(a.Floats(i) for i in range(a.FloatsLength()))
    if kind == t.INTS:
        return tuple(a.Ints(i) for i in range(a.IntsLength()))
    if kind == t.STRINGS:
        return tuple(a.Strings(i).decode() for i in range(a.StringsLength()))
    if kind == t.TENSOR:
        x = a.T()
        raw = x.RawDataAsNumpy().tobytes() if x.RawDataLength() else b""
        return ("tensor", x.DataType(), tuple(x.Dims(i) for i in range(x.DimsLength())), raw)
    if kind == t.GRAPH:
        g = a.G()
        return ("graph", tuple((g.Nodes(i).OpType().decode(), g.Nodes(i).Domain().decode())
                               for i in range(g.NodesLength())))
    return ("attribute type", kind)


def _value_type(fbs, info) -> tuple:
    """(element type, dims) of a graph input or output: dims as numbers or their symbolic names."""
    type_info = info.Type()
    if type_info is None or type_info.ValueType() != fbs.TypeInfoValue.TypeInfoValue.tensor_type:
        return ("non-tensor",)
    tensor = fbs.TensorTypeAndShape.TensorTypeAndShape()
    tensor.Init(type_info.Value().Bytes, type_info.Value().Pos)
    shape = tensor.Shape()
    dims = None
    if shape is not None:
        dims = []
        for i in range(shape.DimLength()):
            v = shape.Dim(i).Value()
            if v is None:
                dims.append("?")
            elif v.DimType() == fbs.DimensionValueType.DimensionValueType.VALUE:
                dims.append(v.DimValue())
            else:
                dims.append((v.DimParam() or b"?").decode())
        dims = tuple(dims)
    return (tensor.ElemType(), dims)


def describe_ort(path: str | os.PathLike) -> Structure:
    """An ORT-format file as a ``Structure``: names left out, the operator set as the build sees it."""
    fbs, session = _session(path)
    graph = session.Model().Graph()
    args = {}
    for i in range(graph.NodeArgsLength()):
        arg = graph.NodeArgs(i)
        args[arg.Name()] = arg
    initializer_names = {graph.Initializers(i).Name() for i in range(graph.InitializersLength())}
    inputs = tuple(_value_type(fbs, args[graph.Inputs(i)]) for i in range(graph.InputsLength())
                   if graph.Inputs(i) not in initializer_names)
    outputs = tuple(_value_type(fbs, args[graph.Outputs(i)]) for i in range(graph.OutputsLength()))
    nodes, operators = [], set()
    for i in range(graph.NodesLength()):
        n = graph.Nodes(i)
        op, domain = n.OpType().decode(), n.Domain().decode() or "ai.onnx"
        attrs = tuple(sorted((n.Attributes(j).Name().decode(), _attr_value(fbs, n.Attributes(j)))
                             for j in range(n.AttributesLength())))
        nodes.append((op, domain, attrs))
        operators.add(f"{domain};{n.SinceVersion()};{op}")
    params = tuple((tuple(t.Dims(j) for j in range(t.DimsLength())), t.DataType())
                   for t in (graph.Initializers(i) for i in range(graph.InitializersLength())))
    return Structure("ort", inputs, outputs, tuple(nodes), params, (), tuple(sorted(operators)),
                     digest=file_digest(path), size=Path(path).stat().st_size)


class OrtTarget(Target):
    """ORT format for ONNX Runtime Mobile: the converted ``.ort`` runs in onnxruntime (which loads
    the format); a reduced build takes the ``required_operators.config`` beside it."""

    name = "ort"
    title = "ORT format (ONNX Runtime Mobile)"
    suffix = ".ort"
    options = (OPSET, DYNAMIC_BATCH, DYNAMIC_SEQUENCE)
    runtimes = ("onnxruntime",)

    def companions(self, path: Path, options: ExportOptions) -> list[Path]:
        return [required_operators_path(path)]

    def export(self, model, path: Path, example_args: Sequence[Any], options: ExportOptions) -> ExportResult:
        return export_ort(model, path, example_args, opset=options.opset, dynamic_batch=bool(options.dynamic_batch),
                          dynamic_sequence=bool(options.dynamic_sequence))

    def summary(self, result: ExportResult) -> str:
        return f"ort, opset {result.opset}, {len(result.op_types)} nodes"

    def sniff(self, path: Path, head: bytes) -> bool:
        return head[4:8] == ORT_MAGIC

    def check_file(self, path) -> None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"ORT-format file {path} not found")
        try:
            describe_ort(path)
        except InputError:
            raise
        except Exception as exc:  # a flatbuffer cut short or altered: the bindings index past its end
            raise InputError(f"{path.name} is not a readable ORT-format model ({first_line(exc)}); "
                             "convert it again") from None
        try:
            self.runner(path)
        except ExportError as exc:
            raise InputError(f"{path.name} is not a valid ORT-format model ({exc}); convert it again") from None

    def runner(self, path, *, runtime: str | None = None, optimization: str = "all") -> Runner:
        if runtime not in (None, "onnxruntime"):
            raise InputError(f"--runtime {runtime} does not run ORT-format files; use onnxruntime")
        from .runtimes import OrtRunner

        return OrtRunner(path, optimization, model_format="ORT")

    def describe(self, path, *, full: bool = True) -> Structure:
        return describe_ort(path)

    def standard(self, node: tuple) -> bool:
        return node[1] in ORT_STANDARD_DOMAINS

    def dynamic_dims(self, path) -> tuple[bool, bool]:
        s = describe_ort(path)
        batch = any(isinstance(d[1], tuple) and d[1] and isinstance(d[1][0], str) for d in s.inputs)
        sequence = any(isinstance(d[1], tuple) and len(d[1]) >= 2 and d[0] in (6, 7) and isinstance(d[1][1], str)
                       for d in s.inputs)
        return batch, sequence

    def export_options_of(self, path) -> ExportOptions:
        batch, sequence = self.dynamic_dims(path)
        return ExportOptions(opset=ort_opset(path), dynamic_batch=batch, dynamic_sequence=sequence)


def ort_opset(path) -> int | None:
    """The default-domain opset an ORT-format file was converted at."""
    _, session = _session(path)
    model = session.Model()
    for i in range(model.OpsetImportLength()):
        o = model.OpsetImport(i)
        if (o.Domain() or b"").decode() in ("", "ai.onnx"):
            return int(o.Version())
    return None

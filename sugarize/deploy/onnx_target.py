"""The ONNX target: a ``.onnx`` file (and its ``.data``), run in onnxruntime or OpenVINO."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, first_line
from .artifact import ExportResult, Runner, Structure
from .target import DYNAMIC_BATCH, DYNAMIC_SEQUENCE, EXTERNAL_DATA, OPSET, ExportOptions, Target

__all__ = ["OnnxTarget", "load_onnx", "onnx_dynamic_dims"]


def load_onnx(path: str | os.PathLike):
    """The ONNX file's graph (external data not read), after ``onnx.checker``'s full check.

    Raises:
        InputError: the file is missing or not a valid ONNX model.
    """
    import onnx

    path = Path(path)
    if not path.exists():
        raise InputError(f"ONNX file {path} not found")
    try:
        # by path: the checker reads external data (model.onnx.data, what torch.onnx.export writes
        # by default) beside the file, and takes models over protobuf's 2 GiB
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path} is not a valid ONNX model ({first_line(exc)}); export it again") from exc
    return proto


def onnx_dynamic_dims(proto) -> tuple[bool, bool]:
    """(batch, sequence): whether a file's inputs have a dynamic dimension 0, and 1 of token inputs."""
    batch = sequence = False
    for i in proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        batch = batch or bool(dims and dims[0].dim_param)
        integer = i.type.tensor_type.elem_type in (6, 7)  # INT32, INT64
        sequence = sequence or bool(integer and len(dims) >= 2 and dims[1].dim_param)
    return batch, sequence


class OnnxTarget(Target):
    """ONNX through torch's exporter, checked by ``onnx.checker``; parity in onnxruntime (CPU,
    ``ORT_ENABLE_ALL``) or OpenVINO; structure before and after onnxruntime's optimisation."""

    name = "onnx"
    title = "ONNX"
    suffix = ".onnx"
    options = (OPSET, DYNAMIC_BATCH, DYNAMIC_SEQUENCE, EXTERNAL_DATA)
    runtimes = ("onnxruntime", "openvino")
    int8 = "OUTPUT.int8.onnx (static QDQ, onnxruntime)"

    def companions(self, path: Path, options: ExportOptions) -> list[Path]:
        return [path.with_name(path.name + ".data")]

    def export(self, model, path: Path, example_args: Sequence[Any], options: ExportOptions) -> ExportResult:
        from .export import export_onnx

        return export_onnx(model, path, example_args, opset=options.opset, dynamic_batch=bool(options.dynamic_batch),
                           dynamic_sequence=bool(options.dynamic_sequence), external_data=options.external_data,
                           force=True)

    def quantize(self, plain, reference, example_args, artifact, reference_artifact, out, calibration, validation,
                 force):
        """Static QDQ (onnxruntime) of the float export and of the original's; their QDQ graphs
        compared, and the accuracy of float and int8 on the validation batches."""
        from .quantize import Int8Report, onnx_accuracy, qdq_count, quantize_int8
        from .structure import compare_structure

        quantize_int8(artifact, out, calibration, force=force)
        q_ref = Path(reference_artifact).with_name("original.int8.onnx")
        quantize_int8(reference_artifact, q_ref, calibration)
        float_acc = int8_acc = None
        if validation is not None:
            float_acc, int8_acc = onnx_accuracy(artifact, validation()), onnx_accuracy(out, validation())
        return Int8Report(str(out), len(calibration), float_acc, int8_acc, qdq_count(out),
                          compare_structure(out, q_ref))

    def summary(self, result: ExportResult) -> str:
        return f"opset {result.opset}, {len(result.op_types)} nodes, {result.op_types.count('Relu')} Relu"

    def sniff(self, path: Path, head: bytes) -> bool:
        """A ModelProto, parsed: protobuf has no magic number, and a first byte of 0x08 (the
        ir_version field's tag) is only where to start."""
        if head[:1] != b"\x08" or path.stat().st_size >= 2 ** 31:  # protobuf holds 2 GiB
            return False
        import onnx

        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(path.read_bytes())
        except Exception:
            return False
        return proto.ir_version > 0 and len(proto.opset_import) > 0 and proto.HasField("graph")

    def check_file(self, path) -> None:
        load_onnx(path)

    def runner(self, path, *, runtime: str | None = None, optimization: str = "all") -> Runner:
        """onnxruntime (CPU provider, ``optimization``), or OpenVINO's CPU plugin at explicit float32."""
        from .runtimes import onnx_runner

        runtime = runtime or self.runtimes[0]
        return onnx_runner(path, runtime, optimization, precision="f32" if runtime == "openvino" else None)

    def informative_runner(self, path, runtime: str | None) -> Runner | None:
        """OpenVINO at its plugin's default precision (reported, not judged); None otherwise."""
        from .runtimes import onnx_runner

        return onnx_runner(path, "openvino") if runtime == "openvino" else None

    def describe(self, path, *, full: bool = True) -> Structure:
        from .structure import describe_onnx

        return describe_onnx(path, optimized=full)

    def standard(self, node: tuple) -> bool:
        return node[1] in ("", "ai.onnx")

    def dynamic_dims(self, path) -> tuple[bool, bool]:
        return onnx_dynamic_dims(load_onnx(path))

    def export_options_of(self, path) -> ExportOptions:
        """The file's opset (one sugarize exports, else ExportError) and dynamic dimensions."""
        from .export import check_opset, file_opset

        proto = load_onnx(path)
        opset = file_opset(proto)
        check_opset(opset, f"{Path(path).name} declares opset {opset}, which")
        batch, sequence = onnx_dynamic_dims(proto)
        return ExportOptions(opset=opset, dynamic_batch=batch, dynamic_sequence=sequence)

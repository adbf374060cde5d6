"""int8 for edge accelerators: onnxruntime static quantisation (QDQ) with calibration data.

Edge NPUs and DSPs take QDQ graphs (QuantizeLinear/DequantizeLinear around each op). The
promise to check is that the quantised stripped model is the quantised original, node for
node, and that int8 costs little accuracy on the user's validation data.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import DataFileError, ExportError, first_line
from ..files.fsutil import atomic_path

__all__ = ["quantize_int8", "onnx_accuracy", "runner_accuracy", "Int8Report", "qdq_count"]


@dataclass
class Int8Report:
    path: str
    calibration_batches: int
    float_accuracy: float | None
    int8_accuracy: float | None
    qdq_nodes: int
    structure: Any = None  # StructureReport of the quantised file vs the quantised original
    scheme: str = "QDQ"  # "QDQ" (onnxruntime) or "PT2E, XNNPACK quantizer" (ExecuTorch)

    @property
    def passed(self) -> bool:
        return self.structure is None or self.structure.passed

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "structure"}
        d["structure"] = self.structure.to_dict() if self.structure is not None else None
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        acc = ""
        if self.float_accuracy is not None:
            acc = (f"; validation accuracy float32 {100 * self.float_accuracy:.2f}% -> int8 "
                   f"{100 * self.int8_accuracy:.2f}% ({100 * (self.int8_accuracy - self.float_accuracy):+.2f} points)")
        same = ""
        if self.structure is not None:
            what = "QDQ structure" if self.scheme == "QDQ" else "int8 program structure"
            same = (f"; {what} identical to the quantised original" if self.structure.passed
                    else f"; {what} DIFFERS from the quantised original: {self.structure.first_difference}")
        return (f"int8 ({self.scheme}, {self.calibration_batches} calibration batches): {self.path}, "
                f"{self.qdq_nodes} quantize/dequantize nodes{acc}{same}")


class _Reader:
    def __init__(self, names: Sequence[str], batches: Sequence[Sequence[np.ndarray]]):
        self._it = iter([dict(zip(names, b)) for b in batches])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - not used by the calibrators we call
        pass


def _input_names(path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path)).graph.input]


def quantize_int8(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                  calibration: Iterable[Sequence[np.ndarray]], *, force: bool = True) -> Path:
    """Static int8 quantisation (QDQ, per-tensor, MinMax calibration) of ``onnx_path``.

    ``calibration`` yields one tuple of input arrays per batch. The output is written
    atomically. Raises DataFileError without calibration batches, ExportError if
    onnxruntime's quantiser fails.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [tuple(np.ascontiguousarray(a, dtype=np.float32) for a in b) for b in calibration]
    if not batches:
        raise DataFileError("no calibration batches: the data file's train_loader() yielded nothing")
    names = _input_names(onnx_path)
    with atomic_path(out_path, force=force) as tmp, tempfile.TemporaryDirectory(prefix="sugarize-q-") as work:
        pre = Path(work) / "pre.onnx"
        try:
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(tmp), _Reader(names, batches), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=False,
                            calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:
            msg = first_line(exc)
            raise ExportError(f"onnxruntime int8 quantisation failed: {msg}") from exc
    return Path(out_path)


def onnx_accuracy(onnx_path, loader: Iterable) -> float | None:
    """Top-1 accuracy of a classifier ONNX file over ``(x, y)`` batches; None if not a classifier."""
    from .runtimes import OrtRunner

    return runner_accuracy(OrtRunner(onnx_path), loader)


def runner_accuracy(runner, loader: Iterable) -> float | None:
    """Top-1 accuracy of a classifier artifact (any target's runner) over ``(x, y)`` batches;
    None if not a classifier."""
    correct = total = 0
    for x, y in loader:
        out = runner.run([np.asarray(x, dtype=np.float32)])[0]
        y = np.asarray(y)
        if out.ndim != 2 or y.ndim != 1:
            return None
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    return correct / total if total else None


def qdq_count(path) -> int:
    import onnx

    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(path)).graph.node)

"""The OpenVINO IR target: ``model.xml`` (the graph) and ``model.bin`` (the weights), both or neither.

``torch.export`` -> ``openvino.convert_model`` (static input shapes, the example's) ->
``openvino.save_model`` without fp16 compression. The export records the ``.bin``'s SHA-256 in
the IR's ``rt_info`` (``sugarize/bin_sha256``), so a ``.bin`` altered or swapped after the
export is refused before it runs. Parity runs in OpenVINO's CPU plugin at explicit f32; the
plugin's default precision (bf16 on CPUs with AMX or AVX512-BF16, about 1e-3 from float32) is
reported beside it and not judged. The structure is the IR's ops with their attributes and
the constants' shapes, and the CPU plugin's executed graph (its layer types and precisions,
which is where a ReLU fused into a FullyConnected or Convolution shows). Intel CPUs, iGPUs and
NPUs run this format at the edge. Needs the ``openvino`` extra.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ExportError, InputError
from .artifact import ExportResult, Runner, Structure
from .target import ExportOptions, Target

__all__ = ["OpenVinoTarget", "export_openvino", "describe_openvino", "bin_path"]

INSTALL = "pip install 'sugarize[openvino]'"
_HASH_KEY = ["sugarize", "bin_sha256"]


def check_openvino() -> None:
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        raise InputError(f"--format openvino needs OpenVINO: {INSTALL}")


def bin_path(xml: str | os.PathLike) -> Path:
    """The weights file OpenVINO reads beside an IR's ``.xml``: the same name, ``.bin``."""
    return Path(xml).with_suffix(".bin")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(plain, example_args: tuple):
    """The plain model as an OpenVINO model, its inputs fixed at the example's shapes."""
    import openvino as ov
    import torch

    from .export import interrupted

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(plain, tuple(example_args))
            model = ov.convert_model(exported)
        tensors = [a for a in example_args if isinstance(a, torch.Tensor)]
        model.reshape({i: ov.PartialShape(list(t.shape)) for i, t in enumerate(tensors)})
        _stable_names(model)
        return model
    except Exception as exc:
        if interrupted(exc):
            raise KeyboardInterrupt from exc
        raise ExportError(f"OpenVINO conversion failed: {_reason(exc)}") from exc


_NUMBERED = re.compile(r"^[A-Za-z]+_\d+$")


def _stable_names(model) -> None:
    """OpenVINO numbers unnamed ops and models from process-wide counters (``Constant_3212``,
    ``Model8``), and torch.export adds bare numbers to tensor names: ops are renamed by their
    place in the graph and the bare numbers dropped (where a tensor keeps a name), so one model
    exported twice, or the stripped model and the original, write the same ``.xml`` byte for byte."""
    model.set_friendly_name("sugarize")
    for i, op in enumerate(model.get_ordered_ops()):
        if _NUMBERED.match(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{i}")
        for out in op.outputs():  # torch.export's bare numbers ("5") beside a tensor's own name
            names = out.get_names()
            kept = {n for n in names if not n.isdigit()}
            if kept and kept != names:
                out.get_tensor().set_names(kept)


def export_openvino(model, path: str | os.PathLike, example_args: Sequence[Any], *, force: bool = True) -> ExportResult:
    """Exports a plain model (eval mode, no SUGAR) to an OpenVINO IR at ``path`` (``.xml``) and
    ``bin_path(path)``: both written in a temporary folder beside them, checked, then moved into
    place (both or neither)."""
    import openvino as ov

    from ..files.fsutil import atomic_folder
    from ..passes.strip import count_sugar

    check_openvino()
    path = Path(path)
    ov_model = _convert(model, tuple(example_args))
    with atomic_folder(path, force=force, companion_files=(bin_path(path).name,)) as folder:
        xml = folder / path.name
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        if not bin_path(xml).exists():  # a model with no weights: an empty .bin keeps the pair a pair
            bin_path(xml).write_bytes(b"")
        ov_model.set_rt_info(_sha256(bin_path(xml)), _HASH_KEY)
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        OpenVinoTarget().check_file(xml)
        structure = describe_openvino(xml, full=False)
    return ExportResult(path=path, opset=None, op_types=[n[0] for n in structure.nodes],
                        inputs=[f"input_{i}" for i in range(len(structure.inputs))],
                        outputs=[f"output_{i}" for i in range(len(structure.outputs))],
                        stripped_sites=count_sugar(model), dynamic_batch=False, format="openvino",
                        companions=[bin_path(path)])


def _reason(exc: BaseException) -> str:
    """OpenVINO's message without its source locations: ``Incorrect weights in bin file!``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    told = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return (told or lines or [type(exc).__name__])[-1]


def _read(xml: Path):
    """The IR, after its files are checked: the ``.bin`` there and (where the export recorded
    one) matching its hash. InputError naming the broken file otherwise."""
    import openvino as ov

    xml = Path(xml)
    if not xml.is_file():
        raise InputError(f"OpenVINO IR {xml} not found")
    weights = bin_path(xml)
    if not weights.is_file():
        raise InputError(f"{weights.name} (the weights of {xml.name}) not found beside it; an OpenVINO IR is the "
                         ".xml and its .bin together: copy both")
    try:
        model = ov.Core().read_model(str(xml))
    except Exception as exc:
        raise InputError(f"{xml.name} (with {weights.name}) is not a readable OpenVINO IR ({_reason(exc)}); "
                         "export it again") from None
    if model.has_rt_info(_HASH_KEY):
        recorded = str(model.get_rt_info(_HASH_KEY).astype(str))
        if recorded != _sha256(weights):
            raise InputError(f"{weights.name} is not the weights file {xml.name} was exported with (its SHA-256 "
                             "differs from the one the IR records); export it again, or copy the pair together")
    return model


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (np.generic, np.ndarray)):
        return _plain(value.tolist())
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _port(output) -> tuple:
    return (output.get_element_type().get_type_name(), str(output.get_partial_shape()))


def describe_openvino(path: str | os.PathLike, *, full: bool = True) -> Structure:
    """The IR as a ``Structure``: parameters and results (type, shape), every other op with its
    opset and attributes (constants as parameter shapes), and with ``full`` the CPU plugin's
    executed graph at f32 (layer type, precisions) as a section."""
    model = _read(Path(path))
    nodes, params = [], []
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Constant":
            params.append(tuple(_port(o) for o in op.outputs()))
            continue
        if kind in ("Parameter", "Result"):
            continue
        attrs = tuple(sorted((k, _plain(v)) for k, v in op.get_attributes().items()))
        nodes.append((kind, op.get_type_info().version_id, attrs))
    sections = ()
    if full:
        sections = (("CPU plugin's executed graph", _executed(model)),)
    xml = Path(path)
    h = hashlib.sha256(xml.read_bytes())
    h.update(bin_path(xml).read_bytes())
    return Structure(kind="openvino", inputs=tuple(_port(p.output(0)) for p in model.get_parameters()),
                     outputs=tuple(_port(r.input_value(0)) for r in model.get_results()), nodes=tuple(nodes),
                     params=tuple(params), sections=sections, digest=h.hexdigest(),
                     size=xml.stat().st_size + bin_path(xml).stat().st_size)


def _executed(model) -> tuple:
    """The CPU plugin's executed graph (f32): each layer's type and precisions, constants left out."""
    import openvino as ov

    try:
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as exc:
        raise ExportError(f"OpenVINO's CPU plugin cannot compile the IR: {_reason(exc)}") from exc
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        fields = {k: str(info[k].astype(str)) for k in ("layerType", "runtimePrecision", "outputPrecisions")
                  if k in info}
        if fields.get("layerType") in ("Const", "Input", "Output"):
            continue
        out.append((fields.get("layerType", op.get_type_name()), "CPU",
                    tuple(sorted((k, v) for k, v in fields.items() if k != "layerType"))))
    return tuple(out)


class OpenVinoTarget(Target):
    """OpenVINO IR (``.xml`` + ``.bin``), run in OpenVINO's CPU plugin at explicit f32."""

    name = "openvino"
    title = "OpenVINO IR"
    suffix = ".xml"
    extra = "openvino"
    runtimes = ("openvino",)

    def check_available(self) -> None:
        check_openvino()

    def companions(self, path: Path, options: ExportOptions) -> list[Path]:
        return [bin_path(path)]

    def export(self, model, path: Path, example_args: Sequence[Any], options: ExportOptions) -> ExportResult:
        return export_openvino(model, path, example_args)

    def summary(self, result: ExportResult) -> str:
        return f"openvino IR, {len(result.op_types)} ops, {result.op_types.count('Relu')} Relu"

    def sniff(self, path: Path, head: bytes) -> bool:
        return re.match(rb"\s*(<\?xml[^>]*\?>\s*)?<net\s", head.lstrip(b"\xef\xbb\xbf")) is not None

    def check_file(self, path) -> None:
        check_openvino()
        _read(Path(path))

    def runner(self, path, *, runtime: str | None = None, optimization: str = "all") -> Runner:
        if runtime not in (None, "openvino"):
            raise InputError(f"--runtime {runtime} does not run OpenVINO IR files; they run in openvino")
        from .runtimes import OpenVinoRunner

        _read(Path(path))
        return OpenVinoRunner(path, "f32")

    def informative_runner(self, path, runtime: str | None) -> Runner | None:
        """The CPU plugin at its default precision (bf16 where the CPU has it): reported, not judged."""
        from .runtimes import OpenVinoRunner

        return OpenVinoRunner(path)

    def describe(self, path, *, full: bool = True) -> Structure:
        return describe_openvino(path, full=full)

    def standard(self, node: tuple) -> bool:
        return node[1] == "CPU" or str(node[1]).startswith("opset")

"""Structural identity of two ONNX graphs: what a deployment engineer checks.

Two exports are structurally identical when they have the same inputs and outputs (names,
element types, shapes, dynamic axes), the same nodes in order (op type, domain, attributes),
initializers of the same shapes and types, and, after onnxruntime's full graph optimisation
(``ORT_ENABLE_ALL``, the optimised model written to a file), the same optimised nodes, so
fusions such as Conv+Relu happen the same way in both. The comparison itself is the one every
target uses (``artifact.compare_structures``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .artifact import Structure, StructureReport, compare_structures, file_digest, first_node_difference

__all__ = ["StructureReport", "compare_structure", "describe_onnx", "optimized_model", "node_signature",
           "first_node_difference"]


def _value_infos(values) -> tuple:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_param or "?" if not d.HasField("dim_value") else d.dim_value for d in t.shape.dim) \
            if t.HasField("shape") else None
        out.append((v.name, t.elem_type, dims))
    return tuple(out)


def _attr(a) -> Any:
    import onnx

    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, onnx.TensorProto):
        return ("tensor", v.data_type, tuple(v.dims), onnx.numpy_helper.to_array(v).tobytes())
    if isinstance(v, onnx.GraphProto):
        return ("graph", tuple((n.op_type, n.domain) for n in v.node))
    if isinstance(v, list):
        return tuple(_attr_item(x) for x in v)
    return v


def _attr_item(x) -> Any:
    import onnx

    if isinstance(x, onnx.TensorProto):
        return ("tensor", x.data_type, tuple(x.dims))
    if isinstance(x, onnx.GraphProto):
        return ("graph", len(x.node))
    return x


def node_signature(n) -> tuple:
    """An ONNX node as (op type, domain, sorted attributes)."""
    return (n.op_type, n.domain or "ai.onnx", tuple(sorted((a.name, _attr(a)) for a in n.attribute)))


def optimized_model(path, out_path) -> Any:
    """onnxruntime's ORT_ENABLE_ALL graph of ``path`` (CPU), written to ``out_path`` and loaded."""
    import onnx

    from .runtimes import ort_session

    ort_session(path, optimization="all", optimized_path=str(out_path))
    # its initializers may still point at the input's external data file, by a path relative to
    # the input: the structure is read without them
    return onnx.load(str(out_path), load_external_data=False)


def _load(p):
    """The graph of an ONNX file, external data (``model.onnx.data``) not read: only shapes count."""
    import onnx

    return onnx.load(str(p), load_external_data=False)


def describe_onnx(path, *, optimized: bool = True) -> Structure:
    """An ONNX file as a ``Structure``; with ``optimized`` its ``ORT_ENABLE_ALL`` graph as a section."""
    m = _load(path)
    sections = ()
    if optimized:
        with tempfile.TemporaryDirectory(prefix="sugarize-ort-") as tmp:
            opt = optimized_model(path, Path(tmp) / "a.onnx")
        sections = (("ORT_ENABLE_ALL", tuple(node_signature(n) for n in opt.graph.node)),)
    return Structure("onnx", _value_infos(m.graph.input), _value_infos(m.graph.output),
                     tuple(node_signature(n) for n in m.graph.node),
                     tuple((tuple(t.dims), t.data_type) for t in m.graph.initializer), sections,
                     digest=file_digest(path), size=Path(path).stat().st_size)


def compare_structure(path, reference_path, *, optimized: bool = True) -> StructureReport:
    """Compares the ONNX file ``path`` with ``reference_path`` (the original model's export)."""
    return compare_structures(describe_onnx(path, optimized=optimized),
                              describe_onnx(reference_path, optimized=optimized))

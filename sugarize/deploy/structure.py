"""Structural identity of two ONNX graphs: what a deployment engineer checks.

Two exports are structurally identical when they have the same inputs and outputs (names,
element types, shapes, dynamic axes), the same nodes in order (op type, domain, attributes),
initializers of the same shapes and types, and, after onnxruntime's full graph optimisation
(``ORT_ENABLE_ALL``, the optimised model written to a file), the same optimised nodes, so
fusions such as Conv+Relu happen the same way in both.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["StructureReport", "compare_structure", "optimized_model"]


@dataclass
class StructureReport:
    inputs_equal: bool
    outputs_equal: bool
    nodes_equal: bool
    initializers_equal: bool
    optimized_equal: bool | None  # None: not checked
    nodes: int
    optimized_nodes: int | None
    differences: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.inputs_equal and self.outputs_equal and self.nodes_equal and self.initializers_equal
                and self.optimized_equal is not False)

    @property
    def first_difference(self) -> str:
        return self.differences[0] if self.differences else ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        if self.passed:
            opt = f", {self.optimized_nodes} after ORT_ENABLE_ALL" if self.optimized_nodes is not None else ""
            return (f"structure IDENTICAL: inputs, outputs, {self.nodes} nodes with attributes, initializer "
                    f"shapes{opt}")
        return f"structure DIFFERS: {self.first_difference}"


def _value_infos(values) -> list[tuple]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_param or "?" if not d.HasField("dim_value") else d.dim_value for d in t.shape.dim) \
            if t.HasField("shape") else None
        out.append((v.name, t.elem_type, dims))
    return out


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


def _node_sig(n) -> tuple:
    return (n.op_type, n.domain or "ai.onnx", tuple(sorted((a.name, _attr(a)) for a in n.attribute)))


def _describe(i: int, sig: tuple | None) -> str:
    if sig is None:
        return "<no node>"
    op, domain, attrs = sig
    shown = ", ".join(f"{k}={v!r}"[:60] for k, v in attrs if not (isinstance(v, tuple) and v and v[0] == "tensor"))
    d = "" if domain == "ai.onnx" else f"{domain}::"
    return f"{d}{op}({shown})" if shown else f"{d}{op}"


def first_node_difference(a: list[tuple], b: list[tuple], what: str) -> str | None:
    """Where two lists of node signatures first differ, described; None if they are equal."""
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
            return f"{what} node {i}: {_describe(i, x)} (reference: {_describe(i, y)})"
    return None


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


def compare_structure(path, reference_path, *, optimized: bool = True) -> StructureReport:
    """Compares the ONNX file ``path`` with ``reference_path`` (the original model's export)."""
    a, b = _load(path), _load(reference_path)
    diffs: list[str] = []
    ins_a, ins_b = _value_infos(a.graph.input), _value_infos(b.graph.input)
    outs_a, outs_b = _value_infos(a.graph.output), _value_infos(b.graph.output)
    if ins_a != ins_b:
        diffs.append(f"inputs: {ins_a} (reference: {ins_b})")
    if outs_a != outs_b:
        diffs.append(f"outputs: {outs_a} (reference: {outs_b})")
    nodes_a, nodes_b = [_node_sig(n) for n in a.graph.node], [_node_sig(n) for n in b.graph.node]
    d = first_node_difference(nodes_a, nodes_b, "graph")
    if d:
        diffs.append(d)
    init_a = [(tuple(t.dims), t.data_type) for t in a.graph.initializer]
    init_b = [(tuple(t.dims), t.data_type) for t in b.graph.initializer]
    if init_a != init_b:
        i = next((i for i, (x, y) in enumerate(zip(init_a, init_b)) if x != y), min(len(init_a), len(init_b)))
        diffs.append(f"initializer {i}: {init_a[i] if i < len(init_a) else '<none>'} "
                     f"(reference: {init_b[i] if i < len(init_b) else '<none>'})")
    opt_equal, opt_nodes = None, None
    if optimized:
        with tempfile.TemporaryDirectory(prefix="sugarize-ort-") as tmp:
            oa = optimized_model(path, Path(tmp) / "a.onnx")
            ob = optimized_model(reference_path, Path(tmp) / "b.onnx")
        sa, sb = [_node_sig(n) for n in oa.graph.node], [_node_sig(n) for n in ob.graph.node]
        opt_nodes = len(sa)
        d = first_node_difference(sa, sb, "ORT_ENABLE_ALL")
        opt_equal = d is None
        if d:
            diffs.append(d)
    return StructureReport(ins_a == ins_b, outs_a == outs_b, nodes_a == nodes_b, init_a == init_b,
                           opt_equal, len(nodes_a), opt_nodes, diffs)

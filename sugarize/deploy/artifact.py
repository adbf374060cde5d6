"""What every deploy target shares: an artifact's structure as data, its comparison, a runner.

A deploy target (``deploy/targets.py`` lists them) writes one artifact (an ``.onnx``, ``.ort``
or ``.pte`` file, with its companion files) from a plain model, runs it, and describes it as a
``Structure``: inputs, outputs, nodes with their attributes, parameter shapes, further node lists
(onnxruntime's optimised graph, a delegate's graph), the operator set a runtime build needs, and
the bytes' digest. ``compare_structures`` is written once for all of them: two artifacts are
structurally identical when every one of these is equal, tensor and node names aside.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = ["Node", "Structure", "StructureReport", "compare_structures", "first_node_difference", "Runner",
           "ExportResult", "file_digest"]

# One node: (op, domain, attributes as a sorted tuple of (name, value)). Values are plain data.
Node = tuple


@dataclass(frozen=True)
class Structure:
    """An artifact described as comparable data (names of tensors and nodes left out).

    ``sections`` holds further node lists compared in order, by name: onnxruntime's
    ``ORT_ENABLE_ALL`` graph of an ONNX file, each XNNPACK delegate's graph of a ``.pte``.
    ``operators`` is the operator set a reduced runtime build needs (``None``: not described).
    """

    kind: str
    inputs: tuple
    outputs: tuple
    nodes: tuple
    params: tuple
    sections: tuple = ()  # ((name, nodes), ...)
    operators: tuple | None = None
    digest: str = ""
    size: int = 0


@dataclass
class StructureReport:
    """Two artifacts compared. ``initializers_equal`` covers the parameters' shapes and types;
    ``optimized_equal`` every further node list (None: none was described)."""

    inputs_equal: bool
    outputs_equal: bool
    nodes_equal: bool
    initializers_equal: bool
    optimized_equal: bool | None  # None: not checked
    nodes: int
    optimized_nodes: int | None
    differences: list[str] = field(default_factory=list)
    kind: str = ""  # the target's name (``Structure.kind``)
    sections: list[str] = field(default_factory=list)
    operators_equal: bool | None = None  # None: the target describes no operator set
    operators: list[str] = field(default_factory=list)
    identical_bytes: bool = False

    @property
    def passed(self) -> bool:
        return (self.inputs_equal and self.outputs_equal and self.nodes_equal and self.initializers_equal
                and self.optimized_equal is not False and self.operators_equal is not False)

    @property
    def first_difference(self) -> str:
        return self.differences[0] if self.differences else ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        if not self.passed:
            return f"structure DIFFERS: {self.first_difference}"
        extra = ""
        if self.optimized_nodes is not None:
            extra = f", {', '.join(self.sections)} ({self.optimized_nodes} nodes)" if self.sections else ""
        ops = ""
        if self.operators_equal and self.operators:
            ops = f", the same {len(self.operators)} operators for a reduced build"
        same = "; the files are byte-identical" if self.identical_bytes else ""
        return (f"structure IDENTICAL: inputs, outputs, {self.nodes} nodes with attributes, parameter "
                f"shapes{extra}{ops}{same}")


def _shown(value: Any) -> bool:
    return not (isinstance(value, tuple) and value and value[0] == "tensor")


def describe_node(sig: Node | None) -> str:
    """A node signature as a short readable line: ``Relu``, ``XNNConv2d(output_min=0.0, ...)``."""
    if sig is None:
        return "<no node>"
    op, domain, attrs = sig
    shown = ", ".join(f"{k}={v!r}"[:60] for k, v in attrs if _shown(v))
    d = "" if domain in ("ai.onnx", "") else f"{domain}::"
    return f"{d}{op}({shown})" if shown else f"{d}{op}"


def _only_differing(x: Node, y: Node) -> tuple[Node, Node]:
    """Two nodes of one op with only the attributes in which they differ (a missing one as
    ``<none>``): the line names what changed, not forty equal fields."""
    ax, ay = dict(x[2]), dict(y[2])
    keys = sorted(k for k in set(ax) | set(ay) if ax.get(k, "<none>") != ay.get(k, "<none>"))
    return ((x[0], x[1], tuple((k, ax.get(k, "<none>")) for k in keys)),
            (y[0], y[1], tuple((k, ay.get(k, "<none>")) for k in keys)))


def first_node_difference(a: Sequence[Node], b: Sequence[Node], what: str) -> str | None:
    """Where two lists of node signatures first differ, described; None if they are equal.
    Nodes of the same op show only the attributes that differ."""
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
            if x is not None and y is not None and x[:2] == y[:2] and len(x[2]) + len(y[2]) > 6:
                x, y = _only_differing(x, y)
            return f"{what} node {i}: {describe_node(x)} (reference: {describe_node(y)})"
    return None


def compare_structures(a: Structure, b: Structure) -> StructureReport:
    """Compares the artifact ``a`` with ``b`` (the original model's, made the same way)."""
    diffs: list[str] = []
    if a.inputs != b.inputs:
        diffs.append(f"inputs: {list(a.inputs)} (reference: {list(b.inputs)})")
    if a.outputs != b.outputs:
        diffs.append(f"outputs: {list(a.outputs)} (reference: {list(b.outputs)})")
    d = first_node_difference(a.nodes, b.nodes, "graph")
    if d:
        diffs.append(d)
    if a.params != b.params:
        i = next((i for i, (x, y) in enumerate(zip(a.params, b.params)) if x != y), min(len(a.params), len(b.params)))
        diffs.append(f"parameter {i}: {a.params[i] if i < len(a.params) else '<none>'} "
                     f"(reference: {b.params[i] if i < len(b.params) else '<none>'})")
    sections_equal, section_nodes = None, None
    if a.sections or b.sections:
        sa, sb = dict(a.sections), dict(b.sections)
        sections_equal = list(sa) == list(sb)
        if not sections_equal:
            diffs.append(f"node lists: {list(sa)} (reference: {list(sb)})")
        section_nodes = sum(len(v) for v in sa.values())
        for name in sa:
            d = first_node_difference(sa[name], sb.get(name, ()), name)
            if d:
                sections_equal = False
                diffs.append(d)
    operators_equal = None
    if a.operators is not None or b.operators is not None:
        operators_equal = a.operators == b.operators
        if not operators_equal:
            extra = sorted(set(a.operators or ()) - set(b.operators or ()))
            missing = sorted(set(b.operators or ()) - set(a.operators or ()))
            diffs.append(f"operators a runtime build needs: {', '.join(extra) or 'none'} more, "
                         f"{', '.join(missing) or 'none'} fewer than the reference")
    return StructureReport(a.inputs == b.inputs, a.outputs == b.outputs, a.nodes == b.nodes, a.params == b.params,
                           sections_equal, len(a.nodes), section_nodes, diffs, a.kind,
                           [name for name, _ in a.sections], operators_equal, list(a.operators or ()),
                           bool(a.digest) and a.digest == b.digest)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Runner(Protocol):
    """One inference engine over one artifact."""

    inputs: list[str]
    outputs: list[str]
    version: str  # "onnxruntime 1.32.0", "executorch 1.5.1 (XnnpackBackend)"
    providers: list[str]
    optimization: str  # what the runtime was asked to do to the graph, in its words

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]: ...


@dataclass
class ExportResult:
    """What a target's export wrote: the artifact, its companions, and what it holds."""

    path: Path
    opset: int | None  # the ONNX opset for ONNX-based targets; None for the others
    op_types: list[str]
    inputs: list[str]
    outputs: list[str]
    stripped_sites: int
    dynamic_batch: bool
    notes: list[str] = field(default_factory=list)
    dynamic_sequence: bool = False
    external_data: Path | None = None  # ONNX: the weights file beside the .onnx, when they are kept outside it
    format: str = ""  # the target's name
    companions: list[Path] = field(default_factory=list)  # every file written beside ``path``
    backend: str | None = None

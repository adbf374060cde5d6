"""Parity: onnxruntime against the stripped and the original model in PyTorch, per output."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .errors import ExportError, InputError

__all__ = ["verify", "ParityReport", "OutputParity", "GraphCheck", "compare_graphs", "ort_session"]


@dataclass
class OutputParity:
    name: str
    reference: str  # "stripped" or "original"
    shape: list[int]
    dtype: str
    shape_ok: bool
    dtype_ok: bool
    max_abs: float
    max_rel: float
    mismatched: int
    passed: bool


@dataclass
class GraphCheck:
    op_types_equal: bool
    standard_domain_only: bool
    op_types: list[str]
    reference_op_types: list[str]
    nonstandard: list[str] = field(default_factory=list)
    first_difference: str = ""

    @property
    def passed(self) -> bool:
        return self.op_types_equal and self.standard_domain_only


@dataclass
class ParityReport:
    onnx_path: str
    runtime: str
    providers: list[str]
    optimization: str
    atol: float
    rtol: float
    batches: int
    seed: int
    outputs: list[OutputParity]
    graph: GraphCheck | None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and (self.graph is None or self.graph.passed)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["max_abs"] = self.max_abs
        if self.graph is not None:
            d["graph"]["passed"] = self.graph.passed
        return d

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        worst = max(self.outputs, key=lambda o: o.max_abs, default=None)
        rel = f", max rel {worst.max_rel:.2e}" if worst else ""
        graph = ""
        if self.graph is not None:
            graph = "; graph: same op types as the original" if self.graph.op_types_equal else (
                f"; graph differs from the original at {self.graph.first_difference}")
        return (
            f"parity {verdict}: {len(self.outputs)} output comparisons over {self.batches} batch(es), "
            f"max abs {self.max_abs:.2e}{rel} (atol {self.atol:g}, rtol {self.rtol:g}){graph}"
        )


_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def ort_session(path, *, optimization: str = "all", optimized_path: str | None = None, threads: int | None = None):
    """An onnxruntime CPU session with an explicit optimisation level."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {path}: {str(exc).strip().splitlines()[0][:300]}") from exc


def _load_onnx(path):
    import onnx

    path = Path(path)
    if not path.exists():
        raise InputError(f"ONNX file {path} not found")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a valid ONNX model ({msg}); export it again") from exc
    return proto


def compare_graphs(proto, reference_proto) -> GraphCheck:
    """Op types in order, and whether every node is in the standard ONNX domain."""
    ops = [n.op_type for n in proto.graph.node]
    ref = [n.op_type for n in reference_proto.graph.node]
    nonstd = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    first = ""
    if ops != ref:
        i = next((i for i, (a, b) in enumerate(zip(ops, ref)) if a != b), min(len(ops), len(ref)))
        a = ops[i] if i < len(ops) else "<end>"
        b = ref[i] if i < len(ref) else "<end>"
        first = f"node {i}: {a} (original: {b})"
    return GraphCheck(ops == ref, not nonstd, ops, ref, nonstd, first)


def _batch_inputs(example: Sequence[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in example:
        if t.dtype.is_floating_point:
            out.append(torch.randn(t.shape, generator=g).to(t.dtype))
        elif t.dtype == torch.bool:
            out.append(torch.randint(0, 2, t.shape, generator=g).bool())
        else:
            lo, hi = int(t.min()) if t.numel() else 0, int(t.max()) + 1 if t.numel() else 2
            out.append(torch.randint(lo, max(hi, lo + 1), t.shape, generator=g).to(t.dtype))
    return tuple(out)


def _compare(name, reference, ort_out: np.ndarray, torch_out: torch.Tensor, atol, rtol) -> OutputParity:
    expected = torch_out.detach().cpu().numpy()
    shape_ok = tuple(ort_out.shape) == tuple(expected.shape)
    dtype_ok = ort_out.dtype == expected.dtype
    if shape_ok and expected.size:
        a, b = ort_out.astype(np.float64), expected.astype(np.float64)
        diff = np.abs(a - b)
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)
        rel = diff / np.maximum(np.abs(b), np.finfo(np.float64).tiny)
        bad = diff > atol + rtol * np.abs(b)
        max_abs, max_rel, mismatched = float(diff.max()), float(np.where(diff == 0, 0, rel).max()), int(bad.sum())
    else:
        max_abs = max_rel = 0.0 if shape_ok else float("inf")
        mismatched = 0 if shape_ok else int(expected.size)
    return OutputParity(name, reference, list(expected.shape), str(expected.dtype), shape_ok, dtype_ok,
                        max_abs, max_rel, mismatched, shape_ok and dtype_ok and mismatched == 0)


def verify(
    onnx_path: str | os.PathLike,
    original: nn.Module,
    example_args: Sequence[torch.Tensor],
    *,
    stripped: nn.Module | None = None,
    reference_onnx: str | os.PathLike | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    batches: int = 3,
    seed: int = 0,
    optimization: str = "all",
    batch_sizes: Sequence[int] | None = None,
) -> ParityReport:
    """Runs the ONNX model in onnxruntime (CPU) and compares every output with PyTorch.

    Each of ``batches`` seeded input batches (shaped like ``example_args``) goes through
    onnxruntime, the ``stripped`` model (if given) and the ``original`` model in eval mode;
    each output is judged elementwise by ``|ort - torch| <= atol + rtol * |torch|``, with
    shape and dtype. With ``reference_onnx`` (the export of the original ReLU model) the op
    types, in order, must be equal and every node must be in the standard domain.

    Returns:
        A ``ParityReport``; ``report.passed`` tells the verdict.

    Raises:
        InputError: the ONNX file is missing or invalid, or inputs do not fit it.
    """
    import onnxruntime as ort

    proto = _load_onnx(onnx_path)
    graph = compare_graphs(proto, _load_onnx(reference_onnx)) if reference_onnx is not None else None
    session = ort_session(onnx_path, optimization=optimization)
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    example_args = tuple(example_args)
    if len(in_names) != len(example_args):
        raise InputError(
            f"{Path(onnx_path).name} takes {len(in_names)} input(s) ({', '.join(in_names)}) but the model "
            f"was given {len(example_args)}; check --input-shape or example_inputs()"
        )
    references = [("original", original.eval())] + ([("stripped", stripped.eval())] if stripped is not None else [])
    results: list[OutputParity] = []
    sizes = list(batch_sizes) if batch_sizes else [None]
    runs = 0
    for b in range(batches):
        for size in sizes:
            example = example_args
            if size is not None:
                example = tuple(t[:1].expand(size, *t.shape[1:]).contiguous() for t in example_args)
            inputs = _batch_inputs(example, seed + b)
            try:
                ort_outs = session.run(out_names, {n: t.numpy() for n, t in zip(in_names, inputs)})
            except Exception as exc:
                raise InputError(
                    f"onnxruntime rejected inputs of shape {[tuple(t.shape) for t in inputs]}: "
                    f"{str(exc).strip().splitlines()[0][:200]}"
                ) from exc
            runs += 1
            for ref_name, module in references:
                with torch.no_grad():
                    flat, _ = tree_flatten(module(*inputs))
                flat = [t for t in flat if isinstance(t, torch.Tensor)]
                if len(flat) != len(ort_outs):
                    raise InputError(f"the ONNX model has {len(ort_outs)} outputs, the {ref_name} model {len(flat)}; "
                                     "is it the export of this model?")
                for name, o, t in zip(out_names, ort_outs, flat):
                    results.append(_compare(name, ref_name, o, t, atol, rtol))
    merged = _merge(results)
    return ParityReport(str(onnx_path), f"onnxruntime {ort.__version__}", ["CPUExecutionProvider"],
                        _OPT_LEVELS[optimization], atol, rtol, runs, seed, merged, graph)


def _merge(results: list[OutputParity]) -> list[OutputParity]:
    """One row per (output, reference): worst figures over all batches."""
    rows: dict[tuple[str, str], OutputParity] = {}
    for r in results:
        key = (r.name, r.reference)
        if key not in rows:
            rows[key] = r
            continue
        w = rows[key]
        rows[key] = OutputParity(r.name, r.reference, r.shape, r.dtype, w.shape_ok and r.shape_ok,
                                 w.dtype_ok and r.dtype_ok, max(w.max_abs, r.max_abs), max(w.max_rel, r.max_rel),
                                 w.mismatched + r.mismatched, w.passed and r.passed)
    return list(rows.values())

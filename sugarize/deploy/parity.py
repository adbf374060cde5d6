"""Parity: a deploy target's runtime against the stripped and the original model in PyTorch, per output.

Written once over every target (``deploy/targets.py``): the target runs its artifact and
describes it; the comparison, the tolerances and the non-finite rules are the same for all."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..errors import InputError, SugarizeError, first_line
from ..modes import eval_mode, without_kv_cache

__all__ = ["verify", "ParityReport", "OutputParity", "GraphCheck", "compare_graphs", "graph_check"]


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
    nonfinite: int = 0  # elements NaN (or the same inf) on both sides: a failure unless allowed


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
    path: str
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
    structure: Any = None  # a StructureReport when a reference export was compared
    format: str = "onnx"

    @property
    def artifact(self) -> str:  # the name before the other targets came
        return self.path

    @property
    def passed(self) -> bool:
        return (all(o.passed for o in self.outputs) and (self.graph is None or self.graph.passed)
                and (self.structure is None or self.structure.passed))

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["max_abs"] = self.max_abs
        if self.graph is not None:
            d["graph"]["passed"] = self.graph.passed
        if self.structure is not None:
            d["structure"] = self.structure.to_dict()
        return d

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        worst = max(self.outputs, key=lambda o: o.max_abs, default=None)
        rel = f", max rel {worst.max_rel:.2e}" if worst else ""
        graph = ""
        if self.graph is not None:
            graph = "; graph: same op types as the original" if self.graph.op_types_equal else (
                f"; graph differs from the original at {self.graph.first_difference}")
        nonfinite = sum(o.nonfinite for o in self.outputs)
        both = f"; {nonfinite} element(s) NaN/inf on both sides" if nonfinite else ""
        line = (
            f"parity {verdict} ({self.runtime}): {len(self.outputs)} output comparisons over {self.batches} "
            f"batch(es), max abs {self.max_abs:.2e}{rel} (atol {self.atol:g}, rtol {self.rtol:g}){both}{graph}"
        )
        if self.structure is not None:
            line += "\n" + self.structure.summary()
        return line


def _load_onnx(path):
    from .onnx_target import load_onnx

    return load_onnx(path)


def compare_graphs(proto, reference_proto) -> GraphCheck:
    """Op types in order, and whether every node is in the standard ONNX domain."""
    ops = [n.op_type for n in proto.graph.node]
    ref = [n.op_type for n in reference_proto.graph.node]
    nonstd = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    from .artifact import first_node_difference

    def sigs(p):
        return [(n.op_type, n.domain or "ai.onnx", ()) for n in p.graph.node]

    first = first_node_difference(sigs(proto), sigs(reference_proto), "op type of node") or ""
    return GraphCheck(ops == ref, not nonstd, ops, ref, nonstd, first)


def graph_check(structure, reference, target) -> GraphCheck:
    """Op types in order, and whether every node is one the target's stock runtime ships."""
    from .artifact import first_node_difference

    ops, ref = [n[0] for n in structure.nodes], [n[0] for n in reference.nodes]
    nonstd = sorted({f"{n[1]}::{n[0]}" for n in structure.nodes if not target.standard(n)})
    first = first_node_difference([(n[0], n[1], ()) for n in structure.nodes],
                                  [(n[0], n[1], ()) for n in reference.nodes], "op type of node") or ""
    return GraphCheck(ops == ref, not nonstd, ops, ref, nonstd, first)


def _batch_inputs(example: Sequence[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    from ..files.inputs import random_tensor

    g = torch.Generator().manual_seed(seed)
    out = []
    for t in example:
        if t.dtype.is_floating_point or t.dtype == torch.bool or not t.numel():
            out.append(random_tensor(t.shape, t.dtype, g))
        else:  # integer inputs (token ids) stay within the example's range
            lo, hi = int(t.min()), int(t.max()) + 1
            out.append(random_tensor(t.shape, t.dtype, g, lo, max(hi, lo + 1)))
    return tuple(out)


def _compare(name, reference, ort_out: np.ndarray, torch_out: torch.Tensor, atol, rtol,
             allow_nonfinite: bool = False) -> OutputParity:
    """Elementwise ``|ort - torch| <= atol + rtol * |torch|``, judged the way polygraphy does
    for non-finite values: NaN or inf on one side only is a mismatch (infinitely far); NaN or
    the same inf on both sides is counted in ``nonfinite`` and fails unless allowed."""
    expected = torch_out.detach().cpu().numpy()
    shape_ok = tuple(ort_out.shape) == tuple(expected.shape)
    dtype_ok = ort_out.dtype == expected.dtype
    nonfinite = 0
    if shape_ok and expected.size:
        a, b = ort_out.astype(np.float64), expected.astype(np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        both = ~np.isfinite(a) & ~np.isfinite(b) & ((np.isnan(a) & np.isnan(b)) | (a == b))
        with np.errstate(invalid="ignore"):
            diff = np.where(finite, np.abs(a - b), np.where(both, 0.0, np.inf))
        rel = diff / np.maximum(np.abs(np.where(finite, b, 1.0)), np.finfo(np.float64).tiny)
        bad = ~both & ~(diff <= atol + rtol * np.abs(np.where(finite, b, 0.0)))
        nonfinite = int(both.sum())
        max_abs, max_rel, mismatched = float(diff.max()), float(np.where(diff == 0, 0, rel).max()), int(bad.sum())
    else:
        max_abs = max_rel = 0.0 if shape_ok else float("inf")
        mismatched = 0 if shape_ok else int(expected.size)
    passed = shape_ok and dtype_ok and mismatched == 0 and (allow_nonfinite or nonfinite == 0)
    return OutputParity(name, reference, list(expected.shape), str(expected.dtype), shape_ok, dtype_ok,
                        max_abs, max_rel, mismatched, passed, nonfinite)


def verify(
    artifact: str | os.PathLike,
    original: nn.Module,
    example_args: Sequence[torch.Tensor],
    *,
    stripped: nn.Module | None = None,
    reference_artifact: str | os.PathLike | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    batches: int = 3,
    seed: int = 0,
    optimization: str = "all",
    batch_sizes: Sequence[int] | None = None,
    runtime: str | None = None,
    structure: bool = True,
    allow_nonfinite: bool = False,
    sequence_lengths: Sequence[int] | None = None,
    target: Any = None,
) -> ParityReport:
    """Runs an artifact in its target's runtime and compares every output with PyTorch.

    The artifact is an ONNX file (onnxruntime, CPU, or OpenVINO), an ORT-format file
    (onnxruntime) or an ExecuTorch program (``executorch.runtime``): ``target`` (a
    ``deploy.targets`` entry or its name) or, by default, the kind of the file. Each of
    ``batches`` seeded input batches (shaped like ``example_args``) goes through the runtime,
    the ``stripped`` model (if given) and the ``original`` model in eval mode; each output is
    judged elementwise by ``|runtime - torch| <= atol + rtol * |torch|``, with shape and dtype.
    With ``reference_artifact`` (the original ReLU model's artifact, made the same way) the op
    types, in order, must be equal and every node one the stock runtime ships, and (with
    ``structure``) the two artifacts must be structurally identical (``artifact.compare_structures``:
    for ONNX before and after onnxruntime's full optimisation; for ExecuTorch instruction by
    instruction and delegate node by node; for the ORT format with the operator set).

    ``batch_sizes`` and ``sequence_lengths`` (for a file exported with a dynamic batch or
    sequence) reshape the inputs: every batch size with every length, the length on dimension 1
    of each token input (an integer tensor of two or more dimensions).

    ``runtime="openvino"`` runs an ONNX file in OpenVINO's CPU plugin at explicit float32 (the
    verdict), and reports the plugin's default inference precision in ``notes``.

    Non-finite values: NaN or inf in an output on one side only is a mismatch; NaN or the
    same inf on both sides is reported (``nonfinite``) and fails unless ``allow_nonfinite``.

    Returns:
        A ``ParityReport``; ``report.passed`` tells the verdict.

    Raises:
        InputError: the file is missing or invalid, or inputs do not fit it.
    """
    from .targets import get_target, target_of_file

    target = get_target(target) if isinstance(target, str) else (target or target_of_file(artifact))
    target.check_available()
    target.check_file(artifact)
    graph = shape_report = None
    if reference_artifact is not None:
        target.check_file(reference_artifact)
        mine = target.describe(artifact, full=structure)
        theirs = target.describe(reference_artifact, full=structure)
        graph = graph_check(mine, theirs, target)
        if structure:
            from .artifact import compare_structures

            shape_report = compare_structures(mine, theirs)
    runner = target.runner(artifact, runtime=runtime, optimization=optimization)
    default_runner = target.informative_runner(artifact, runtime)
    in_names, out_names = runner.inputs, runner.outputs
    example_args = tuple(example_args)
    if len(in_names) != len(example_args):
        raise InputError(
            f"{Path(artifact).name} takes {len(in_names)} input(s) ({', '.join(in_names)}) but the model "
            f"was given {len(example_args)}; check --input-shape or example_inputs()"
        )
    references = [("original", original)] + ([("stripped", stripped)] if stripped is not None else [])
    with eval_mode(original, stripped), without_kv_cache(original, stripped):  # both given back after
        results, runs, default_worst = _run_batches(runner, default_runner, references, example_args, batches, seed,
                                                    batch_sizes, out_names, runtime or target.runtimes[0], atol,
                                                    rtol, allow_nonfinite, sequence_lengths)
    merged = _merge(results)
    notes = []
    if default_runner is not None:
        notes.append(f"{default_runner.version}: max abs {default_worst:.2e} vs the original "
                     "(informative; the verdict is judged at f32)")
    return ParityReport(str(artifact), runner.version, runner.providers, runner.optimization,
                        atol, rtol, runs, seed, merged, graph, notes, shape_report, target.name)


def _shaped(example_args: tuple, size: int | None, length: int | None) -> tuple:
    """The example inputs at batch ``size`` and, for token inputs, sequence ``length``."""
    from .export import is_token_input

    out = []
    for t in example_args:
        if size is not None:
            t = t[:1].expand(size, *t.shape[1:])
        if length is not None and is_token_input(t):
            t = t[:, :1].expand(t.shape[0], length, *t.shape[2:])
        out.append(t.contiguous())
    return tuple(out)


def _run_batches(runner, default_runner, references, example_args, batches, seed, batch_sizes, out_names,
                 runtime, atol, rtol, allow_nonfinite, sequence_lengths=None):
    """Every seeded batch through the runtime and the PyTorch references: the per-output rows."""
    default_worst = 0.0
    results: list[OutputParity] = []
    shapes = [(b, n) for b in (list(batch_sizes) if batch_sizes else [None])
              for n in (list(sequence_lengths) if sequence_lengths else [None])]
    runs = 0
    for b in range(batches):
        for size, length in shapes:
            example = _shaped(example_args, size, length) if (size, length) != (None, None) else example_args
            inputs = _batch_inputs(example, seed + b)
            try:
                ort_outs = runner.run([t.numpy() for t in inputs])
                default_outs = default_runner.run([t.numpy() for t in inputs]) if default_runner else None
            except SugarizeError:
                raise
            except Exception as exc:
                raise InputError(
                    f"{runtime} rejected inputs of shape {[tuple(t.shape) for t in inputs]}: "
                    f"{first_line(exc)}"
                ) from exc
            runs += 1
            for ref_name, module in references:
                with torch.no_grad():
                    flat, _ = tree_flatten(module(*inputs))
                flat = [t for t in flat if isinstance(t, torch.Tensor)]
                if len(flat) != len(ort_outs):
                    raise InputError(f"the exported model has {len(ort_outs)} outputs, the {ref_name} model "
                                     f"{len(flat)}; is it the export of this model?")
                for name, o, t in zip(out_names, ort_outs, flat):
                    results.append(_compare(name, ref_name, o, t, atol, rtol, allow_nonfinite))
                if default_outs is not None and ref_name == "original":
                    for o, t in zip(default_outs, flat):
                        default_worst = max(default_worst, _compare("", "", o, t, atol, rtol).max_abs)
    return results, runs, default_worst


def _merge(results: list[OutputParity]) -> list[OutputParity]:
    """One row per (output, reference, shape): worst figures over the batches of that shape
    (with a dynamic batch, batch 1 and batch 8 each get their rows)."""
    rows: dict[tuple, OutputParity] = {}
    for r in results:
        key = (r.name, r.reference, tuple(r.shape))
        if key not in rows:
            rows[key] = r
            continue
        w = rows[key]
        rows[key] = OutputParity(r.name, r.reference, r.shape, r.dtype, w.shape_ok and r.shape_ok,
                                 w.dtype_ok and r.dtype_ok, max(w.max_abs, r.max_abs), max(w.max_rel, r.max_rel),
                                 w.mismatched + r.mismatched, w.passed and r.passed, w.nonfinite + r.nonfinite)
    return list(rows.values())

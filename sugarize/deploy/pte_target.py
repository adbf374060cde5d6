"""The ExecuTorch target: a ``.pte`` program, lowered to XNNPACK (default) or the portable kernels.

``torch.export`` -> ``to_edge_transform_and_lower`` (with ``XnnpackPartitioner`` for
``backend="xnnpack"``) -> ``to_executorch`` -> the program's bytes. Parity runs those bytes in
``executorch.runtime`` (the Python binding of the C++ runtime). The structure is read from the
program flatbuffer: inputs and outputs (sizes, dtype, whether dynamic), the instruction list
(kernel calls by operator, delegate calls by backend), constant tensors, and each XNNPACK
delegate's graph with every node's fields and output min/max, which is how a ReLU fused into
a convolution appears (``output_min=0.0``). Needs the ``executorch`` extra.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ExportError, InputError, first_line
from .artifact import ExportResult, Runner, Structure, file_digest
from .target import DYNAMIC_BATCH, DYNAMIC_SEQUENCE, ExportOptions, Target, TargetOption

__all__ = ["PteTarget", "export_pte", "describe_pte", "quantize_pte", "quantize_nodes", "BACKENDS", "MAX_DYNAMIC_BATCH"]

BACKENDS = ("xnnpack", "portable")
BACKEND = TargetOption("backend", "--backend", "pte: xnnpack (default) or portable.", str, None, BACKENDS)
PTE_MAGIC = b"ET"  # the program flatbuffer's identifier is ET<version> at bytes 4..8
# ExecuTorch plans memory for the largest shape: a dynamic batch is bounded (1..this).
MAX_DYNAMIC_BATCH = 64
INSTALL = "pip install 'sugarize[executorch]'"


def check_executorch() -> None:
    """Raises InputError with the install line when executorch is missing."""
    import importlib.util

    try:
        with _quiet():  # finding the submodule imports the package, which imports torchao
            found = importlib.util.find_spec("executorch") is not None and \
                importlib.util.find_spec("executorch.runtime") is not None
    except ImportError:  # a broken or partial install
        found = False
    if not found:
        raise InputError(f"--format pte needs ExecuTorch: {INSTALL}")


# ExecuTorch and torchao log optional-kernel misses and progress at import and lowering
_LOGGERS = ("torch.export", "torch._dynamo", "torch.fx", "torch.utils._pytree", "torchao", "executorch", "")


def _quiet():
    from .export import quiet

    return quiet(_LOGGERS)


def _dynamic_shapes(example_args: tuple, batch: bool, sequence: bool):
    import torch
    from .export import is_token_input

    if not (batch or sequence):
        return None
    dims = {}
    if batch:
        dims["batch"] = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    shapes = []
    for i, a in enumerate(example_args):
        spec = {}
        if batch and isinstance(a, torch.Tensor) and a.dim() > 0:
            spec[0] = dims["batch"]
        if sequence and is_token_input(a):
            spec[1] = torch.export.Dim(f"sequence_{i}", min=1, max=max(int(a.shape[1]), 2))
        shapes.append(spec or None)
    return tuple(shapes)


def lower(model: torch.nn.Module, example_args: Sequence[Any], *, backend: str = "xnnpack",
          dynamic_batch: bool = False, dynamic_sequence: bool = False, exported=None) -> bytes:
    """The ``.pte`` bytes of a plain model: torch.export, then lowering to ``backend``."""
    import torch
    check_executorch()
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    example_args = tuple(example_args)
    if dynamic_batch:
        example_args = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1
                             else a for a in example_args)
    try:
        with _quiet(), torch.no_grad():
            from executorch.exir import to_edge_transform_and_lower

            if exported is None:
                exported = torch.export.export(model, example_args,
                                               dynamic_shapes=_dynamic_shapes(example_args, dynamic_batch,
                                                                              dynamic_sequence))
            partitioner = []
            if backend == "xnnpack":
                from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

                partitioner = [XnnpackPartitioner()]
            program = to_edge_transform_and_lower(exported, partitioner=partitioner).to_executorch()
            return bytes(program.buffer)
    except InputError:
        raise
    except Exception as exc:
        from .export import interrupted

        if interrupted(exc):
            raise KeyboardInterrupt from exc
        raise ExportError(f"ExecuTorch lowering ({backend}) failed: {first_line(exc)}") from exc


def export_pte(model: torch.nn.Module, path: str | os.PathLike, example_args: Sequence[Any], *,
               backend: str = "xnnpack", dynamic_batch: bool = False, dynamic_sequence: bool = False,
               force: bool = True) -> ExportResult:
    """Strips SUGAR, exports ``model`` in eval mode and lowers it to an ExecuTorch program at
    ``path`` (written beside it, checked by loading it in ``executorch.runtime``, then renamed).

    Args:
        model: a SUGAR model, a stripped model or any ReLU model.
        path: the ``.pte`` file to write.
        example_args: example inputs for ``model.forward``.
        backend: ``"xnnpack"`` (mobile CPUs; the default) or ``"portable"`` (ExecuTorch's
            reference kernels, no delegate).
        dynamic_batch: dimension 0 of every tensor input takes 1 to ``MAX_DYNAMIC_BATCH``.
        dynamic_sequence: dimension 1 of every token input takes 1 to its example length.

    Raises:
        InputError: executorch is not installed (the line says what to install).
        ExportError: torch.export or the lowering failed.
    """
    import torch
    from ..files.fsutil import atomic_path
    from ..modes import eval_mode, without_kv_cache
    from ..passes.strip import count_sugar, has_sugar, strip

    check_executorch()
    sites = count_sugar(model)
    plain = strip(model) if has_sugar(model) else model
    with eval_mode(plain), without_kv_cache(plain):
        data = lower(plain, example_args, backend=backend, dynamic_batch=dynamic_batch,
                     dynamic_sequence=dynamic_sequence)
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
        PteTarget().check_file(tmp)
        structure = describe_pte(tmp)
    return ExportResult(path=Path(path), opset=None, op_types=[n[0] for n in structure.nodes],
                        inputs=[f"input_{i}" for i in range(len(structure.inputs))],
                        outputs=[f"output_{i}" for i in range(len(structure.outputs))], stripped_sites=sites,
                        dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence, format="pte",
                        backend=backend)


def _check_bounded(program, name: str) -> None:
    """InputError if a method of ``program`` jumps back (a ``JumpFalseCall`` to an instruction at
    or before its own): a loop. ExecuTorch's runtime cannot be stopped mid-run, and no program
    sugarize exports has one, so such a file is refused before it runs."""
    for plan in program.execution_plan:
        for chain in plan.chains:
            for i, instruction in enumerate(chain.instructions):
                args = instruction.instr_args
                if type(args).__name__ == "JumpFalseCall" and args.destination_instruction <= i:
                    raise InputError(f"{name} holds a loop (instruction {i} of {plan.name} jumps back to "
                                     f"{args.destination_instruction}): ExecuTorch cannot be stopped mid-run, so "
                                     "sugarize runs no program with one; export it again")


def _program(data: bytes):
    with _quiet():
        from executorch.exir._serialize._program import deserialize_pte_binary

        return deserialize_pte_binary(data).program


_NONFINITE = re.compile(rb"(?<=[:\[,\s])(-?)(inf|nan)\b")


def _xnn_graph(payload: bytes) -> dict:
    """An XNNPACK delegate's payload (header, flatbuffer, constants) as its graph, in JSON terms."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile
    import importlib.resources as resources

    header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
    if not header.is_valid():
        raise ValueError("invalid XNNPACK delegate header")
    fb = payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    schema = resources.files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs").read_bytes()
    with tempfile.TemporaryDirectory(prefix="sugarize-xnn-") as d:
        Path(d, "schema.fbs").write_bytes(schema)
        Path(d, "graph.bin").write_bytes(fb)
        import subprocess

        try:
            with _quiet():  # flatc prints its usage on a damaged buffer: kept off the terminal
                _flatc_decompile(d, str(Path(d, "schema.fbs")), str(Path(d, "graph.bin")))
        except subprocess.CalledProcessError:
            raise ValueError("its XNNPACK delegate's graph is damaged: flatc could not decode it") from None
        text = Path(d, "graph.json").read_bytes()
    return json.loads(_NONFINITE.sub(rb'"\1\2"', text))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _plain(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_plain(x) for x in v)
    return v


def _xnn_node(node: dict) -> tuple:
    fields = dict(node.get("xnode_union") or {})
    mm = node.get("output_min_max") or {}
    for k in ("output_min", "output_max"):
        if k in mm:
            fields[k] = mm[k]
    return (node.get("xnode_union_type", "?"), "xnnpack", _plain(fields))


def _xnn_value(value: dict) -> tuple:
    v = value.get("xvalue_union") or {}
    return (value.get("xvalue_union_type", "?"), v.get("datatype"), tuple(v.get("dims") or ()),
            bool(v.get("constant_buffer_idx")))


def _tensor_info(value) -> tuple:
    t = value.val
    if not hasattr(t, "sizes"):
        return (type(t).__name__,)
    return (int(t.scalar_type), tuple(t.sizes), int(t.shape_dynamism))


def describe_pte(path: str | os.PathLike) -> Structure:
    """An ExecuTorch program as a ``Structure``: one node per instruction (kernel calls by
    operator, delegate calls by backend), constant tensors as parameters, and each delegate's
    graph as a section (an XNNPACK graph node by node; another backend's payload by digest)."""
    import hashlib

    data = Path(path).read_bytes()
    program = _program(data)
    if len(program.execution_plan) != 1:
        raise InputError(f"{Path(path).name} holds {len(program.execution_plan)} methods; sugarize checks programs "
                         "with one (forward)")
    plan = program.execution_plan[0]
    values = plan.values
    nodes, sections, params = [], [], []
    for chain in plan.chains:
        for instruction in chain.instructions:
            args = instruction.instr_args
            kind = type(args).__name__
            if kind == "KernelCall":
                op = plan.operators[args.op_index]
                namespace, _, base = op.name.rpartition("::")
                nodes.append((f"{base}.{op.overload}", namespace or "aten", ()))
            elif kind == "DelegateCall":
                d = plan.delegates[args.delegate_index]
                nodes.append(("delegate", d.id, (("index", args.delegate_index),)))
            else:
                nodes.append((kind, "executorch", ()))
    for i, d in enumerate(plan.delegates):
        payload = bytes(program.backend_delegate_data[d.processed.index].data) \
            if int(d.processed.location) == 0 else b""
        if "xnnpack" in d.id.lower() and payload:
            graph = _xnn_graph(payload)
            section = tuple(_xnn_node(n) for n in graph.get("xnodes", []))
            params += [("xnnpack", *_xnn_value(v)[1:3]) for v in graph.get("xvalues", []) if _xnn_value(v)[3]]
            sections.append((f"delegate {i} ({d.id})", section))
        else:
            sections.append((f"delegate {i} ({d.id})", (("payload", d.id, (("sha256", hashlib.sha256(payload)
                                                                               .hexdigest()),)),)))
    params += [("constant", int(v.val.scalar_type), tuple(v.val.sizes)) for v in values
               if hasattr(v.val, "sizes") and int(getattr(v.val, "data_buffer_idx", 0) or 0) > 0]
    operators = tuple(sorted({f"{op.name}.{op.overload}" for op in plan.operators}))
    return Structure("pte", tuple(_tensor_info(values[i]) for i in plan.inputs),
                     tuple(_tensor_info(values[i]) for i in plan.outputs), tuple(nodes), tuple(params),
                     tuple(sections), operators, digest=file_digest(path), size=len(data))


def quantize_pte(model: torch.nn.Module, path: str | os.PathLike, example_args: Sequence[Any],
                 calibration: Sequence[Sequence[torch.Tensor]], *, force: bool = True) -> Path:
    """int8 ExecuTorch program of a plain float model: PT2E quantisation with the XNNPACK
    quantizer (symmetric, per-channel weights, static activations) calibrated on
    ``calibration`` batches, then lowered to XNNPACK; written atomically.

    Raises:
        DataFileError: no calibration batches.
        ExportError: quantisation or lowering failed.
    """
    import torch
    from ..errors import DataFileError
    from ..files.fsutil import atomic_path

    check_executorch()
    batches = [tuple(torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in b) for b in calibration]
    if not batches:
        raise DataFileError("no calibration batches: the data file's train_loader() yielded nothing")
    example_args = tuple(example_args)
    from ..modes import eval_mode

    try:
        with _quiet(), torch.no_grad(), eval_mode(model):
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            graph = torch.export.export(model, example_args).module()
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(graph, quantizer)
            for b in batches:
                prepared(*b)
            converted = convert_pt2e(prepared)
            exported = torch.export.export(converted, example_args)
    except Exception as exc:
        raise ExportError(f"PT2E int8 quantisation failed: {first_line(exc)}") from exc
    data = lower(model, example_args, exported=exported)
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
        PteTarget().check_file(tmp)
    return Path(path)


def quantize_nodes(path: str | os.PathLike) -> int:
    """Quantize/dequantize steps in a program: XNNPACK ``XNNConvert`` nodes and quantize kernels."""
    s = describe_pte(path)
    nodes = [n for _, section in s.sections for n in section] + list(s.nodes)
    return sum(n[0] == "XNNConvert" or "quantize" in n[0] for n in nodes)


class PteRunner:
    """An ExecuTorch program in ``executorch.runtime``, from the bytes that were checked."""

    def __init__(self, path):
        check_executorch()
        data = Path(path).read_bytes()
        try:
            program = _program(data)
        except Exception as exc:
            raise InputError(f"{Path(path).name} is not a readable ExecuTorch program ({first_line(exc)}); "
                             "export it again") from None
        _check_bounded(program, Path(path).name)
        try:
            with _quiet():
                from executorch.runtime import Runtime

                runtime = Runtime.get()
                program = runtime.load_program(data)
                if "forward" not in program.method_names:
                    raise InputError(f"{Path(path).name} has no forward method (it has "
                                     f"{', '.join(sorted(program.method_names)) or 'none'})")
                self.method = program.load_method("forward")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"executorch.runtime cannot load {Path(path).name} ({first_line(exc)}); "
                             "export it again") from None
        meta = self.method.metadata
        self.inputs = [f"input_{i}" for i in range(meta.num_inputs())]
        self.outputs = [f"output_{i}" for i in range(meta.num_outputs())]
        self._program = program
        import importlib.metadata

        backends = sorted({d for d in _delegate_ids(data)})
        self.version = (f"executorch {importlib.metadata.version('executorch')}"
                        f" ({', '.join(backends) if backends else 'portable kernels'})")
        self.providers = backends or ["portable"]
        self.optimization = "as lowered"

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        from .export import quiet_fds

        with quiet_fds():  # ExecuTorch's cpuinfo lines on first use
            outs = self.method.execute([torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        return [o.detach().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outs]


def _delegate_ids(data: bytes) -> list[str]:
    plan = _program(data).execution_plan
    return [d.id for p in plan for d in p.delegates]


class PteTarget(Target):
    """ExecuTorch: a ``.pte`` program lowered to XNNPACK (or portable kernels), run in
    ``executorch.runtime``, compared instruction by instruction and delegate node by node."""

    name = "pte"
    title = "ExecuTorch"
    suffix = ".pte"
    extra = "executorch"
    options = (DYNAMIC_BATCH, DYNAMIC_SEQUENCE, BACKEND)
    runtimes = ("executorch",)
    int8 = "OUTPUT.int8.pte (PT2E, XNNPACK quantizer)"

    def check_available(self) -> None:
        check_executorch()

    def quantize(self, plain, reference, example_args, artifact, reference_artifact, out, calibration, validation,
                 force):
        """PT2E with the XNNPACK quantizer, of the stripped model and of the original; their
        structures compared, and the accuracy of float and int8 on the validation batches."""
        from .artifact import compare_structures
        from .quantize import Int8Report, runner_accuracy

        with tempfile.TemporaryDirectory() as work:
            quantize_pte(plain, out, example_args, calibration, force=force)
            q_ref = quantize_pte(reference, Path(work) / "original.int8.pte", example_args, calibration)
            structure = compare_structures(describe_pte(out), describe_pte(q_ref))
        float_acc = int8_acc = None
        if validation is not None:
            float_acc = runner_accuracy(PteRunner(artifact), validation())
            int8_acc = runner_accuracy(PteRunner(out), validation())
        return Int8Report(str(out), len(calibration), float_acc, int8_acc, quantize_nodes(out), structure,
                          scheme="PT2E, XNNPACK quantizer")

    def summary(self, result: ExportResult) -> str:
        return f"pte, {result.backend}, {len(result.op_types)} nodes"

    def export(self, model, path: Path, example_args: Sequence[Any], options: ExportOptions) -> ExportResult:
        return export_pte(model, path, example_args, backend=options.backend or "xnnpack",
                          dynamic_batch=bool(options.dynamic_batch), dynamic_sequence=bool(options.dynamic_sequence))

    def sniff(self, path: Path, head: bytes) -> bool:
        return head[4:6] == PTE_MAGIC

    def check_file(self, path) -> None:
        check_executorch()
        path = Path(path)
        if not path.is_file():
            raise InputError(f"ExecuTorch file {path} not found")
        try:
            describe_pte(path)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path.name} is not a readable ExecuTorch program ({first_line(exc)}); "
                             "export it again") from None
        PteRunner(path)

    def runner(self, path, *, runtime: str | None = None, optimization: str = "all") -> Runner:
        if runtime not in (None, "executorch"):
            raise InputError(f"--runtime {runtime} does not run .pte files; they run in executorch")
        return PteRunner(path)

    def describe(self, path, *, full: bool = True) -> Structure:
        return describe_pte(path)

    def standard(self, node: tuple) -> bool:
        return node[1] != "sugarize"

    def dynamic_dims(self, path) -> tuple[bool, bool]:
        s = describe_pte(path)
        dynamic = [len(t) == 3 and t[2] != 0 for t in s.inputs]
        integer = [len(t) == 3 and t[0] in (3, 4) for t in s.inputs]  # Int, Long
        return (any(d for d in dynamic),
                any(d and i and len(t[1]) >= 2 for d, i, t in zip(dynamic, integer, s.inputs)))

    def export_options_of(self, path) -> ExportOptions:
        batch, sequence = self.dynamic_dims(path)
        ids = _delegate_ids(Path(path).read_bytes())
        backend = "xnnpack" if any("xnnpack" in i.lower() for i in ids) else "portable"
        return ExportOptions(dynamic_batch=batch, dynamic_sequence=sequence, backend=backend)

"""Strip, export to ONNX with torch's dynamo exporter, and check the file with onnx.checker."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import ExportError, InternalError
from ..modes import eval_mode, without_kv_cache
from ..files.fsutil import atomic_folder
from ..passes.strip import count_sugar, has_sugar, strip
from .artifact import ExportResult

__all__ = ["export_onnx", "ExportResult", "onnx_op_types", "default_opset", "max_opset", "check_opset", "file_opset",
           "MIN_OPSET"]

# The lowest opset sugarize exports and verifies (parity and structure tested from here up).
MIN_OPSET = 13


def default_opset() -> int:
    """The exporter's default opset (torch's dynamo exporter)."""
    from torch.onnx._internal.exporter import _constants

    return int(_constants.TORCHLIB_OPSET)


def max_opset() -> int:
    """The highest opset torch's exporter writes (``torch.onnx._constants.ONNX_MAX_OPSET``, read
    at run time: it moves with torch)."""
    from torch.onnx import _constants

    return int(_constants.ONNX_MAX_OPSET)


def file_opset(proto) -> int | None:
    """The default-domain opset an ONNX model declares (its ``opset_import``)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def check_opset(opset: int | None, what: str | None = None) -> int:
    """``opset`` (the exporter's default for None) if sugarize can export it, else ExportError
    naming ``what`` (by default ``--opset N``: say "model.onnx declares opset N" for a file)."""
    if opset is None:
        return default_opset()
    if not MIN_OPSET <= int(opset) <= max_opset():
        raise ExportError(f"{what or f'--opset {opset}'} is not supported: sugarize exports opsets {MIN_OPSET} to "
                          f"{max_opset()} (the lowest that works is {MIN_OPSET}); pick one in that range")
    return int(opset)


def _check_dtypes(model: nn.Module, example_args: tuple) -> None:
    """bfloat16 weights or inputs: onnxruntime's CPU provider has no bfloat16 Gemm or Conv."""
    tensors = [*model.parameters(), *model.buffers(), *(a for a in example_args if isinstance(a, torch.Tensor))]
    if any(t.dtype == torch.bfloat16 for t in tensors):
        raise ExportError("the model or its inputs are bfloat16, which onnxruntime's CPU provider cannot run (no "
                          "bfloat16 Gemm/Conv): export a float32 copy (model.float(), float32 inputs); quantise "
                          "the ONNX file afterwards if you need it smaller")


def _nonfinite_weights(model: nn.Module) -> list[str]:
    return [name for name, t in model.state_dict().items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _export_below_native(model: nn.Module, tmp: Path, example_args: tuple, opset: int, dynamic_batch: bool,
                         dynamic_sequence: bool = False) -> None:
    """torch's TorchScript-based exporter (``dynamo=False``), which writes opsets below the
    dynamo exporter's own. (The dynamo exporter builds its own opset and runs onnx's version
    converter, which has no down-adapters for several ops (Relu 14 -> 13, Split, ReduceMean):
    it logs the failure and keeps the higher opset.)"""
    import inspect as pyinspect

    params = [p.name for p in pyinspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [params[i] if i < len(params) else f"input_{i}" for i in range(len(example_args))]
    dynamic_axes = None
    output_names = None
    if dynamic_batch or dynamic_sequence:
        from torch.utils._pytree import tree_flatten

        outputs = [t for t in tree_flatten(model(*example_args))[0] if isinstance(t, torch.Tensor)]
        output_names = [f"output_{i}" for i in range(len(outputs))]
        axes = _dynamic_axes(example_args, dynamic_batch, dynamic_sequence)
        dynamic_axes = {n: a for n, a in zip(names, axes) if a}
        # outputs follow: batch on dimension 0; a token model's outputs carry the sequence on 1
        out_axes = {0: "batch"} if dynamic_batch else {}
        if dynamic_sequence:
            out_axes[1] = "sequence"
        dynamic_axes.update({n: {d: v for d, v in out_axes.items() if d < t.dim()} for n, t in zip(output_names, outputs)
                             if t.dim()})
    torch.onnx.export(model, example_args, str(tmp), dynamo=False, opset_version=opset, input_names=names,
                      output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)


EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")


@contextlib.contextmanager
def quiet(loggers: tuple[str, ...] = EXPORTER_LOGGERS):
    """Exporters and lowerers print progress, registry warnings and optional-kernel misses: kept off
    the user's terminal (stdout, stderr, warnings, and these loggers below ERROR; "" is the root
    logger), every level given back after."""
    loggers = [logging.getLogger(n) if n else logging.root for n in loggers]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), quiet_fds():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def quiet_fds():
    """What native code and child processes write to file descriptors 1 and 2 (flatc's usage,
    ExecuTorch's cpuinfo lines) goes to a temporary file for the block, unless the CLI's
    ``--verbose`` (``modes.tool_output``) shows it. The descriptors are the process's: while the
    block runs, another thread's output to them is held back too; they are given back after."""
    import sys
    import tempfile

    from ..modes import showing_tool_output

    if showing_tool_output():
        yield
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no descriptors 1 and 2 (a service): nothing to keep quiet
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in ``exc``'s chain of causes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _export_failure(exc: Exception) -> str:
    """One line naming the real cause: torch.onnx wraps torch.export's error in a page of advice."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "Failed to export the model with torch.export" in first:
        data_dependent = any("data-dependent" in ln.lower() or "GuardOnDataDependent" in ln for ln in text.splitlines())
        if data_dependent:
            return ("torch.onnx.export failed: torch.export cannot capture the model (data-dependent control flow); "
                    "ONNX needs one static graph: rewrite value-dependent if/else with torch.cond or torch.where, "
                    "then export again")
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
        reason_line = next((ln.strip() for ln in reason if ln.strip()), type(cause).__name__)
        if "## Exception summary" in text:  # the summary torch.onnx prints names the cause too
            after = text.split("## Exception summary", 1)[1].strip().splitlines()
            reason_line = after[0].strip() if after else reason_line
        return f"torch.onnx.export failed: torch.export cannot capture the model: {reason_line[:400]}"
    return f"torch.onnx.export failed: {first}"


def is_token_input(a) -> bool:
    """An integer tensor of at least two dimensions: token ids (batch, sequence), whose dimension
    1 ``dynamic_sequence`` makes dynamic."""
    return isinstance(a, torch.Tensor) and a.dim() >= 2 and not a.dtype.is_floating_point and a.dtype != torch.bool


def _dynamic_axes(args: Sequence[Any], batch: bool, sequence: bool) -> list[dict[int, str]]:
    """Per input, the dynamic dimensions and their names (batch: 0; sequence: 1 of token inputs)."""
    out = []
    for a in args:
        axes = {}
        if batch and isinstance(a, torch.Tensor) and a.dim() > 0:
            axes[0] = "batch"
        if sequence and is_token_input(a):
            axes[1] = "sequence"
        out.append(axes)
    return out


def _dynamic_shapes(args: Sequence[Any], batch: bool, sequence: bool):
    dims = {"batch": torch.export.Dim("batch", min=1, max=1 << 20), "sequence": torch.export.Dim.AUTO}
    return tuple({i: dims[n] for i, n in axes.items()} or None for axes in _dynamic_axes(args, batch, sequence))


# Over this many bytes of weights the file keeps them beside it (model.onnx.data): one protobuf
# message holds at most 2 GiB, and the graph needs room besides the weights.
EXTERNAL_DATA_BYTES = 1 << 30 | 1 << 29  # 1.5 GiB


def _weight_bytes(model: nn.Module) -> int:
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_args: Sequence[Any],
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
    dynamic_sequence: bool = False,
    external_data: bool | None = None,
    force: bool = True,
) -> ExportResult:
    """Strips SUGAR, exports ``model`` in eval mode to ONNX at ``path``, runs onnx.checker.

    The file (and its external data) is written in a temporary folder beside ``path`` and moved
    into place once it passed the checker, so a failed export leaves nothing behind.

    Args:
        model: a SUGAR model, a stripped model or any ReLU model.
        path: where to write the ``.onnx`` file.
        example_args: a tuple of example inputs for ``model.forward``.
        opset: ONNX opset, ``MIN_OPSET`` (13) to ``max_opset()`` (23 in torch 2.13); default
            the dynamo exporter's own (18). From 18 up the dynamo exporter writes it, below
            torch's TorchScript-based exporter. The result's ``opset`` is read back from the file.
        dynamic_batch: make dimension 0 of every tensor input dynamic.
        dynamic_sequence: make dimension 1 of every token input (an integer tensor of two or
            more dimensions) dynamic: a language model then takes any sequence length.
        external_data: keep the weights in ``<path>.data`` beside the file; None (default):
            when they are over ``EXTERNAL_DATA_BYTES`` (1.5 GiB; protobuf holds 2 GiB at most).
            Both files are written or neither. Needs opset 18 or higher.
        force: replace an existing file.

    Returns:
        An ``ExportResult`` with the op types of the exported graph.

    Raises:
        ExportError: the exporter or the checker rejected the model.
        OutputPathError: ``path`` exists (without ``force``) or is not writable.
    """
    example_args = tuple(example_args)
    stripped_sites = count_sugar(model)
    plain = strip(model) if has_sugar(model) else model
    with eval_mode(plain), without_kv_cache(plain) as no_cache:  # the caller's modes and config come back
        result = _export(plain, path, example_args, stripped_sites, opset, dynamic_batch, dynamic_sequence,
                         external_data, force)
    if no_cache:
        result.notes.append("exported without the KV cache (use_cache=False for the export, as optimum's no-past "
                            "export): the graph takes the tokens and returns the logits")
    return result


def _export(plain: nn.Module, path, example_args: tuple, stripped_sites: int, opset: int | None,
            dynamic_batch: bool, dynamic_sequence: bool, external_data: bool | None, force: bool) -> ExportResult:
    import onnx

    if has_sugar(plain):  # pragma: no cover - strip guarantees it
        raise InternalError("refusing to export: SUGAR is left after strip")
    if dynamic_batch:
        example_args = tuple(
            torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
            for a in example_args
        )
    opset = check_opset(opset)
    _check_dtypes(plain, example_args)
    notes = []
    bad = _nonfinite_weights(plain)
    if bad:
        notes.append(f"weights hold NaN or inf: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                     "the exported graph will compute NaN/inf")
        warnings.warn(f"sugarize: {notes[-1]}", stacklevel=2)
    if opset < default_opset():
        notes.append(f"opset {opset}: exported with torch's TorchScript-based exporter (dynamo=False), as the "
                     f"dynamo exporter writes opset {default_opset()}")
    external = external_data if external_data is not None else _weight_bytes(plain) > EXTERNAL_DATA_BYTES
    if external and opset < default_opset():
        raise ExportError(f"the weights ({_weight_bytes(plain) / 2**30:.1f} GiB) go in an external data file, which "
                          f"sugarize writes at opset {default_opset()} or higher; drop --opset {opset}")
    if external:
        notes.append(f"weights in {Path(path).name}.data beside the file (external data): ship both files")
    with atomic_folder(path, force=force, companions=(".data",)) as folder:
        tmp = folder / Path(path).name
        try:
            with quiet(), torch.no_grad():
                if opset < default_opset():
                    _export_below_native(plain, tmp, example_args, opset, dynamic_batch, dynamic_sequence)
                else:
                    program = torch.onnx.export(
                        plain,
                        example_args,
                        dynamo=True,
                        opset_version=opset,
                        dynamic_shapes=(_dynamic_shapes(example_args, dynamic_batch, dynamic_sequence)
                                        if dynamic_batch or dynamic_sequence else None),
                        external_data=external,
                        verbose=False,
                    )
                    program.save(str(tmp), external_data=external)
        except Exception as exc:
            if interrupted(exc):  # Ctrl-C inside torch.export, which wraps it: an interrupt, not a bad model
                raise KeyboardInterrupt from exc
            raise ExportError(_export_failure(exc)) from exc
        try:
            onnx.checker.check_model(str(tmp), full_check=True)  # by path: external data and > 2 GiB too
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc
        proto = onnx.load(str(tmp), load_external_data=False)
        written = file_opset(proto)
        if written != opset:
            raise ExportError(f"the exporter wrote opset {written}, not the requested {opset}; nothing was written")
    return ExportResult(
        path=Path(path),
        opset=written,
        op_types=[n.op_type for n in proto.graph.node],
        inputs=[i.name for i in proto.graph.input],
        outputs=[o.name for o in proto.graph.output],
        stripped_sites=stripped_sites,
        dynamic_batch=dynamic_batch,
        notes=notes,
        dynamic_sequence=dynamic_sequence,
        external_data=Path(str(path) + ".data") if external else None,
        format="onnx",
        companions=[Path(str(path) + ".data")] if external else [],
    )


def onnx_op_types(model_or_path) -> list[str]:
    """Op types of an ONNX model's main graph, in order."""
    import onnx

    proto = (onnx.load(str(model_or_path), load_external_data=False) if isinstance(model_or_path, (str, os.PathLike))
             else model_or_path)
    return [n.op_type for n in proto.graph.node]

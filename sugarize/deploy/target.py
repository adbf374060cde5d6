"""The deploy-target interface: one class a target implements, and the options it declares.

A target turns a plain (stripped, eval-mode, KV-cache-off) model into one artifact (a file, or
a folder) plus companions, checks an artifact of its kind, runs it (``Runner``) and describes
it (``Structure``). Parity (``deploy/parity.py``), structure (``artifact.compare_structures``),
the export workflow (``app/workflows.py``) and the CLI's flags are written once over this
interface; ``deploy/targets.py`` holds the table, and ``sugarize.register_target`` (or the
``sugarize.targets`` entry-point group) adds to it from outside the package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from .artifact import ExportResult, Runner, Structure

__all__ = ["Target", "TargetOption", "ExportOptions", "OPSET", "DYNAMIC_BATCH", "DYNAMIC_SEQUENCE",
           "EXTERNAL_DATA", "DECLARED", "flag_of"]


@dataclass(frozen=True)
class TargetOption:
    """One export option a target declares: the CLI makes ``flag`` from it, ``ExportOptions``
    carries its value under ``name``. ``type`` is ``int``, ``float``, ``str`` or ``bool`` (a
    ``bool`` with ``default=None`` is a ``--x/--no-x`` pair); ``choices`` bounds a ``str``."""

    name: str
    flag: str
    help: str
    type: type = str
    default: Any = None
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> None:
        """InputError naming the flag if ``value`` is not one of ``choices``."""
        if self.choices and value is not None and value not in self.choices:
            raise InputError(f"{self.flag} {value!r} is not one of {', '.join(self.choices)}")


# The options more than one built-in target declares (one declaration, one flag).
OPSET = TargetOption("opset", "--opset", "ONNX opset, 13 to torch's maximum (its ONNX_MAX_OPSET, 23 with torch "
                     "2.13); default the exporter's own (18).", int)
DYNAMIC_BATCH = TargetOption("dynamic_batch", "--dynamic-batch", "Make the batch dimension dynamic.", bool, False)
DYNAMIC_SEQUENCE = TargetOption("dynamic_sequence", "--dynamic-sequence",
                                "Make dimension 1 of token inputs (integer tensors) dynamic: any sequence length; "
                                "parity is checked at two lengths.", bool, False)
EXTERNAL_DATA = TargetOption("external_data", "--external-data/--no-external-data",
                             "Keep the weights in OUTPUT.data beside the file (default: when they are over 1.5 GiB; "
                             "protobuf holds 2 GiB).", bool, None)


class ExportOptions:
    """What an export is asked for: the values of target-declared options, by name. An option
    not given reads as None (``options.opset``); ``given()`` holds the ones set away from their
    defaults. A target refuses a given option it does not declare (``Target.check_options``)."""

    __slots__ = ("_values",)

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", {k: v for k, v in values.items() if v is not None and v is not False})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._values.get(name)

    def __setattr__(self, name, value):
        raise AttributeError("ExportOptions is immutable")

    def __eq__(self, other) -> bool:
        return isinstance(other, ExportOptions) and other._values == self._values

    def __repr__(self) -> str:
        return f"ExportOptions({', '.join(f'{k}={v!r}' for k, v in sorted(self._values.items()))})"

    def given(self) -> dict[str, Any]:
        """The options set away from their defaults."""
        return dict(self._values)


class Target:
    """One deploy target. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # --format NAME
    title: str = ""  # what the user reads: "ONNX", "ORT format (ONNX Runtime Mobile)", "ExecuTorch"
    suffix: str = ""  # the artifact's suffix
    extra: str | None = None  # the pip extra it needs beyond the base install, if any
    options: tuple[TargetOption, ...] = ()  # the export options it takes; the CLI makes their flags
    runtimes: tuple[str, ...] = ()  # the first is the default
    folder: bool = False  # the artifact is a folder (Core ML's .mlpackage), not a file
    int8: str | None = None  # what --int8 writes, in words (None: the target has no int8 path)

    # -- availability and options -------------------------------------------------------------
    def check_available(self) -> None:
        """Raises InputError with the install line when the target's packages are missing."""

    def check_options(self, options: ExportOptions) -> ExportOptions:
        """``options`` if this target declares them (and their values are among the choices);
        else InputError naming the flag."""
        declared = {o.name: o for o in self.options}
        for key, value in options.given().items():
            if key not in declared:
                raise InputError(f"{flag_of(key)} does not apply to --format {self.name}; drop it, or pick a format "
                                 f"that takes it")
            declared[key].check(value)
        return options

    def companions(self, path: Path, options: ExportOptions) -> list[Path]:
        """Every file an export to ``path`` may write beside it (checked as outputs up front)."""
        return []

    # -- the artifact ------------------------------------------------------------------------
    def export(self, model, path: Path, example_args: Sequence[Any], options: ExportOptions) -> ExportResult:
        """Exports the plain ``model`` (the workflow gives it in eval mode, stripped, its KV cache
        off) to ``path`` and its companions, atomically (both or neither), and checks the file."""
        raise NotImplementedError

    def quantize(self, plain, reference, example_args: Sequence[Any], artifact: Path, reference_artifact: Path,
                 out: Path, calibration: list, validation, force: bool):
        """--int8 (only where ``int8`` is set): writes ``out`` from ``plain`` (whose float
        artifact is ``artifact``), quantises ``reference`` the same way, and returns an
        ``Int8Report`` comparing them. ``calibration`` is a list of input tuples cut to the
        export's batch; ``validation()`` yields ``(x, y)`` batches (None: no val_loader)."""
        raise NotImplementedError

    def int8_path(self, out: Path) -> Path:
        """Where --int8 writes beside ``out``: ``model.int8.onnx`` for ``model.onnx``."""
        return out.with_name(out.stem + ".int8" + self.suffix)

    def summary(self, result: ExportResult) -> str:
        """The words after the path in ``wrote PATH (...)``: what the artifact holds."""
        return f"{self.name}, {len(result.op_types)} nodes"

    def sniff(self, path: Path, head: bytes) -> bool:
        """Whether the file (or folder) at ``path``, which starts with ``head`` (its first 4 KiB;
        empty for a folder), is of this target's kind, by its content: a magic number, a parse.
        The name is not looked at: it is the fallback (``suffix``) when no target claims the bytes."""
        raise NotImplementedError

    def check_file(self, path: str | os.PathLike) -> None:
        """Raises InputError (one line, what to do) if the file is missing, truncated or corrupt."""
        raise NotImplementedError

    def runner(self, path: str | os.PathLike, *, runtime: str | None = None, optimization: str = "all") -> Runner:
        raise NotImplementedError

    def informative_runner(self, path: str | os.PathLike, runtime: str | None) -> Runner | None:
        """A second runner whose results are reported but not judged (None: none)."""
        return None

    def describe(self, path: str | os.PathLike, *, full: bool = True) -> Structure:
        """The artifact as a ``Structure``; ``full=False`` may skip the costly parts (the node
        list is always there)."""
        raise NotImplementedError

    def standard(self, node: tuple) -> bool:
        """Whether a node of ``describe``'s is one the target's stock runtime ships (no custom op)."""
        return True

    def dynamic_dims(self, path: str | os.PathLike) -> tuple[bool, bool]:
        """(batch, sequence): whether the file takes any batch size, and any length of token inputs."""
        return False, False

    def export_options_of(self, path: str | os.PathLike) -> ExportOptions:
        """The options that would export the original model the way ``path`` was made (to
        compare structures in ``verify``): only those this target declares."""
        batch, sequence = self.dynamic_dims(path)
        declared = {o.name for o in self.options}
        return ExportOptions(**{k: v for k, v in (("dynamic_batch", batch), ("dynamic_sequence", sequence))
                                if k in declared})


# Every option a registered target declares, by name (``targets.register_target`` adds to it):
# an option given to a target that does not declare it is named by its flag.
DECLARED: dict[str, TargetOption] = {}


def flag_of(name: str) -> str:
    """The flag of an option name, as a registered target declares it."""
    option = DECLARED.get(name)
    return option.flag.split("/")[0] if option else "--" + name.replace("_", "-")

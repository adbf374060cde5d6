"""The deploy-target interface: one class a target implements, and the options it takes.

A target turns a plain (stripped) model into one artifact file plus companions, checks a file
of its kind, runs it (``Runner``) and describes it (``Structure``). Parity
(``deploy/parity.py``) and structure (``artifact.compare_structures``) are written once over
this interface; ``deploy/targets.py`` holds the table. A new target is one module with one
``Target`` subclass and one line in that table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from .artifact import ExportResult, Runner, Structure

__all__ = ["Target", "ExportOptions"]


@dataclass(frozen=True)
class ExportOptions:
    """What an export is asked for. Each target says which fields it takes (``Target.takes``);
    a field set away from its default that the target does not take is refused."""

    opset: int | None = None
    dynamic_batch: bool = False
    dynamic_sequence: bool = False
    external_data: bool | None = None
    backend: str | None = None

    def given(self) -> dict[str, Any]:
        """The fields set away from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


_FLAGS = {"opset": "--opset", "dynamic_batch": "--dynamic-batch", "dynamic_sequence": "--dynamic-sequence",
          "external_data": "--external-data", "backend": "--backend"}


class Target:
    """One deploy target. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # --format NAME
    title: str = ""  # what the user reads: "ONNX", "ORT format (ONNX Runtime Mobile)", "ExecuTorch"
    suffix: str = ""  # the artifact's file suffix
    extra: str | None = None  # the pip extra it needs beyond the base install, if any
    takes: tuple[str, ...] = ()  # the ExportOptions fields it takes
    runtimes: tuple[str, ...] = ()  # the first is the default

    # -- availability and options -------------------------------------------------------------
    def check_available(self) -> None:
        """Raises InputError with the install line when the target's packages are missing."""

    def check_options(self, options: ExportOptions) -> ExportOptions:
        """``options`` if this target takes them; else InputError naming the flag."""
        bad = [k for k in options.given() if k not in self.takes]
        if bad:
            raise InputError(f"{_FLAGS[bad[0]]} does not apply to --format {self.name}; drop it, or pick a format "
                             f"that takes it")
        return options

    def companions(self, path: Path, options: ExportOptions) -> list[Path]:
        """Every file an export to ``path`` may write beside it (checked as outputs up front)."""
        return []

    # -- the artifact ------------------------------------------------------------------------
    def export(self, model, path: Path, example_args: Sequence[Any], options: ExportOptions) -> ExportResult:
        """Exports the plain ``model`` (eval mode, no SUGAR left) to ``path`` and its companions,
        atomically (both or neither), and checks the file."""
        raise NotImplementedError

    def sniff(self, head: bytes, path: Path) -> bool:
        """Whether a file that starts with ``head`` is of this target's kind."""
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
        compare structures in ``verify``)."""
        batch, sequence = self.dynamic_dims(path)
        return ExportOptions(dynamic_batch=batch, dynamic_sequence=sequence)

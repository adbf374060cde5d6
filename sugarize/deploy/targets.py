"""The deploy targets, in one table: ``--format NAME`` picks one; a file's kind picks one in verify.

A new target (LiteRT, Core ML) is one module with a ``Target`` subclass (``deploy/target.py``)
and one line here.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .onnx_target import OnnxTarget
from .ort_target import OrtTarget
from .pte_target import PteTarget
from .target import ExportOptions, Target

__all__ = ["TARGETS", "get_target", "target_of_file", "ExportOptions", "Target"]

# Sniffed in this order: the formats with a magic number first, ONNX (protobuf, none) last.
TARGETS: dict[str, Target] = {t.name: t for t in (PteTarget(), OrtTarget(), OnnxTarget())}


def get_target(name: str) -> Target:
    """The target ``--format name`` names; InputError listing the known ones otherwise."""
    target = TARGETS.get(str(name).lower())
    if target is None:
        raise InputError(f"--format {name!r} is not one of {', '.join(sorted(TARGETS))}")
    return target


def target_of_file(path: str | os.PathLike) -> Target:
    """The target whose kind of file ``path`` is: by its first bytes, then its suffix.

    Raises:
        InputError: the file is missing, not a regular file, or of no known kind.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} not found")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file; give an .onnx, .ort or .pte file")
    with open(path, "rb") as f:
        head = f.read(16)
    magic = [t for t in TARGETS.values() if t.name != "onnx" and head[4:6] and t.sniff(head, Path("x"))]
    if magic:
        return magic[0]
    for t in TARGETS.values():
        if t.sniff(head, path):
            return t
    raise InputError(f"{path.name} is not an ONNX, ORT-format or ExecuTorch file (by its bytes and its name); give "
                     "a file `sugarize export` wrote")

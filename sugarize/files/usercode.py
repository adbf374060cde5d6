"""The boundary around the user's code: what it raises is the user's, told apart by where it was raised.

Model files, the modules of their folders and data files are registered when sugarize runs
them (``register_folder``). Whatever escapes a command, ``BaseException`` and ``SystemExit`` of
any code included, is the user's when a frame of its traceback (or of a cause it chains) lies
in a registered folder: the CLI then says which file, line and function raised it, exit 2,
instead of a traceback or "a bug of sugarize". The registry holds paths only; it changes no
behaviour of the process.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

__all__ = ["register_folder", "blame", "UserCodeFailure", "restore_process_settings"]

_FOLDERS: set[str] = set()


def register_folder(folder: str | os.PathLike) -> None:
    """A folder whose Python files are the user's (a model or data file's own folder)."""
    _FOLDERS.add(os.path.realpath(folder) + os.sep)


def _users(filename: str) -> bool:
    if not filename or filename.startswith("<"):
        return False
    real = os.path.realpath(filename)
    return any(real.startswith(f) for f in _FOLDERS)


@dataclass(frozen=True)
class UserCodeFailure:
    file: Path
    line: int
    function: str
    exception: BaseException

    def message(self) -> str:
        exc = self.exception
        where = f"{self.file.name} line {self.line} ({self.function})"
        if isinstance(exc, SystemExit):
            return (f"{where} called sys.exit({exc.code!r}) while sugarize ran it; a model or data file defines "
                    "and returns, it does not exit: remove the exit")
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return f"{where} raised {what}; this is your code's error: run `python {self.file}` or fix that line"


_OURS = os.path.realpath(Path(__file__).resolve().parents[1]) + os.sep


def blame(exc: BaseException) -> UserCodeFailure | None:
    """Where the user's code raised ``exc`` (or an exception it chains, ``__cause__`` or
    ``__context__``): walking its traceback from where it was raised outwards, a frame in the
    user's files before any frame of sugarize's makes it the user's (their forward, or a torch
    call their forward made); a frame of sugarize's first makes it ours. None when not the user's."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for f in reversed(traceback.extract_tb(e.__traceback__)):
            if _users(f.filename):
                return UserCodeFailure(Path(f.filename), f.lineno or 0, f.name, e)
            if os.path.realpath(f.filename).startswith(_OURS):
                break
        e = e.__cause__ or e.__context__
    return None


class restore_process_settings:
    """Gives back what user code may change for the whole process while sugarize runs it: the
    recursion limit (a model file that lowers it would break torch's tracing later)."""

    def __enter__(self):
        self.limit = sys.getrecursionlimit()
        return self

    def __exit__(self, *exc) -> None:
        if sys.getrecursionlimit() != self.limit:
            sys.setrecursionlimit(self.limit)

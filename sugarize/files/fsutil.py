"""Write files atomically: a temporary name beside the target, renamed on success."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputPathError

__all__ = ["atomic_path", "check_writable"]


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """The output path, after checking it may be (over)written.

    Raises:
        OutputPathError: it exists and ``force`` is False, or its folder is missing or read-only.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputPathError(f"{path} already exists; pass --force to replace it")
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {path}: folder {parent} is not writable; choose another -o")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yields a temporary path; on success it replaces ``path``, on failure it is removed."""
    path = check_writable(path, force=force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

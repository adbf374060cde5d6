"""Write files atomically: a temporary name beside the target, renamed on success."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputPathError

__all__ = ["atomic_path", "atomic_folder", "check_writable", "check_not_input", "check_output", "check_outputs",
           "remove_stale_temps", "regular_file"]


def regular_file(path: str | os.PathLike, what: str, error=None) -> Path:
    """``path`` if it is a regular file (symlinks followed); else ``error`` (an InputError kind)
    saying so: a FIFO, a device or a folder would block a read forever or read garbage.

    Raises:
        InputError (or ``error``): missing, or not a regular file.
    """
    import stat

    from ..errors import InputError

    error = error or InputError
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except OSError as exc:
        check_loop(path, what, error)
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device or socket"
        raise error(f"{what} {path} is {kind}, not a regular file; give the file itself")
    return path


def check_loop(path: str | os.PathLike, what: str, error=None) -> None:
    """Raises ``error`` (InputError by default) naming ``path`` as a symlink loop when it is one
    (``os.stat`` says ELOOP): a loop is not a missing file, and "not found" would send the user
    looking for one."""
    from ..errors import InputError

    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise (error or InputError)(f"{what} {path} is a symlink loop (a link that leads back to itself); give "
                                        "the file itself") from None


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """The output path, after checking it may be (over)written.

    Raises:
        OutputPathError: it exists and ``force`` is False, or its folder is missing or read-only.
    """
    path = Path(path)
    if path.is_dir():  # before "exists": --force would not help
        raise OutputPathError(f"{path} is a folder; give a file name (such as {path / 'model.onnx'})")
    if path.is_symlink() and not path.exists() and not force:
        raise OutputPathError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; remove the "
                              "link, give another -o, or pass --force to replace the link")
    if path.exists() and not force:
        raise OutputPathError(f"{path} already exists; pass --force to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {path}: folder {parent} is not writable; choose another -o")
    return path


def check_not_input(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuses an output that is the same file as one of the inputs (symlinks and hard links
    included), even with --force: writing it would destroy what the command reads.

    Raises:
        OutputPathError: naming the input.
    """
    out = Path(out)
    if not out.exists():
        return
    for given in inputs:
        if given is None:
            continue
        src = Path(str(given))
        if not src.exists() and ":" in src.name:  # model.py:NAME
            src = src.with_name(src.name.rpartition(":")[0])
        if same_file(out, src):
            raise OutputPathError(f"{out} is the input {src.name}: writing it would destroy what this command reads, "
                                  "--force or not; give another -o")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` both exist and are one file (symlinks and hard links included)."""
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out: str | os.PathLike, *inputs: str | os.PathLike | None, force: bool) -> Path:
    """The checks every output gets before any work: not one of the command's ``inputs``
    (``check_not_input``, even with ``force``), and writable (``check_writable``)."""
    check_not_input(out, *inputs)
    return check_writable(out, force=force)


def check_outputs(outs, *inputs: str | os.PathLike | None, force: bool) -> list[Path]:
    """``check_output`` for every file a command writes (its main output, companions, plots):
    pairwise distinct (one would replace another), none an input, each writable.

    Raises:
        OutputPathError: naming the two outputs that are one file, or the output at fault.
    """
    paths = [Path(str(o)) for o in outs if o is not None]
    seen: dict[Path, Path] = {}
    for p in paths:
        key = Path(os.path.abspath(p.parent)).resolve() / p.name
        if key in seen:
            raise OutputPathError(f"{seen[key]} and {p} are the same file, and this command writes both; give "
                                  "them different names")
        seen[key] = p
    for p in paths:
        check_output(p, *inputs, force=force)
    return paths


TEMP_MARK = ".sugarize-"  # temporary folders: .<target name>.sugarize-<pid>-<random>.tmp
# Inside each temporary folder of ours, written before the folder gets its name: the cleanup of
# stale temporaries removes only folders that hold this file with this text, never a user's file
# or folder that merely matches the name pattern.
TEMP_OWNER = "SUGARIZE-TEMPORARY"
TEMP_OWNER_TEXT = b"sugarize: a temporary folder of one write, removed when it ends or by the next write here\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _ours(tmp: Path) -> bool:
    """A folder sugarize made: named by the pattern, a real folder, holding ``TEMP_OWNER`` with its text."""
    owner = tmp / TEMP_OWNER
    try:
        return (tmp.is_dir() and not tmp.is_symlink() and owner.is_file() and not owner.is_symlink()
                and owner.stat().st_size == len(TEMP_OWNER_TEXT) and owner.read_bytes() == TEMP_OWNER_TEXT)
    except OSError:
        return False


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Removes temporary folders of ours left in ``folder`` by a process that no longer runs
    (a kill -9, a power cut); returns what was removed. Only folders sugarize made (``_ours``):
    a file or folder of the user's that matches the name pattern is left alone."""
    import shutil

    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_MARK}*.tmp"):
        pid = tmp.name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and _ours(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_FULL_TEXTS = {"No space left on device": "the disk is full", "Disk quota exceeded": "the disk quota is used up",
               "Read-only file system": "the file system is read-only"}


def _storage_failure(exc: BaseException) -> str | None:
    """Why the disk refused a write (full, over quota, read-only), if that is what ``exc`` (or an
    exception it chains) says; safetensors and onnx report it in their own exception types."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return _FULL_TEXTS.get(os.strerror(e.errno), os.strerror(e.errno))
        text = str(e)
        for key, why in _FULL_TEXTS.items():
            if key in text:
                return why
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """A write the disk refused is the environment's: ``OutputPathError`` naming the user's
    file and folder: the outermost write in progress (a target's inner writes, such as the ORT
    target's intermediate ``.onnx`` in a private folder, are not what the user asked for)."""
    _WRITES.stack.append(Path(path))
    try:
        yield
    except OutputPathError:
        raise
    except Exception as exc:
        why = _storage_failure(exc)
        if why is None:
            raise
        user = _WRITES.stack[0]
        folder = user.parent if str(user.parent) else Path(".")
        while TEMP_MARK in folder.name and folder.parent != folder:  # a write nested in one of our temp folders
            folder = folder.parent
        raise OutputPathError(f"cannot write {user.name}: {why} in folder {folder} (nothing was written); free "
                              "space there or choose another -o") from None
    finally:
        _WRITES.stack.pop()


class _Writes(threading.local):
    def __init__(self):
        self.stack: list[Path] = []


_WRITES = _Writes()  # this thread's writes in progress, outermost first


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; when the block succeeds, it becomes ``path``.

    - The temporary file is removed on every exit path Python controls (an exception,
      Ctrl-C, SIGTERM under the CLI); one left by a kill -9 is named after this process
      (``.<name>.sugarize-<pid>-<random>.tmp``), so the next write to that folder removes it.
    - Without ``force`` the rename is an exclusive create: when two writers race for one new
      path, one wins and the other gets ``OutputPathError``; an existing file is never touched.
    - With ``force`` an existing file is replaced atomically, and only by a complete file.
    - The result gets the mode a plain ``open()`` would give (0o666 less the umask).
    """
    import shutil

    path = check_writable(path, force=force)
    folder = _temp_beside(path)
    tmp = folder / path.name
    try:
        with _storage_errors(path):
            tmp.touch()
            yield tmp
            _place(tmp, path, force)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def scratch_beside(path: str | os.PathLike) -> Iterator[Path]:
    """A private temporary folder beside the user's output ``path`` for work files (the original
    model's reference artifact): on the output's disk, removed on every exit path; a write the
    disk refuses in it names the user's file and folder."""
    import shutil

    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with _storage_errors(path):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temp_beside(path: Path) -> Path:
    """A private temporary folder of ours beside ``path`` (``.<name>.sugarize-<pid>-<random>.tmp``,
    holding ``TEMP_OWNER``), stale ones of dead processes removed first; a folder that takes no
    files is the user's. The folder is made under another name and renamed once it holds its
    owner file, so a kill at any moment leaves nothing the cleanup could mistake."""
    folder = path.parent if str(path.parent) else Path(".")
    stem = path.name[:64]  # the name's head: a legal 255-byte target name keeps its temporary legal too
    try:
        remove_stale_temps(folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{stem}{TEMP_MARK}{os.getpid()}-", suffix=".new", dir=folder))
        try:
            (staging / TEMP_OWNER).write_bytes(TEMP_OWNER_TEXT)
            final = staging.with_name(staging.name[:-len(".new")] + ".tmp")
            os.rename(staging, final)
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final
    except OSError as exc:  # /proc, /sys, a read-only mount: the folder takes no new files
        why = _storage_failure(exc)
        if why:
            raise OutputPathError(f"cannot write {path.name}: {why} in folder {folder}; free space there or "
                                  "choose another -o") from None
        raise OutputPathError(f"cannot write {path}: folder {folder} does not take new files "
                              f"({exc.strerror or type(exc).__name__}); choose another -o") from exc


def _place(tmp: Path, path: Path, force: bool) -> None:
    """``tmp`` becomes ``path``: replaced with ``force``, else an exclusive create."""
    os.chmod(tmp, 0o666 & ~_umask())
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: an exclusive create
    except FileExistsError:
        raise OutputPathError(f"{path} already exists (another run wrote it first); pass --force "
                              "to replace it") from None
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists():
            raise OutputPathError(f"{path} already exists; pass --force to replace it") from None
        os.replace(tmp, path)
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, force: bool, companions: tuple[str, ...] = (),
                  companion_files: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yields a private temporary folder beside ``path``: write ``folder / path.name`` there, and any
    companion file named ``path.name + suffix`` (an ONNX file's ``.data``) or named in
    ``companion_files`` (an ORT file's ``model.required_operators.config``). When the block
    succeeds, the companions that were written, then the file, take their places by the rules of
    ``atomic_path``; a companion placed before a failure is removed again, so the pair is both
    files or neither. The folder is removed on every exit path (one left by a kill -9, by the
    next write to that folder)."""
    import shutil

    path = check_writable(path, force=force)
    companion_paths = [path.with_name(path.name + suffix) for suffix in companions]
    companion_paths += [path.with_name(name) for name in companion_files]
    for c in companion_paths:
        check_writable(c, force=force)
    tmp = _temp_beside(path)
    placed: list[Path] = []
    try:
        with _storage_errors(path):
            yield tmp
            for c in companion_paths:
                written = tmp / c.name
                if written.exists():
                    _place(written, c, force)
                    placed.append(c)
            _place(tmp / path.name, path, force)
        placed = []
    finally:
        for c in placed:  # the file itself did not take its place: neither does its companion
            with contextlib.suppress(FileNotFoundError):
                c.unlink()
        shutil.rmtree(tmp, ignore_errors=True)


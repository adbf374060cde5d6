"""A model file's closure: every file of its folder its code imports or reads, hashed, checked, run from those bytes.

``ImportClosure`` is a meta-path finder that stands in front of Python's own while the model's
code runs. A module of the model's folder (or, for a model inside a package, of the package's
parent folder) that the code imports is read once, hashed, checked against a checkpoint's record
(``expected``: a file not in it, or with another hash, is refused before any of it runs), and
executed from those bytes, never from a bytecode cache. A symlinked sibling is the folder's
file: it is hashed by the bytes its link points at. A zipped or compiled module there is refused.

How long it stands: while ``import_file`` runs the file and ``load_model`` its factory, and,
inside a ``session()`` (every CLI command runs in one), for the whole session: the forward,
loaders, and threads the code starts all import through it.

Files the model's code *reads* from those folders by other means (``open``, ``exec(open(...))``,
``runpy.run_path``, ``spec_from_file_location(...).loader.exec_module``, ``pickle.load`` of an
opened file) are recorded and checked the same way inside a session: an audit hook
(``sys.addaudithook``, which Python cannot remove once added) is added the first time a session
keeps a closure; it is inert outside sessions, and inside one it looks only at reads of files
under a kept closure's folders made by a frame of the model's own files. It hashes the file
when it is opened; the code then reads it (a file swapped between the two instants is not seen).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

from ..errors import ModelFileError

__all__ = ["ImportClosure", "check_closure", "forget_closure", "session", "keep", "TOOL_MODULES", "inside"]

# Modules sugarize itself imports, now or later (optional dependencies included): a file of the
# user's folder must never stand in for one of them, installed or not.
TOOL_MODULES = frozenset({"torch", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "openvino", "numpy", "safetensors",
                          "typer", "rich", "click", "matplotlib", "sklearn", "transformers", "accelerate", "peft",
                          "executorch", "sugarize"})

_OURS = os.path.realpath(Path(__file__).resolve().parents[1]) + os.sep


def inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _located(filename: str) -> Path:
    """``filename`` absolute, its folder resolved but not the file itself: a symlink in the
    model's folder is the folder's file (read through the link)."""
    absolute = os.path.abspath(filename)
    return Path(os.path.realpath(os.path.dirname(absolute))) / os.path.basename(absolute)


class ImportClosure:
    """The files of a model's folders that its code imports or reads: ``seen`` maps each one's
    path relative to the model's folder (POSIX; ``../x.py`` in a package's parent folder) to the
    sha256 of the bytes that ran or were read."""

    def __init__(self, folder: Path, main: Path, expected: dict[str, str] | None = None):
        self.folder, self.main, self.expected = Path(folder).resolve(), Path(main).resolve(), expected
        package = (self.folder / "__init__.py").exists()
        self.roots = [self.folder] + ([self.folder.parent] if package else [])
        self.seen: dict[str, str] = {}

    # -- imports ---------------------------------------------------------------------------------
    def find_spec(self, fullname, path=None, target=None):
        import importlib.machinery
        import importlib.util
        import zipimport

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None and path is None and fullname.split(".")[0] not in TOOL_MODULES and self._importer_is_model():
            # the model's folders, searched last and for the model's own imports only (a library's
            # optional import, "import triton", is never served from them): no sys.path entry needed
            spec = importlib.machinery.PathFinder.find_spec(fullname, [str(r) for r in self.roots])
        if spec is None:
            return None
        if isinstance(spec.loader, zipimport.zipimporter):
            archive = _located(spec.loader.archive)
            if any(inside(archive, r) for r in self.roots):
                raise ModelFileError(f"{self.main.name} imports {fullname} from {archive.name}, a zip archive in its "
                                     "folder: sugarize runs only Python source files it has hashed; unzip it beside "
                                     "the model file")
            return None
        if not spec.has_location or not spec.origin:
            return None
        origin = _located(spec.origin)
        if origin == self.main or not any(inside(origin, r) for r in self.roots):
            return None
        rel = self.relative(origin)
        if origin.suffix != ".py":
            raise ModelFileError(f"{self.main.name} imports {fullname} from {rel}, a compiled module in its folder: "
                                 "sugarize runs only Python source it has hashed; install that module as a package")
        return importlib.util.spec_from_file_location(fullname, origin, loader=_HashedSource(self, origin, rel),
                                                      submodule_search_locations=spec.submodule_search_locations)

    def _importer_is_model(self) -> bool:
        """Whether the frame that asked for the import (past the import machinery) is the model's
        own code: the model file or one of its hashed modules."""
        mine = self.code_files()
        f = sys._getframe(2)
        for _ in range(32):
            if f is None:
                return False
            name = f.f_code.co_filename
            if not (name.startswith("<frozen importlib") or name.endswith(os.path.join("importlib", "__init__.py"))):
                return str(_located(name)) in mine
            f = f.f_back
        return False

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.folder)).as_posix()

    def admit(self, rel: str, digest: str, how: str = "imports") -> None:
        from ..errors import CheckpointError

        if self.expected is not None:
            if rel not in self.expected:
                raise CheckpointError(f"{self.main.name} {how} {rel}, which it did not when the checkpoint was made "
                                      "(it is not in the recipe); nothing of it was used: convert the model again "
                                      "with that file")
            if self.expected[rel] != digest:
                raise CheckpointError(f"{rel} changed since the checkpoint was made (its sha256 is {digest[:12]}..., "
                                      f"the recipe's {self.expected[rel][:12]}...); nothing of it was used: give the "
                                      "file the checkpoint was made from, or convert again")
        self.seen[rel] = digest

    # -- reads (the audit hook) -----------------------------------------------------------------
    def code_files(self) -> set[str]:
        """The files whose frames are the model's own code: the model file and its hashed modules."""
        return {str(self.main)} | {os.path.normpath(self.folder / rel) for rel in self.seen if rel.endswith(".py")}

    def on_read(self, path: Path) -> None:
        """A file under the closure's folders opened for reading by the model's code: hashed and
        admitted (recorded, or checked against the recipe)."""
        if path == self.main or not path.is_file():
            return
        rel = self.relative(path)
        if rel in self.seen and self.expected is None:
            return
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.admit(rel, digest, how="reads")


class _HashedSource:
    """Loads one module of the model's folder from the bytes it hashed (``ImportClosure``)."""

    def __init__(self, closure: ImportClosure, path: Path, rel: str):
        self.closure, self.path, self.rel = closure, path, rel

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        source = self.path.read_bytes()
        digest = hashlib.sha256(source).hexdigest()
        self.closure.admit(self.rel, digest)
        module.__sugarize_sha256__ = digest
        module.__sugarize_closure_module__ = True
        try:
            code = compile(source, str(self.path), "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:  # the broken file is this one, not the model file
            line = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
            raise ModelFileError(f"syntax error in {self.rel}{line} (imported by {self.closure.main.name}): "
                                 f"{getattr(exc, 'msg', None) or exc}; fix the file and try again") from None
        exec(code, module.__dict__)


def check_closure(folder: Path, expected: dict[str, str], what: str) -> None:
    """Every file a recipe records as imported or read is there with its hash, before anything runs.

    Raises:
        CheckpointError: naming the first file that is gone or changed.
    """
    from ..errors import CheckpointError

    for rel, digest in sorted(expected.items()):
        file = folder / rel
        if not file.is_file():
            raise CheckpointError(f"{rel}, which {what} imported or read when the checkpoint was made, is gone from "
                                  f"{folder}; nothing was run: put it back, or convert again")
        now = hashlib.sha256(file.read_bytes()).hexdigest()
        if now != digest:
            raise CheckpointError(f"{rel} changed since the checkpoint was made (its sha256 is {now[:12]}..., the "
                                  f"recipe's {digest[:12]}...); nothing was run: give the file the checkpoint was "
                                  "made from, or convert again")


def forget_closure() -> None:
    """Modules an earlier run imported through an ``ImportClosure`` (of this folder or another
    model's: a ``helper`` of another folder must not stand in for this one's) are imported, hashed
    and checked again, not served from ``sys.modules``."""
    for mod_name, mod in list(sys.modules.items()):
        try:  # the module's own dict: a user module's __getattr__ may raise anything
            ours = object.__getattribute__(mod, "__dict__").get("__sugarize_closure_module__", False)
        except Exception:
            ours = False
        if ours is True:
            del sys.modules[mod_name]


# -- sessions: the closure in force for as long as the model's code is in use ----------------------
_SESSIONS: list[list[ImportClosure]] = []
_LOCK = threading.RLock()
_HOOKED = False
_IN_HOOK = threading.local()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """While the block runs, each closure ``keep`` is given stays first in ``sys.meta_path``
    and its folders' reads are checked: the model's code imports and reads through it however
    late (its forward, a loader, a thread it started). Everything is taken out when the block ends."""
    kept: list[ImportClosure] = []
    with _LOCK:
        _SESSIONS.append(kept)
    try:
        yield
    finally:
        with _LOCK:
            _SESSIONS.remove(kept)
            for closure in kept:
                with contextlib.suppress(ValueError):
                    sys.meta_path.remove(closure)


def keep(closure: ImportClosure) -> bool:
    """Keeps ``closure`` in force until the innermost ``session`` ends; False when none is open."""
    global _HOOKED
    with _LOCK:
        if not _SESSIONS:
            return False
        if closure not in sys.meta_path:
            sys.meta_path.insert(0, closure)
        if closure not in _SESSIONS[-1]:
            _SESSIONS[-1].append(closure)
        if not _HOOKED:
            sys.addaudithook(_audit)
            _HOOKED = True
    return True


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args) -> None:
    if event != "open" or not _SESSIONS or getattr(_IN_HOOK, "on", False):
        return
    name, mode, flags = (tuple(args) + (None, None, None))[:3]
    if not isinstance(name, (str, bytes, os.PathLike)):
        return  # a file descriptor
    if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
        return  # a write: outputs are checked up front (no output over the model's files)
    _IN_HOOK.on = True
    try:
        _on_open(_located(os.fsdecode(name)))
    finally:
        _IN_HOOK.on = False


def _on_open(path: Path) -> None:
    closures = [c for kept in list(_SESSIONS) for c in kept if any(inside(path, r) for r in c.roots)]
    if not closures:
        return
    frame = sys._getframe(2)  # the frame that called open(): above _on_open and _audit
    for closure in closures:
        mine = closure.code_files()
        f = frame
        for _ in range(64):
            if f is None:
                break
            filename = f.f_code.co_filename
            if filename.startswith(_OURS):
                break  # sugarize's own read (a checkpoint beside the model, a hashed import)
            if str(_located(filename)) in mine:
                closure.on_read(path)
                break
            f = f.f_back

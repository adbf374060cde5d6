"""The deploy targets, in one table: ``--format NAME`` picks one; a file's bytes pick one in verify.

A new target (LiteRT, Core ML) is one module with a ``Target`` subclass (``deploy/target.py``)
and one ``register_target`` call: here for a built-in one, or from outside the package, in the
user's code or through the ``sugarize.targets`` entry-point group of an installed
distribution (read when the CLI starts).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from ..errors import InputError
from .onnx_target import OnnxTarget
from .openvino_target import OpenVinoTarget
from .ort_target import OrtTarget
from .pte_target import PteTarget
from .target import DECLARED, ExportOptions, Target, TargetOption

__all__ = ["TARGETS", "get_target", "target_of_file", "register_target", "unregister_target", "load_entry_points",
           "ExportOptions", "Target", "TargetOption", "ENTRY_POINT_GROUP", "DEFAULT_FORMAT"]

ENTRY_POINT_GROUP = "sugarize.targets"
HEAD_BYTES = 4096  # what ``Target.sniff`` sees of a file
DEFAULT_FORMAT = "onnx"  # an output whose suffix no target has
DEFAULT_FORMAT = "onnx"  # an output whose suffix no target has

# In sniffing order: a file's bytes are offered to each target in turn. ONNX (a parse, not a
# first byte) first: a valid ONNX file whose producer name puts "ET" at byte 4 is ONNX.
TARGETS: dict[str, Target] = {}


def register_target(target: Target | type[Target], *, before: str | None = None) -> Target:
    """Adds a deploy target to the table: ``--format NAME``, ``verify`` of its files, and its
    declared options as CLI flags. ``before`` puts it ahead of a registered target in the
    sniffing order (by default it goes last). Registering the same class again replaces it.

    Raises:
        ValueError: the name or suffix is malformed, the name is another target's, or an option
            is declared with another flag or type than a registered target gives it.
    """
    t = target() if isinstance(target, type) else target
    if not isinstance(t, Target):
        raise TypeError(f"register_target takes a sugarize.Target (or subclass), not {type(t).__name__}")
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", t.name or ""):
        raise ValueError(f"target name {t.name!r} must be a lowercase word (it becomes --format {t.name})")
    if not t.suffix.startswith("."):
        raise ValueError(f"target {t.name}: suffix {t.suffix!r} must start with a dot")
    old = TARGETS.get(t.name)
    if old is not None and type(old) is not type(t):
        raise ValueError(f"a target named {t.name!r} is registered already ({type(old).__module__}."
                         f"{type(old).__qualname__}); unregister_target({t.name!r}) first")
    for o in t.options:
        known = DECLARED.get(o.name)
        if known is not None and (known.flag, known.type) != (o.flag, o.type):
            raise ValueError(f"target {t.name}: option {o.name!r} is declared as {known.flag} ({known.type.__name__}) "
                             "by another target; reuse that declaration or pick another name")
    if before is not None and before not in TARGETS:
        raise ValueError(f"before={before!r} is not a registered target ({', '.join(TARGETS)})")
    for o in t.options:
        DECLARED.setdefault(o.name, o)
    items = [(k, v) for k, v in TARGETS.items() if k != t.name]
    at = next((i for i, (k, _) in enumerate(items) if k == before), len(items))
    items.insert(at, (t.name, t))
    TARGETS.clear()
    TARGETS.update(items)
    return t


def unregister_target(name: str) -> None:
    """Takes a target out of the table (its options stay declared while another uses them)."""
    TARGETS.pop(name, None)
    used = {o.name for t in TARGETS.values() for o in t.options}
    for key in [k for k in DECLARED if k not in used]:
        del DECLARED[key]


for _builtin in (OnnxTarget, PteTarget, OrtTarget, OpenVinoTarget):
    register_target(_builtin)

_loaded: set[str] = set()


def load_entry_points() -> list[str]:
    """Registers the targets installed distributions declare in the ``sugarize.targets``
    entry-point group (``name = "package.module:TargetClass"``); each is loaded once per process.
    Returns the names registered. A plug-in that fails to load is a SugarizeWarning naming it;
    the built-in targets still work."""
    import warnings
    from importlib.metadata import entry_points

    from ..errors import SugarizeWarning, first_line

    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"{ep.name}={ep.value}"
        if key in _loaded:
            continue
        _loaded.add(key)
        try:
            added.append(register_target(ep.load()).name)
        except Exception as exc:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
            warnings.warn(f"the deploy target {ep.name!r} from {dist} ({ep.value}) was not loaded: {first_line(exc)}",
                          SugarizeWarning, stacklevel=2)
    return added


def get_target(name: str) -> Target:
    """The target ``--format name`` names; InputError listing the known ones otherwise."""
    target = TARGETS.get(str(name).lower())
    if target is None:
        raise InputError(f"--format {name!r} is not one of {', '.join(sorted(TARGETS))}")
    return target


def _kinds() -> str:
    titles = [t.title or t.name for t in TARGETS.values()]
    return ", ".join(titles[:-1]) + (" or " if len(titles) > 1 else "") + titles[-1]


def target_of_file(path: str | os.PathLike) -> Target:
    """The target whose kind of artifact ``path`` is: by its bytes (each target's ``sniff``, in
    the table's order), then by its suffix.

    Raises:
        InputError: the path is missing, a symlink loop, of no known kind, or a folder no
            target makes.
    """
    from ..files.fsutil import check_loop

    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        check_loop(path, "artifact")
        if exc.errno == errno.ENOENT:
            raise InputError(f"{path} not found") from None
        raise InputError(f"cannot read {path} ({exc.strerror})") from None
    import stat

    if stat.S_ISDIR(st.st_mode):
        head = b""
        candidates = [t for t in TARGETS.values() if t.folder]
        if not candidates:
            raise InputError(f"{path} is a folder; give a file of one of these kinds: {_kinds()}")
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
        candidates = [t for t in TARGETS.values() if not t.folder]
    else:
        raise InputError(f"{path} is not a regular file; give a file of one of these kinds: {_kinds()}")
    for t in candidates:
        if t.sniff(path, head):
            return t
    for t in candidates:
        if path.suffix.lower() == t.suffix:
            return t
    raise InputError(f"{path.name} is not {_kinds()} (by its bytes and its name); give an artifact "
                     "`sugarize export` wrote")

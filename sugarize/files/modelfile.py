"""Model files: ``file.py[:NAME]`` discovery and import, like fastapi-cli's ``discover.py``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import InputError, ModelFileError, first_line
from .closure import TOOL_MODULES, ImportClosure, check_closure, forget_closure, keep
from .closure import inside as _inside
from .inputs import as_tuple

__all__ = ["LoadedModel", "load_model", "CONVENTIONAL_NAMES", "check_closure", "TOOL_MODULES"]


CONVENTIONAL_NAMES = ("model", "build_model", "get_model", "create_model")


@dataclass
class LoadedModel:
    model: nn.Module
    path: Path
    name: str
    example_inputs: tuple | None
    sha256: str
    module: Any = field(repr=False, default=None)
    # the files of the model's folder its code imported: relative path -> sha256 of what ran
    closure: dict[str, str] = field(default_factory=dict)


def split_spec(spec: str) -> tuple[Path, str | None]:
    text = str(spec)
    if ":" in text and not text.endswith(".py"):
        path, _, name = text.rpartition(":")
        return Path(path), name or None
    return Path(text), None


def import_file(path: Path, expect_sha256: str | None = None, expect_closure: dict[str, str] | None = None):
    """Runs a user's Python file under a private module name: ``(module, sha256 of what ran)``.

    The file is read once; those bytes are hashed, checked against ``expect_sha256`` if given
    (``CheckpointError`` before anything runs), compiled and executed: no other read of the file
    and no bytecode cache (a planted ``__pycache__/*.pyc`` never runs, and none is written).
    The file's folder goes at the *end* of ``sys.path``, so the file can import the modules
    beside it but cannot shadow the tool's own dependencies (an ``onnx.py`` beside it is not
    onnx), and any such module it imported itself is dropped from ``sys.modules`` after it ran
    (``TOOL_MODULES``: an ``openvino.py`` beside it never becomes sugarize's openvino). The
    module is registered under a name of its own (``sugarize_user_<stem>_<hash>``), so a model
    file called ``inspect.py`` does not replace the standard library's ``inspect``. A file inside
    a package (a folder with ``__init__.py``) runs as that package's module, so its relative
    imports work.
    """
    import types

    path = path.resolve()
    folder = path.parent
    package = None
    if (folder / "__init__.py").exists():  # part of a package: relative imports work
        pkg_root, name, package = folder.parent, f"{folder.name}.{path.stem}", folder.name
        taken = sys.modules.get(folder.name)
        if folder.name in TOOL_MODULES or folder.name in sys.builtin_module_names or folder.name in \
                getattr(sys, "stdlib_module_names", ()) or (taken is not None and not _inside(
                    Path(getattr(taken, "__file__", None) or "/").resolve(), folder)):
            raise ModelFileError(f"{path.name} is in a package folder named {folder.name!r}, the name of a module "
                                 f"sugarize or Python uses; running it as {name} would replace that module: rename "
                                 "the folder (or remove its __init__.py)")
    else:
        pkg_root, name = folder, f"sugarize_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    from .fsutil import regular_file

    regular_file(path, "Python file", ModelFileError)  # a FIFO would block the read forever
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(source).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256:
        from ..errors import CheckpointError

        raise CheckpointError(f"{path.name} changed while it was being opened (its sha256 is now {digest[:12]}..., "
                              f"expected {expect_sha256[:12]}...); nothing was run: give the file the checkpoint "
                              "was made from")
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path) and \
            getattr(loaded, "__sugarize_sha256__", None) == digest and \
            (expect_closure is None or getattr(loaded, "__sugarize_closure__", None) == expect_closure):
        return loaded, digest
    module = types.ModuleType(name)
    module.__file__, module.__package__, module.__sugarize_sha256__ = str(path), package, digest
    closure = ImportClosure(folder, path, expect_closure)
    module.__sugarize_closure__ = closure.seen
    module.__sugarize_finder__ = closure  # load_model's factory and example_inputs() import through it too
    keep(closure)  # inside a session: what the file reads as it runs is recorded too
    forget_closure()
    before = set(sys.modules)
    sys.modules[name] = module
    try:
        with user_folders(path, closure):
            exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)
    except InputError:  # a sibling refused by the closure check, a compiled module in the folder
        sys.modules.pop(name, None)
        raise
    except SystemExit as exc:  # the user's file is the user's: exit 2 naming it, never its own code
        sys.modules.pop(name, None)
        raise ModelFileError(f"{path.name} called sys.exit({exc.code!r}) while it was imported; a model file "
                             "defines the model and returns: remove the exit (or guard it with "
                             "if __name__ == '__main__')") from None
    except SyntaxError as exc:  # in the model file, or in a sibling it imports: the broken file is named
        sys.modules.pop(name, None)
        broken = Path(exc.filename).name if exc.filename and exc.filename != "<string>" else path.name
        line = f" line {exc.lineno}" if exc.lineno else ""
        by = f" (imported by {path.name})" if broken != path.name else ""
        raise ModelFileError(
            f"syntax error in {broken}{line}{by}: {exc.msg}; fix the file and try again"
        ) from exc
    except ImportError as exc:
        sys.modules.pop(name, None)
        raise ModelFileError(
            f"importing {path.name} failed: {type(exc).__name__}: {exc}; install the missing package "
            "or fix the import"
        ) from exc
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ModelFileError(
            f"running {path.name} failed: {type(exc).__name__}: {first_line(exc)} ({_where(exc, path)}); "
            f"run `python {path}` to see the full traceback"
        ) from exc
    finally:
        _drop_stand_ins(set(sys.modules) - before, folder, pkg_root)
    return module, digest


@contextlib.contextmanager
def user_folders(path: Path, closure: ImportClosure | None = None):
    """While the user's code runs (its import, its factory, ``example_inputs``): its folder (and its
    package's root) at the *end* of ``sys.path``, so it can import the modules beside it. Taken
    off again after, so that no module the tool imports later, installed or not, can be found there.

    With ``closure`` (a model file's ``ImportClosure``), that finder stands first in
    ``sys.meta_path`` for the block alone, so every module of the model's folder the code
    imports is hashed, checked and run from its hashed bytes."""
    from .usercode import register_folder, restore_process_settings

    path = Path(path).resolve()
    register_folder(path.parent)
    folders = [str(path.parent)] + ([str(path.parent.parent)] if (path.parent / "__init__.py").exists() else [])
    added = [f for f in folders if f not in sys.path]
    sys.path.extend(added)
    inserted = closure is not None and closure not in sys.meta_path  # a session may hold it already
    if inserted:
        sys.meta_path.insert(0, closure)
    try:
        with restore_process_settings():
            yield
    finally:
        if inserted:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(closure)
        for f in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(f)


def _drop_stand_ins(new: set[str], *folders: Path) -> None:
    """Forgets modules the user's code imported from its own folders under a name the tool imports."""
    roots = [str(f) + os.sep for f in folders]
    for mod in new:
        if mod.split(".")[0] in TOOL_MODULES:
            file = getattr(sys.modules.get(mod), "__file__", None) or ""
            if any(file.startswith(r) for r in roots):
                del sys.modules[mod]



def _where(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).name == path.name]
    return f"{path.name} line {frames[-1].lineno}" if frames else path.name


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resolve(module, path: Path, name: str | None) -> tuple[nn.Module, str]:
    if name is not None:
        if not hasattr(module, name):
            found = _candidates(module)
            hint = f"; it defines: {', '.join(found)}" if found else ""
            raise ModelFileError(f"{path.name} has no {name!r}{hint}")
        return _materialise(getattr(module, name), path, name), name
    for conv in CONVENTIONAL_NAMES:
        if hasattr(module, conv):
            return _materialise(getattr(module, conv), path, conv), conv
    instances = [k for k, v in vars(module).items() if isinstance(v, nn.Module) and not k.startswith("_")]
    if len(instances) == 1:
        return getattr(module, instances[0]), instances[0]
    if len(instances) > 1:
        raise ModelFileError(
            f"{path.name} holds several nn.Module instances ({', '.join(instances)}); "
            f"pick one with {path.name}:NAME"
        )
    raise ModelFileError(
        f"no model found in {path.name}: define `model = MyNet()` or a `build_model()` function, "
        f"or name one with {path.name}:NAME"
    )


def _candidates(module) -> list[str]:
    return sorted(
        k for k, v in vars(module).items()
        if not k.startswith("_") and (isinstance(v, nn.Module) or (callable(v) and getattr(v, "__module__", None) == module.__name__))
    )


def _materialise(obj: Any, path: Path, name: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        try:
            obj = obj()
        except TypeError as exc:
            raise ModelFileError(
                f"{path.name}:{name} cannot be called without arguments ({first_line(exc)}); "
                f"give a zero-argument factory or an nn.Module instance"
            ) from exc
        except SystemExit as exc:
            raise ModelFileError(f"{path.name}:{name}() called sys.exit({exc.code!r}); a factory returns the "
                                 "model") from None
        except Exception as exc:
            raise ModelFileError(
                f"{path.name}:{name}() raised {type(exc).__name__}: {first_line(exc)} ({_where(exc, path)})"
            ) from exc
        if isinstance(obj, nn.Module):
            return obj
    raise ModelFileError(
        f"{path.name}:{name} is a {type(obj).__name__}, not a torch.nn.Module; "
        "point at a model instance or a factory that returns one"
    )


def discovered_name(module) -> str | None:
    """The name the default discovery picks in a model file's module, without calling anything:
    the first conventional name it defines, else its single ``nn.Module`` instance."""
    for conv in CONVENTIONAL_NAMES:
        if hasattr(module, conv):
            return conv
    instances = [k for k, v in vars(module).items() if isinstance(v, nn.Module) and not k.startswith("_")]
    return instances[0] if len(instances) == 1 else None


def load_model(spec: str | os.PathLike, *, expect_sha256: str | None = None,
               expect_closure: dict[str, str] | None = None, expect_name: str | None = None) -> LoadedModel:
    """Loads the model named by ``path/to/model.py[:NAME]``; what runs is the bytes hashed
    (``LoadedModel.sha256``), checked against ``expect_sha256`` when given, before they run.

    NAME is an ``nn.Module`` instance or a zero-argument factory. Without NAME the
    conventional names (model, build_model, get_model, create_model) are tried, then a
    single ``nn.Module`` instance. An ``example_inputs()`` function in the file, if any,
    provides example inputs.

    Raises:
        ModelFileError: with what to try next, for every way this can fail.
    """
    path, name = split_spec(str(spec))
    if not path.exists():
        from .fsutil import check_loop

        check_loop(path, "model file", ModelFileError)
        raise ModelFileError(f"model file {path} not found; give a path like model.py or model.py:build_model")
    if path.suffix != ".py":
        hint = " (that looks like a checkpoint: use `sugarize export`)" if path.suffix == ".safetensors" else ""
        raise ModelFileError(f"{path} is not a Python file{hint}; give model.py or model.py:NAME")
    module, digest = import_file(path, expect_sha256, expect_closure)
    if name is None and expect_name is not None:
        found = discovered_name(module)
        if found != expect_name:
            from ..errors import CheckpointError

            raise CheckpointError(f"the checkpoint was made from {path.name}:{expect_name}, and {path.name} without a "
                                  f"name means {path.name}:{found or '<nothing>'}; nothing was called: name the "
                                  f"function to call, --model {path}:{expect_name}")
    closure = module.__sugarize_finder__  # the file's own: what the factory imports joins its record
    with user_folders(path, closure):
        model, name = _resolve(module, path, name)
        example = None
        if callable(getattr(module, "example_inputs", None)):
            try:
                example = module.example_inputs()
            except (Exception, SystemExit) as exc:
                raise InputError(f"{path.name}:example_inputs() raised {type(exc).__name__}: {first_line(exc)}") from exc
    if example is not None:
        example = as_tuple(example, f"{path.name}:example_inputs()")
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ModelFileError(f"{path.name}:{name} is on the meta device (its weights hold no data): build it on the "
                             "CPU, or give it real weights (model.to_empty(device='cpu') and load_state_dict) first")
    keep(closure)  # inside a session (every CLI command), in force for as long as the command runs
    # the live record: what the forward imports or reads before the checkpoint is saved joins it
    return LoadedModel(model, path.resolve(), name, example, digest, module, module.__sugarize_closure__)

"""Model files (``file.py[:NAME]``), example inputs, weights, and SUGAR checkpoints.

A SUGAR checkpoint is one safetensors file: the weights, plus a JSON recipe in its header
(model file and hash, surrogate and parameters, input specs, sites). Loading it runs
nothing but the user's own model file; weights never go through pickle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointError, InputError, ModelFileError
from .fsutil import atomic_path

__all__ = [
    "LoadedModel", "load_model", "parse_input_spec", "make_inputs", "load_weights",
    "save_weights", "save_checkpoint", "load_checkpoint", "read_recipe", "is_checkpoint",
    "load_state_into", "run_model",
]

CONVENTIONAL_NAMES = ("model", "build_model", "get_model", "create_model")
FORMAT = "sugarize-checkpoint/1"


@dataclass
class LoadedModel:
    model: nn.Module
    path: Path
    name: str
    example_inputs: tuple | None
    sha256: str
    module: Any = field(repr=False, default=None)

    @property
    def spec(self) -> str:
        return f"{self.path}:{self.name}"


def _split_spec(spec: str) -> tuple[Path, str | None]:
    text = str(spec)
    if ":" in text and not text.endswith(".py"):
        path, _, name = text.rpartition(":")
        return Path(path), name or None
    return Path(text), None


def _import_file(path: Path):
    path = path.resolve()
    folder = path.parent
    if (folder / "__init__.py").exists():  # part of a package: relative imports work
        pkg_root, name = folder.parent, f"{folder.name}.{path.stem}"
    else:
        pkg_root, name = folder, path.stem
    for p in (str(folder), str(pkg_root)):
        if p not in sys.path:
            sys.path.insert(0, p)
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise ModelFileError(
            f"syntax error in {path.name} line {exc.lineno}: {exc.msg}; fix the file and try again"
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
            f"running {path.name} failed: {type(exc).__name__}: {_one_line(exc)} ({_where(exc, path)}); "
            f"run `python {path}` to see the full traceback"
        ) from exc
    return module


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _where(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).name == path.name]
    return f"{path.name} line {frames[-1].lineno}" if frames else path.name


def _sha256(path: Path) -> str:
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
                f"{path.name}:{name} cannot be called without arguments ({_one_line(exc)}); "
                f"give a zero-argument factory or an nn.Module instance"
            ) from exc
        except Exception as exc:
            raise ModelFileError(
                f"{path.name}:{name}() raised {type(exc).__name__}: {_one_line(exc)} ({_where(exc, path)})"
            ) from exc
        if isinstance(obj, nn.Module):
            return obj
    raise ModelFileError(
        f"{path.name}:{name} is a {type(obj).__name__}, not a torch.nn.Module; "
        "point at a model instance or a factory that returns one"
    )


def load_model(spec: str | os.PathLike) -> LoadedModel:
    """Loads the model named by ``path/to/model.py[:NAME]``.

    NAME is an ``nn.Module`` instance or a zero-argument factory. Without NAME the
    conventional names (model, build_model, get_model, create_model) are tried, then a
    single ``nn.Module`` instance. An ``example_inputs()`` function in the file, if any,
    provides example inputs.

    Raises:
        ModelFileError: with what to try next, for every way this can fail.
    """
    path, name = _split_spec(str(spec))
    if not path.exists():
        raise ModelFileError(f"model file {path} not found; give a path like model.py or model.py:build_model")
    if path.suffix != ".py":
        hint = " (that looks like a checkpoint: use `sugarize export`)" if path.suffix == ".safetensors" else ""
        raise ModelFileError(f"{path} is not a Python file{hint}; give model.py or model.py:NAME")
    module = _import_file(path)
    model, name = _resolve(module, path, name)
    example = None
    if callable(getattr(module, "example_inputs", None)):
        try:
            example = module.example_inputs()
        except Exception as exc:
            raise InputError(f"{path.name}:example_inputs() raised {type(exc).__name__}: {_one_line(exc)}") from exc
        example = _as_tuple(example, f"{path.name}:example_inputs()")
    return LoadedModel(model, path.resolve(), name, example, _sha256(path), module)


def _as_tuple(value: Any, what: str) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise InputError(f"{what} must return a tensor or a tuple of tensors, got {type(value).__name__}")


_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "bool": torch.bool,
}


def parse_input_spec(text: str) -> dict[str, Any]:
    """``"1,3,224,224"`` or ``"1,16:int64"`` -> {"shape": [...], "dtype": "..."}."""
    shape_text, _, dtype = text.strip().partition(":")
    dtype = dtype.strip() or "float32"
    if dtype not in _DTYPES:
        raise InputError(f"--input-shape {text!r}: unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    try:
        shape = [int(s) for s in shape_text.split(",")]
    except ValueError:
        raise InputError(f"--input-shape {text!r} is not a shape; write it like 1,3,224,224 or 1,16:int64") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"--input-shape {text!r}: sizes must be positive integers, e.g. 1,3,224,224")
    return {"shape": shape, "dtype": str(_DTYPES[dtype]).replace("torch.", "")}


def random_tensor(shape, dtype: torch.dtype, g: torch.Generator, low: int = 0, high: int = 2) -> torch.Tensor:
    """Floats ~ N(0, 1); booleans and integers uniform in [low, high)."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(low, high, shape, generator=g).to(dtype)


def make_inputs(specs: list[dict[str, Any]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random tensors for input specs (floats ~ N(0,1), integers in [0, 2))."""
    g = torch.Generator().manual_seed(seed)
    return tuple(random_tensor(s["shape"], getattr(torch, s["dtype"]), g) for s in specs)


def input_specs(inputs: tuple) -> list[dict[str, Any]]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in inputs]


def run_model(model: nn.Module, inputs: tuple) -> Any:
    """``model(*inputs)`` in eval mode without grad; a rejection becomes an InputError."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) + ("" if t.dtype == torch.float32 else f":{t.dtype}".replace("torch.", "")) for t in inputs)
        raise InputError(
            f"the model rejected inputs {shapes}: {type(exc).__name__}: {_one_line(exc)}; "
            "fix --input-shape or example_inputs()"
        ) from exc
    finally:
        model.train(was)


# ---------------------------------------------------------------------------- weights


def _state_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone().contiguous() if key in seen or not v.is_contiguous() else v
        seen.add(key)
    return out


def save_weights(state: dict[str, torch.Tensor] | nn.Module, path, *, metadata: dict[str, str] | None = None,
                 force: bool = True) -> Path:
    """Writes a state dict (or a module's) as safetensors, atomically."""
    from safetensors.torch import save_file

    if isinstance(state, nn.Module):
        state = state.state_dict()
    with atomic_path(path, force=force) as tmp:
        save_file(_state_for_saving(state), str(tmp), metadata=metadata)
    return Path(path)


def load_weights(path, *, optimizer_state: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never unpickling arbitrary objects.

    Optimizer state that ``sugarize finetune`` stores beside the weights (keys starting
    ``__optim__.``) is left out, or, with ``optimizer_state=True``, is all that is returned.

    Raises:
        CheckpointError: missing, corrupt, truncated or not a weights file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} not found")
    if _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
            keep = (lambda k: k.startswith("__optim__.")) if optimizer_state else (lambda k: not k.startswith("__optim__."))
            return {k: v for k, v in state.items() if keep(k)}
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {path}: corrupt or truncated safetensors file ({_one_line(exc)}); write it again"
            ) from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as weights: {_one_line(exc)[:200]}; give a safetensors file or a "
            "torch.save(model.state_dict()) file"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (a dict of tensors); save model.state_dict()")
    return obj


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` strictly; a key or shape mismatch is a CheckpointError naming it."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]!r}")
        if shapes:
            k = shapes[0]
            parts.append(f"shape mismatch at {k!r}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise CheckpointError(
            f"{source} does not fit this model: {'; '.join(parts)}; is it for a different model?"
        )
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------ checkpoints


def is_checkpoint(path) -> bool:
    path = Path(path)
    return path.suffix == ".safetensors" or (path.is_file() and path.suffix != ".py" and _looks_like_safetensors(path))


def save_checkpoint(sm: nn.Module, path, *, loaded: LoadedModel, inputs: tuple | None, force: bool = False) -> Path:
    """Writes a SUGAR checkpoint: ``sm``'s weights plus the recipe to rebuild it."""
    import sugarize

    info = sm.meta["sugarize"]
    path = Path(path)
    recipe = {
        "format": FORMAT,
        "sugarize": sugarize.__version__,
        "torch": torch.__version__,
        "model": {
            "path": str(loaded.path),
            "relpath": os.path.relpath(loaded.path, path.resolve().parent),
            "name": loaded.name,
            "sha256": loaded.sha256,
        },
        "inputs": input_specs(inputs) if inputs else None,
        "config": info["config"],
        "report": info["report"].to_dict(),
    }
    return save_weights(sm, path, metadata={"sugarize": json.dumps(recipe)}, force=force)


def read_recipe(path) -> dict[str, Any]:
    """The JSON recipe in a SUGAR checkpoint's header, without loading any tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt, truncated or not safetensors ({_one_line(exc)}); "
            "create it again with `sugarize convert`"
        ) from exc
    if "sugarize" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a SUGAR checkpoint; pass it as --weights")
    try:
        recipe = json.loads(meta["sugarize"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has a damaged recipe ({exc}); create it again") from exc
    if recipe.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {recipe.get('format')!r}; this sugarize reads {FORMAT}")
    return recipe


@dataclass
class LoadedCheckpoint:
    sugar: Any
    original: nn.Module
    loaded: LoadedModel
    recipe: dict[str, Any]
    inputs: tuple | None
    notes: list[str]


def open_checkpoint(path, *, model: str | None = None) -> LoadedCheckpoint:
    """Rebuilds the SUGAR model of a checkpoint and the original model with its weights."""
    from .config import SugarConfig
    from .passes.rewrite import sugarize as convert

    path = Path(path)
    recipe = read_recipe(path)
    notes = []
    if model is None:
        rel = (path.resolve().parent / recipe["model"]["relpath"]).resolve()
        candidates = [rel, Path(recipe["model"]["path"])]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise CheckpointError(
                f"the model file of {path.name} ({recipe['model']['path']}) is gone; pass --model path/to/model.py"
            )
        model = f"{found}:{recipe['model']['name']}"
    loaded = load_model(model)
    if loaded.sha256 != recipe["model"]["sha256"]:
        notes.append(f"{loaded.path.name} changed since the checkpoint was written (sha256 differs)")
    state = load_weights(path)
    load_state_into(loaded.model, state, f"checkpoint {path.name}")
    sm = convert(loaded.model, config=SugarConfig.from_dict(recipe["config"]))
    inputs = loaded.example_inputs
    if inputs is None and recipe.get("inputs"):
        inputs = make_inputs(recipe["inputs"])
    return LoadedCheckpoint(sm, loaded.model, loaded, recipe, inputs, notes)


def load_checkpoint(path, *, model: str | None = None):
    """The trainable SUGAR module (a GraphModule) stored in a SUGAR checkpoint.

    Args:
        path: a ``.safetensors`` file written by ``sugarize convert`` or ``save_checkpoint``.
        model: the model file, if it moved since the checkpoint was written.

    Raises:
        CheckpointError, ModelFileError: with what to do next.
    """
    return open_checkpoint(path, model=model).sugar

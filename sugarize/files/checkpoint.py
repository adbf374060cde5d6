"""SUGAR checkpoints: one safetensors file, the weights plus a JSON recipe in its header.

The recipe records the model file and its hash, the conversion config, the input specs and
the report's sites. Loading it runs nothing but the user's own model file; weights never go
through pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, SugarizeError, first_line
from .inputs import input_specs, make_inputs
from .modelfile import LoadedModel, load_model
from .weights import looks_like_safetensors, load_state_into, load_weights, save_weights

__all__ = ["save_checkpoint", "load_checkpoint", "open_checkpoint", "read_recipe", "validate_recipe", "model_file_of",
           "is_checkpoint", "LoadedCheckpoint"]

FORMAT = "sugarize-checkpoint/1"


def is_checkpoint(path) -> bool:
    path = Path(path)
    return path.suffix == ".safetensors" or (path.is_file() and path.suffix != ".py" and looks_like_safetensors(path))


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
            # every file of the model's folder its code imported (relative path -> sha256): checked
            # before anything runs, and each runs from the bytes that were hashed
            "closure": dict(sorted(loaded.closure.items())),
        },
        "inputs": input_specs(inputs) if inputs else None,
        "config": info["config"],
        "report": info["report"].to_dict(),
    }
    return save_weights(sm, path, metadata={"sugarize": json.dumps(recipe)}, force=force)


def read_recipe(path) -> dict[str, Any]:
    """The JSON recipe in a SUGAR checkpoint's header, validated, without loading any tensor
    or running any code.

    Raises:
        CheckpointError: the file is missing, not a SUGAR checkpoint, or its recipe does not
            match the schema (every field, type and the format version are checked).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        from .fsutil import check_loop

        check_loop(path, "checkpoint", CheckpointError)
        raise CheckpointError(f"checkpoint {path} not found")
    from .fsutil import regular_file

    regular_file(path, "checkpoint", CheckpointError)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt, truncated or not safetensors ({first_line(exc)}); "
            "create it again with `sugarize convert`"
        ) from exc
    if "sugarize" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a SUGAR checkpoint; pass it as --weights")
    text = meta["sugarize"]
    if len(text) > MAX_RECIPE_CHARS:
        raise CheckpointError(f"checkpoint {path} has a recipe of {len(text):,} characters, more than a recipe ever "
                              f"holds ({MAX_RECIPE_CHARS:,}); create it again with `sugarize convert`")
    try:
        recipe = json.loads(text)
    except (ValueError, RecursionError) as exc:  # malformed, or nested deeper than any recipe is
        raise CheckpointError(f"checkpoint {path} has a damaged recipe ({type(exc).__name__}: {first_line(exc)}); "
                              "create it again with `sugarize convert`") from None
    validate_recipe(recipe, path)
    return recipe


_HEX = set("0123456789abcdef")
MAX_RECIPE_CHARS = 8 << 20  # a recipe holds one report: 8 Mi characters is thousands of sites


def _site_fields():
    from dataclasses import fields

    from ..passes.report import Site

    return {f.name: f for f in fields(Site)}


def validate_recipe(recipe: Any, path) -> None:
    """Checks a recipe against the checkpoint schema (``FORMAT``) before any field is used.

    Raises:
        CheckpointError: naming the first field that is missing, mistyped or out of range.
    """
    from ..passes.config import SugarConfig

    name = Path(path).name

    def bad(field_: str, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {name}: recipe field {field_} {what}; "
                               "create the checkpoint again with `sugarize convert`")

    def need(obj: Any, key: str, kind: type | tuple, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise bad(f"{where}{key}", "is missing")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            kinds = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise bad(f"{where}{key}", f"must be a {kinds}, not {type(value).__name__}")
        return value

    if not isinstance(recipe, dict):
        raise bad("(the whole recipe)", "must be a JSON object")
    if recipe.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {name} has format {recipe.get('format')!r}; this sugarize reads {FORMAT}")
    for key in ("sugarize", "torch"):
        need(recipe, key, str, "")
    model = need(recipe, "model", dict, "")
    for key in ("path", "relpath", "name", "sha256"):
        need(model, key, str, "model.")
    if not model["name"].isidentifier():
        raise bad("model.name", f"must be a Python identifier, not {model['name']!r}")
    if len(model["sha256"]) != 64 or not set(model["sha256"]) <= _HEX:
        raise bad("model.sha256", "must be 64 lowercase hex digits")
    closure = model.get("closure", {})
    if not isinstance(closure, dict):
        raise bad("model.closure", f"must be an object, not {type(closure).__name__}")
    for rel, digest in closure.items():
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or "" in parts or "." in parts or \
                ".." in parts[1:] or (parts[0] == ".." and len(parts) != 2):
            raise bad("model.closure", f"names {rel!r}: each key is a file's path inside the model's folder (or, "
                      "for a model in a package, ../NAME in the package's parent folder)")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise bad("model.closure", f"{rel!r} must map to 64 lowercase hex digits")
    inputs = recipe.get("inputs")
    if "inputs" not in recipe:
        raise bad("inputs", "is missing (null when none were recorded)")
    if inputs is not None:
        if not isinstance(inputs, list):
            raise bad("inputs", f"must be a list or null, not {type(inputs).__name__}")
        for i, spec in enumerate(inputs):
            shape = need(spec, "shape", list, f"inputs[{i}].")
            if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
                raise bad(f"inputs[{i}].shape", "must be a list of non-negative integers")
            dtype = need(spec, "dtype", str, f"inputs[{i}].")
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise bad(f"inputs[{i}].dtype", f"must name a torch dtype (float32, int64...), not {dtype[:40]!r}")
    config = need(recipe, "config", dict, "")
    try:
        SugarConfig.from_dict(config)
    except (TypeError, ValueError, SugarizeError) as exc:
        raise bad("config", f"is not a valid conversion config ({first_line(exc)})") from None
    report = need(recipe, "report", dict, "")
    need(report, "capture", str, "report.")
    notes = need(report, "notes", list, "report.")
    if not all(isinstance(n, str) for n in notes):
        raise bad("report.notes", "must be a list of strings")
    runtime = report.get("runtime")
    if runtime is not None:
        if not isinstance(runtime, dict):
            raise bad("report.runtime", f"must be an object or null, not {type(runtime).__name__}")
        for key in ("relu_calls", "converted_calls", "unconverted_calls"):
            need(runtime, key, int, "report.runtime.")
        counts = need(runtime, "unconverted", dict, "report.runtime.")
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in counts.items()):
            raise bad("report.runtime.unconverted", "must map spellings to counts")
        if not all(isinstance(x, str) for x in need(runtime, "unconverted_sites", list, "report.runtime.")):
            raise bad("report.runtime.unconverted_sites", "must be a list of strings")
    known = _site_fields()
    for i, site in enumerate(need(report, "sites", list, "report.")):
        where = f"report.sites[{i}]."
        if not isinstance(site, dict):
            raise bad(f"report.sites[{i}]", "must be an object")
        extra = sorted(set(site) - set(known))
        if extra:
            raise bad(f"{where}{extra[0]}", "is not a site field")
        for key in ("path", "spelling", "kind", "node", "status"):
            need(site, key, str, where)
        for key in ("reason", "surrogate", "capture", "fused"):
            if key in site:
                need(site, key, str, where)
        if "forward_changed" in site:
            need(site, "forward_changed", bool, where)
        if site.get("calls") is not None:
            need(site, "calls", int, where)


@dataclass
class LoadedCheckpoint:
    sugar: Any
    original: nn.Module
    loaded: LoadedModel
    recipe: dict[str, Any]
    inputs: tuple | None
    notes: list[str]


def model_file_of(path, recipe: dict[str, Any], *, model: str | None = None, trust_recipe: bool = False) -> str:
    """The model file (``file.py:NAME``) a checkpoint may run, checked before anything is imported.

    The trust rule: a checkpoint never picks the code that runs. The model file runs only if
    the caller names it (``model``), or explicitly trusts the recipe (``trust_recipe``, like
    Hugging Face's ``trust_remote_code``), and in both cases only if its sha256 is the one
    recorded at ``sugarize convert`` time.

    Raises:
        CheckpointError: no file was named, the file is missing, or its hash differs.
    """
    from .modelfile import file_sha256, split_spec

    path = Path(path)
    rec = recipe["model"]
    if model is not None and trust_recipe:
        from ..errors import InputError

        raise InputError("--model and --trust-recipe were both given: --model runs the file you name, "
                         "--trust-recipe the file the recipe names; give one")
    if model is None and not trust_recipe:
        raise CheckpointError(
            f"{path.name} was made from {rec['path']}:{rec['name']}; opening it runs that file, and sugarize runs "
            f"only code you name: pass --model path/to/{Path(rec['path']).name} (Python: model=...), or "
            "--trust-recipe to run the file the recipe names"
        )
    if model is None:
        bad = next((k for k in ("path", "relpath", "name") if "\x00" in str(rec.get(k) or "")), None)
        if bad is not None:
            raise CheckpointError(f"{path.name}'s recipe names its model file with a NUL byte in {bad} "
                                  f"({str(rec[bad])!r}), which no file name holds: the checkpoint is damaged or "
                                  "crafted; pass --model path/to/model.py")
        candidates = [(path.resolve().parent / rec["relpath"]).resolve(), Path(rec["path"])]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise CheckpointError(
                f"the model file of {path.name} ({rec['path']}) is gone; pass --model path/to/model.py"
            )
        name = rec["name"]
    else:  # without :NAME, the default discovery picks the function (load_model checks it is the recipe's)
        file, name = split_spec(str(model))
        if not file.is_file():
            raise CheckpointError(f"model file {file} not found; give the file {path.name} was made from")
    digest = file_sha256(file)
    if digest != rec["sha256"]:
        raise CheckpointError(
            f"{file.name} is not the file {path.name} was made from: its sha256 is {digest[:12]}..., the "
            f"recipe's {rec['sha256'][:12]}... (it changed since `sugarize convert`); nothing was run: convert "
            f"it again (sugarize convert {file} -o NEW.safetensors) or give the original file"
        )
    from .modelfile import check_closure

    check_closure(file.resolve().parent, rec.get("closure", {}), file.name)
    return f"{file}:{name}" if name else str(file)


def open_checkpoint(path, *, model: str | None = None, trust_recipe: bool = False) -> LoadedCheckpoint:
    """Rebuilds the SUGAR model of a checkpoint and the original model with its weights.

    The recipe is validated and the model file's hash checked before its code is imported
    (``model_file_of``: the file runs only if named, or with ``trust_recipe``).
    """
    from ..passes.config import SugarConfig
    from ..passes.rewrite import sugarize as convert

    path = Path(path)
    recipe = read_recipe(path)
    # the hash is checked again on the very bytes that run (a file swapped after the first check is refused)
    spec = model_file_of(path, recipe, model=model, trust_recipe=trust_recipe)
    loaded = load_model(spec, expect_sha256=recipe["model"]["sha256"], expect_closure=recipe["model"].get("closure", {}),
                        expect_name=recipe["model"]["name"])
    state = load_weights(path)
    load_state_into(loaded.model, state, f"checkpoint {path.name}")
    sm = convert(loaded.model, config=SugarConfig.from_dict(recipe["config"]))
    inputs = loaded.example_inputs
    if inputs is None and recipe.get("inputs"):
        inputs = make_inputs(recipe["inputs"])
    notes = []
    if model is None or _split_name(model) is None:
        import warnings

        from ..errors import SugarizeNote

        how = "--trust-recipe" if model is None else "the default discovery picked it"
        notes.append(f"called {loaded.path.name}:{loaded.name}, the name the recipe records ({how}); pass --model "
                     f"{loaded.path.name}:NAME to call another")
        # also a warning, which every command shows (the CLI prints sugarize's notes), not only those that print notes
        warnings.warn(notes[-1], SugarizeNote, stacklevel=2)
    return LoadedCheckpoint(sm, loaded.model, loaded, recipe, inputs, notes)


def _split_name(model: str) -> str | None:
    from .modelfile import split_spec

    return split_spec(str(model))[1]


def load_checkpoint(path, *, model: str | None = None, trust_recipe: bool = False):
    """The trainable SUGAR module stored in a SUGAR checkpoint.

    Opening a checkpoint runs its model file's code, so that file runs only if you name it
    (``model``) or trust the recipe (``trust_recipe=True``), and only if its sha256 is the
    one recorded when the checkpoint was written.

    Args:
        path: a ``.safetensors`` file written by ``sugarize convert`` or ``save_checkpoint``.
        model: the model file (``model.py`` or ``model.py:NAME``) the checkpoint was made from.
        trust_recipe: run the model file the recipe names (after the hash check).

    Raises:
        CheckpointError, ModelFileError: with what to do next.

    Example:
        >>> sm = sugarize.load_checkpoint("resnet.sugar.safetensors", model="models/resnet.py")
    """
    return open_checkpoint(path, model=model, trust_recipe=trust_recipe).sugar

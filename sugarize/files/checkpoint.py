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

from ..errors import CheckpointError, first_line
from .inputs import input_specs, make_inputs
from .modelfile import LoadedModel, load_model
from .weights import _looks_like_safetensors, load_state_into, load_weights, save_weights

__all__ = ["save_checkpoint", "load_checkpoint", "open_checkpoint", "read_recipe", "is_checkpoint", "LoadedCheckpoint"]

FORMAT = "sugarize-checkpoint/1"


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
            f"cannot read checkpoint {path}: corrupt, truncated or not safetensors ({first_line(exc)}); "
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
    from ..passes.config import SugarConfig
    from ..passes.rewrite import sugarize as convert

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

"""Weights: safetensors (or ``torch.load(weights_only=True)``), never pickle."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, first_line
from .fsutil import atomic_path

__all__ = ["save_weights", "load_weights", "load_state_into"]


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
        from .fsutil import check_loop

        check_loop(path, "weights file", CheckpointError)
        raise CheckpointError(f"weights file {path} not found")
    from .fsutil import regular_file

    regular_file(path, "weights file", CheckpointError)
    if looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
            keep = (lambda k: k.startswith("__optim__.")) if optimizer_state else (lambda k: not k.startswith("__optim__."))
            return {k: v for k, v in state.items() if keep(k)}
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {path}: corrupt or truncated safetensors file ({first_line(exc)}); write it again"
            ) from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as weights: {first_line(exc)}; give a safetensors file or a "
            "torch.save(model.state_dict()) file"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (a dict of tensors); save model.state_dict()")
    return obj


def looks_like_safetensors(path: Path) -> bool:
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
    _warn_lossy_casts(own, state, source)
    model.load_state_dict(state, strict=True)


def _warn_lossy_casts(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` casts each tensor to the model's dtype without a word: warn where that
    changes a value (float64 -> float32 rounding) or its kind (integers or booleans into floats)."""
    import warnings

    from ..errors import SugarizeWarning

    changed = []
    for key, target in own.items():
        value = state[key]
        if value.dtype == target.dtype:
            continue
        kind = value.is_floating_point() != target.is_floating_point() or (value.dtype == torch.bool) != (
            target.dtype == torch.bool)
        if kind or not torch.equal(value.to(target.dtype).to(value.dtype), value):
            changed.append((key, value.dtype, target.dtype))
    if changed:
        key, a, b = changed[0]
        warnings.warn(f"{source}: {len(changed)} tensor(s) change when cast to the model's dtype, e.g. {key!r} "
                      f"{str(a).removeprefix('torch.')} -> {str(b).removeprefix('torch.')}; save the weights in the "
                      "model's dtype to load them exactly", SugarizeWarning, stacklevel=3)

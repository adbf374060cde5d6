"""Example inputs: ``--input-shape`` specs, seeded random tensors, and one checked forward."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError, first_line
from ..modes import eval_mode

__all__ = ["parse_input_spec", "make_inputs", "input_specs", "random_tensor", "run_model"]


def as_tuple(value: Any, what: str) -> tuple:
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


# Example inputs above this size are refused before allocation (a typo like 1,3,2240,2240,3).
MAX_INPUT_BYTES = 1 << 31


def make_inputs(specs: list[dict[str, Any]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random tensors for input specs (floats ~ N(0,1), integers in [0, 2)).

    Raises:
        InputError: a spec over ``MAX_INPUT_BYTES`` (2 GiB), or one the machine cannot allocate.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        dtype = getattr(torch, s["dtype"])
        size = math.prod(s["shape"]) * torch.empty((), dtype=dtype).element_size()
        shape = ",".join(map(str, s["shape"]))
        if size > MAX_INPUT_BYTES:
            raise InputError(f"input shape {shape} needs {size / 2**30:.3g} GiB for one example; example inputs "
                             f"are limited to {MAX_INPUT_BYTES / 2**30:g} GiB: give a smaller --input-shape")
        try:
            out.append(random_tensor(s["shape"], dtype, g))
        except (RuntimeError, MemoryError) as exc:
            raise InputError(f"cannot allocate an example input of shape {shape} ({first_line(exc)}); "
                             "give a smaller --input-shape") from exc
    return tuple(out)


def input_specs(inputs: tuple) -> list[dict[str, Any]]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in inputs]


def run_model(model: nn.Module, inputs: tuple) -> Any:
    """``model(*inputs)`` in eval mode without grad; a rejection, or an output with no tensor
    in it (``forward`` returning None), becomes an InputError."""
    from torch.utils._pytree import tree_flatten

    try:
        with torch.no_grad(), eval_mode(model):
            out = model(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) + ("" if t.dtype == torch.float32 else f":{t.dtype}".replace("torch.", "")) for t in inputs)
        raise InputError(
            f"the model rejected inputs {shapes}: {type(exc).__name__}: {first_line(exc)}; "
            "fix --input-shape or example_inputs()"
        ) from exc
    if not any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
        raise InputError(f"the model's forward returned {type(out).__name__}, no tensor: sugarize checks a model "
                         "by its outputs; return them from forward")
    return out

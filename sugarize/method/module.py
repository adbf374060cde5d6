"""The SUGAR op as a parameter-free activation module, for module swap."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..options import DEFAULT_SAVE, DEFAULT_SURROGATE
from . import sharding
from .op import OP
from .saved import op_options

__all__ = ["SugarActivation"]


class SugarActivation(nn.Module):
    """``relu(x)`` forward bit for bit, ``grad * s'(x)`` backward (``torch.ops.sugarize.sugar``).

    Parameter-free: swapping it in for an activation module changes no ``state_dict`` key.
    ``inplace=True`` writes the result into ``x`` and returns ``x``, as ``nn.ReLU(inplace=True)``
    does. ``replaced`` (not a submodule: it is not in ``state_dict`` or ``modules()``) is the
    module it stands in for, and ``kind``/``spelling`` what that module computed, so the strip
    pass can put it back.

    Example:
        >>> act = SugarActivation("nelu", [0.05])
        >>> y = act(torch.randn(4, requires_grad=True))
    """

    def __init__(self, surrogate: str = DEFAULT_SURROGATE, params: Sequence[float] | None = None,
                 negative_only: bool = False, save: str = DEFAULT_SAVE, *, inplace: bool = False,
                 kind: str = "relu", spelling: str = "", replaced: nn.Module | None = None):
        super().__init__()
        self.options = op_options(surrogate, list(params or ()), negative_only, save)
        self.inplace = bool(inplace)
        self.kind, self.spelling = kind, spelling
        object.__setattr__(self, "replaced", replaced)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is not torch.Tensor:
            sharding.register_for(x)  # a DTensor: its rules for the op (once per process)
        y = OP(x, *self.options.args)
        return x.copy_(y) if self.inplace else y

    def extra_repr(self) -> str:
        surrogate, params, negative_only, save = self.options.args
        extra = (", negative_only=True" if negative_only else "") + (f", save={save!r}" if save != DEFAULT_SAVE else "")
        return f"{surrogate}{list(params)}{extra}, replaces {self.spelling or self.kind}" + (
            ", inplace=True" if self.inplace else "")

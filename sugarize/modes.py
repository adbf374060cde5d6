"""Train/eval modes: every call that switches a caller's model to eval mode switches it back."""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(*models) -> Iterator[None]:
    """Puts ``models`` in eval mode for the block and restores each submodule's own mode after
    (a model with some submodules in eval mode, e.g. frozen BatchNorm, gets exactly those back)."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training

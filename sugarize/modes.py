"""Scoped modes: every call that switches a caller's model to eval mode, or its KV cache off, switches it back."""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["eval_mode", "without_kv_cache", "tool_output", "showing_tool_output"]

_TOOLS = {"show": False}


@contextlib.contextmanager
def tool_output(show: bool) -> Iterator[None]:
    """While active, what third-party tools print at the file-descriptor level (flatc's usage,
    ExecuTorch's cpuinfo lines) is shown (``show``) or kept off the terminal (the default; the
    CLI's ``--verbose`` shows it). Given back as it was after."""
    before = _TOOLS["show"]
    _TOOLS["show"] = bool(show)
    try:
        yield
    finally:
        _TOOLS["show"] = before


def showing_tool_output() -> bool:
    return _TOOLS["show"]


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


@contextlib.contextmanager
def without_kv_cache(*models) -> Iterator[bool]:
    """While active, every Hugging Face config in ``models`` with ``use_cache=True`` says False.

    A causal LM's default config returns its KV cache as an object (``DynamicCache``) that no
    graph export can hold; like optimum's "no-past" export, the graph is exported without it.
    Scoped: the configs are given back as they were. Yields whether anything was changed."""
    changed = {}
    for model in models:
        for module in (model.modules() if model is not None else ()):
            config = module.__dict__.get("config")
            if getattr(config, "use_cache", None) is True:
                changed[id(config)] = config
    for config in changed.values():
        config.use_cache = False
    try:
        yield bool(changed)
    finally:
        for config in changed.values():
            config.use_cache = True

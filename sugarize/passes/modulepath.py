"""Module capture: each selected activation module is swapped for a ``SugarActivation`` at its own
path (torchao's ``quantize_`` by fully qualified name), and swapped back by strip.

Hugging Face models build their activations as modules (``ACT2FN``), so swapping modules covers
them without tracing, keeps the model's class, signature and ``state_dict`` keys, and leaves
nothing sugarize-specific but the swapped modules, which compile as any module does.
"""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn

from ..method.module import SugarActivation
from .activations import module_match
from .capture import private_copy
from .config import SugarConfig
from .report import Site

__all__ = ["NAME", "activation_modules", "find", "convert", "convert_", "strip_", "count", "instrument"]

NAME = "modules"


def activation_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, str, bool]]:
    """``(path, module, kind, spelling, in place)`` for every activation module at every path (a
    module registered under two names is listed under both)."""
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, SugarActivation):
            yield path, module, module.kind, module.spelling, module.inplace
            continue
        hit = module_match(module)
        if hit is not None:
            yield (path, module) + hit


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def find(model: nn.Module, cfg: SugarConfig, status: str = "convertible") -> list[Site]:
    """The activation modules of ``model`` and what ``cfg`` does with each (nothing is changed)."""
    sites = []
    for path, module, kind, spelling, _ in activation_modules(model):
        if isinstance(module, SugarActivation):
            sites.append(Site(path, spelling, kind, "", "sugar", surrogate=module.options.surrogate,
                              forward_changed=kind != "relu", capture=NAME))
            continue
        convert, reason = cfg.decide(kind, path)
        sur = cfg.surrogate_for(kind)[0] if convert else ""
        sites.append(Site(path, spelling, kind, "", status if convert else "skipped",
                          ("forward changes: fine-tune needed" if kind != "relu" else "") if convert else reason,
                          sur, forward_changed=convert and kind != "relu", capture=NAME))
    return sites


def convert_(root: nn.Module, cfg: SugarConfig) -> list[Site]:
    """In place: every activation module of ``root`` that ``cfg`` selects becomes a SugarActivation.
    Returns one Site per activation module."""
    swapped: dict[int, nn.Module] = {}  # one replacement per module object: sharing is kept
    for path, module, kind, spelling, inplace in list(activation_modules(root)):
        if isinstance(module, SugarActivation) or not cfg.decide(kind, path)[0]:
            continue
        new = swapped.get(id(module))
        if new is None:
            surrogate, params = cfg.surrogate_for(kind)
            new = SugarActivation(surrogate, params, cfg.negative_only, cfg.save, inplace=inplace, kind=kind,
                                  spelling=spelling, replaced=module)
            new.train(module.training)
            swapped[id(module)] = new
        _set(root, path, new)
    return [s if s.status != "sugar" else Site(**{**s.__dict__, "status": "converted"})
            for s in find(root, cfg)]


def convert(model: nn.Module, cfg: SugarConfig, *, copy: bool = True) -> tuple[nn.Module, list[Site]]:
    """A module of ``model``'s class with each selected activation module a SugarActivation.
    ``copy=False`` shares ``model``'s parameters and buffers (``tree_clone``); ``model`` is never changed."""
    root = private_copy(model, copy)
    return root, convert_(root, cfg)


def strip_(model: nn.Module) -> list[Site]:
    """In place: every SugarActivation becomes the module it replaced (a ReLU site) or ``nn.ReLU``
    (a relufied site: its forward was changed on purpose), and a Hugging Face config's activation
    field says ``relu`` where every site it governs was relufied (``hf_config``). Returns the
    stripped sites."""
    from .hf_config import relu_config_

    sites, back = [], {}
    for path, module, kind, spelling, inplace in list(activation_modules(model)):
        if not isinstance(module, SugarActivation):
            continue
        new = back.get(id(module))
        if new is None:
            new = module.replaced if kind == "relu" and module.replaced is not None else nn.ReLU(inplace=inplace)
            new.train(module.training)
            back[id(module)] = new
        _set(model, path, new)
        sites.append(Site(path, spelling, kind, "", "stripped", surrogate=module.options.surrogate,
                          forward_changed=kind != "relu", capture=NAME))
    relufied = {s.path: s.kind for s in sites if s.kind != "relu"}
    if relufied:
        kept = {path: kind for path, _, kind, _, _ in activation_modules(model) if kind != "relu"}
        relu_config_(model, relufied, kept)
    return sites


def count(model: nn.Module) -> int:
    """SugarActivation modules in ``model`` (each object once)."""
    return sum(1 for m in model.modules() if isinstance(m, SugarActivation))


def instrument(model: nn.Module, record):
    """``model`` itself, recording each activation module's input and output while in the context."""
    from .callpath import ActivationRecorder

    return ActivationRecorder(model, record, calls=False).running()

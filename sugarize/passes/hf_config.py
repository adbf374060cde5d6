"""A Hugging Face config's activation field, made to say what a stripped model computes.

``save_pretrained`` writes the config and ``from_pretrained`` rebuilds the activations from it
(``ACT2FN[config.hidden_act]``). After relufied sites are stripped to ``nn.ReLU``, the field must
say ``relu`` where every site it governs was relufied, or the reloaded model is the old one.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from .activations import ACTIVATIONS

__all__ = ["FIELDS", "relu_config_"]

# Config attributes that name an activation (``ACT2FN`` key) for the model's MLPs.
FIELDS = ("hidden_act", "hidden_activation", "activation_function", "dense_act_fn", "activation", "act_fn")


def _kind_of(name) -> str | None:
    if not isinstance(name, str):
        return None
    return next((row.kind for row in ACTIVATIONS.values() if name in row.hf_names), None)


def _configs(model: nn.Module) -> list[tuple[str, object]]:
    """(module path, config) for each distinct Hugging Face config in the module tree, shallowest first."""
    seen, out = set(), []
    for path, module in model.named_modules():
        config = module.__dict__.get("config")
        if config is None or not hasattr(config, "to_dict") or not hasattr(config, "save_pretrained"):
            continue
        if id(config) not in seen:
            seen.add(id(config))
            out.append((path, config))
    return out


def _below(path: str, base: str) -> bool:
    return path.startswith(f"{base}.") if base else bool(path)


def relu_config_(model: nn.Module, relufied: dict[str, str], kept: dict[str, str]) -> list[str]:
    """In place: each config field whose activation kind was relufied at every site it governs
    becomes ``"relu"``. ``relufied``/``kept`` map the module path of each activation site (relufied,
    or left as it was) to its kind. A field only some of whose sites were relufied cannot say it:
    a warning names the sites and what to ship instead. Returns the fields changed."""
    from ..errors import SugarizeWarning

    changed = []
    configs = _configs(model)
    for path, config in configs:
        inner = [p for p, c in configs if c is not config and _below(p, path)]  # submodels with configs of their own

        def governed(sites: dict[str, str], kind: str) -> list[str]:
            return [p for p, k in sites.items() if k == kind and _below(p, path) and not any(_below(p, q) for q in inner)]

        for field in FIELDS:
            kind = _kind_of(getattr(config, field, None))
            if kind is None or kind == "relu":
                continue
            done, left = governed(relufied, kind), governed(kept, kind)
            if not done:
                continue
            where = f"{type(config).__name__}.{field}={getattr(config, field)!r}"
            if left:
                warnings.warn(
                    f"{where} governs {len(done) + len(left)} sites but only {len(done)} were relufied "
                    f"(kept: {', '.join(left[:3])}{'...' if len(left) > 3 else ''}): the config cannot say it, so "
                    "from_pretrained would rebuild every site as before; ship this model's state_dict with code that "
                    "builds it (or relufy every site)", SugarizeWarning, stacklevel=3)
                continue
            setattr(config, field, "relu")
            changed.append(f"{type(config).__name__}.{field}")
            proj = getattr(config, "feed_forward_proj", None)
            if field == "dense_act_fn" and isinstance(proj, str):  # T5: "gated-gelu" -> "gated-relu"
                config.feed_forward_proj = "gated-relu" if proj.startswith("gated-") else "relu"
    return changed

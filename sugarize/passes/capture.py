"""A private copy of a user's model to convert: deep, or a tree sharing its tensors; and the fx capture."""

from __future__ import annotations

import copy as _copy

import torch
import torch.fx
import torch.nn as nn

from ..errors import CaptureError, first_line

__all__ = ["capture", "trace_graph", "graph_module", "restore_state_keys", "keep_non_persistent", "Tracer", "tree_clone",
           "private_copy"]


class Tracer(torch.fx.Tracer):
    """``symbolic_trace``'s tracer, with Hugging Face-style activation modules kept as leaves.

    Their forward is a formula (``NewGELUActivation`` writes out the tanh form), which
    tracing would flatten into anonymous arithmetic; as one ``call_module`` node they can be
    recognised and relufied.
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .activations import hf_kind

        return hf_kind(m) is not None or super().is_leaf_module(m, qualname)


def trace_graph(model: nn.Module, *, copy: bool = True) -> tuple[nn.Module, torch.fx.Graph, str]:
    """(root module, its fx graph, capture strategy), the graph not yet compiled to code.

    Passes rewrite the graph and then build the ``GraphModule`` once (``graph_module``):
    building it first would generate and compile Python code only to throw it away.
    ``copy=False`` traces the model itself: the graph's submodules, parameters and buffers
    are the model's own (as with ``torch.fx.symbolic_trace``); the model is not changed.

    Raises:
        CaptureError: if ``model`` is not an ``nn.Module`` or cannot be traced.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model instance",
                           reason=f"not a torch.nn.Module but a {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):  # already captured: keep its nodes and their metadata
        if copy:
            root = _copy.deepcopy(model)
            return root, root.graph, "graph"
        return model, _copy.deepcopy(model.graph), "graph"  # never rewrite the caller's graph
    root = _copy.deepcopy(model) if copy else model
    try:
        graph = Tracer().trace(root)
    except Exception as exc:  # tracing runs arbitrary user code
        first = first_line(exc)
        reason = f"torch.fx.symbolic_trace cannot trace {type(model).__name__}: {first}"
        raise CaptureError(f"{reason}. Mark the untraceable code with torch.fx.wrap, or convert a traceable "
                           "submodule", reason=reason) from exc
    return root, graph, "symbolic_trace"


def graph_module(root: nn.Module, graph: torch.fx.Graph, model: nn.Module) -> torch.fx.GraphModule:
    """The GraphModule of ``graph`` over ``root``, in ``model``'s train/eval mode, with all of
    ``root``'s parameters and buffers (``restore_state_keys``)."""
    if isinstance(root, torch.fx.GraphModule) and root.graph is graph:
        root.recompile()
        return root
    gm = torch.fx.GraphModule(root, graph, root.__class__.__name__)
    gm.training = model.training  # its own flag only: submodules keep theirs (a frozen BatchNorm stays eval)
    restore_state_keys(gm, root)
    return gm


def capture(model: nn.Module, *, copy: bool = True) -> tuple[torch.fx.GraphModule, str]:
    """(GraphModule over a deep copy of ``model``, or over ``model`` itself with
    ``copy=False``; name of the capture strategy used).

    Raises:
        CaptureError: if ``model`` is not an ``nn.Module`` or cannot be traced.
    """
    root, graph, strategy = trace_graph(model, copy=copy)
    return graph_module(root, graph, model), strategy


def restore_state_keys(gm: nn.Module, root: nn.Module) -> None:
    """Give ``gm`` every parameter and buffer of ``root`` that tracing left out, and the same
    persistence: ``gm.state_dict()`` has exactly the keys of ``root.state_dict()``.

    A GraphModule keeps only what its graph references; an unused parameter would
    otherwise vanish from ``state_dict()`` and weights would not load back into the
    user's class.
    """
    have = set(gm.state_dict(keep_vars=True))
    for key, value in root.state_dict(keep_vars=True).items():
        if key in have:
            continue
        owner_path, _, name = key.rpartition(".")
        owner = gm
        for part in owner_path.split(".") if owner_path else []:
            if not hasattr(owner, part) or not isinstance(getattr(owner, part), nn.Module):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(name, value)
        else:
            owner.register_buffer(name, value)
    keep_non_persistent(gm, root)


def keep_non_persistent(gm: nn.Module, root: nn.Module) -> None:
    """Buffers ``root`` registered with ``persistent=False`` stay out of ``gm.state_dict()``.

    A GraphModule (and its deep copy) registers every tensor its graph reads as a persistent
    buffer; without this, the converted model's checkpoint would not fit its own class."""
    for path, module in root.named_modules():
        for name in module._non_persistent_buffers_set:
            try:
                owner = gm.get_submodule(path) if path else gm
            except AttributeError:
                continue
            if name in owner._buffers:
                owner._non_persistent_buffers_set.add(name)


def tree_clone(model: nn.Module) -> nn.Module:
    """A new module tree of ``model``'s classes sharing its parameters and buffers (no tensor is
    copied): swapping modules or adding hooks in the clone leaves ``model`` unchanged. Hugging
    Face configs are copied too, so a stripped clone's config can change alone."""
    clones: dict[int, nn.Module] = {}
    configs: dict[int, object] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in clones:
            return clones[id(m)]
        new = object.__new__(type(m))
        clones[id(m)] = new
        state = dict(m.__dict__)
        for name, value in state.items():
            if isinstance(value, dict) and name.startswith("_"):  # _parameters, _buffers, hook registries
                state[name] = type(value)(value)
            elif isinstance(value, set) and name.startswith("_"):
                state[name] = set(value)
        state["_modules"] = {k: (clone(v) if v is not None else None) for k, v in m._modules.items()}
        config = state.get("config")
        if config is not None and hasattr(config, "to_dict") and hasattr(config, "save_pretrained"):
            state["config"] = configs.setdefault(id(config), _copy.deepcopy(config))
        new.__dict__.update(state)
        return new

    return clone(model)


def private_copy(model: nn.Module, copy: bool) -> nn.Module:
    """A model a pass may change: a deep copy, or with ``copy=False`` a ``tree_clone`` sharing tensors."""
    return _copy.deepcopy(model) if copy else tree_clone(model)

"""Traced islands: inside a model the fx path cannot trace (a Hugging Face model), the submodules
that do trace get the fx path's fusions; and back on strip.

The module path swaps activation modules and cannot see what reads a site's output, so it cannot
fuse a site with the Linear after it (``fusion.py``). Yet a Llama, Mistral or Qwen MLP
(``down(act(gate(x)) * up(x))``) traces on its own. After the swap, ``convert_`` looks top down
for submodules that hold an exact SUGAR activation module and whose forward takes one tensor
(``forward(self, x)``: nothing a trace could bake in, such as an optional mask), traces each
(its ``SugarActivation`` modules kept as leaves; where that fails, every submodule kept as a leaf,
so a LoRA wrapper applied before conversion is one call), turns those calls into SUGAR nodes with the
module's own options, and fuses them. Where something fuses, and the ``GraphModule`` has the
submodule's ``state_dict`` keys, it takes the submodule's place; it shares the submodule's
parameters and buffers. The submodule itself is kept beside it (``meta["sugarize"]["island"]``,
not a child, so not in ``state_dict`` or ``modules()``), still holding its ``SugarActivation``
modules: ``restore_`` (strip) and ``originals`` (the audit) put it back, and the module path
strips and records it as ever. A saved ``state_dict`` and ``save_pretrained`` see the same keys
and tensors, and a stripped model holds the original module classes.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.fx
import torch.nn as nn

from ..method.module import SugarActivation
from ..method.op import OP
from .capture import Tracer
from .config import SugarConfig
from . import fusion
from .opnodes import sugar_args

__all__ = ["convert_", "restore_", "originals", "is_island"]

KEY = "island"


def is_island(module: nn.Module) -> bool:
    """A GraphModule this pass put in place of a submodule."""
    return isinstance(module, torch.fx.GraphModule) and KEY in (module.meta.get("sugarize") or {})


class _IslandTracer(Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SugarActivation) or super().is_leaf_module(m, qualname)


class _ShallowTracer(Tracer):
    """Every submodule a leaf: the submodule's own forward alone is traced (a LoRA wrapper, which
    iterates over its adapters, stays one call)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _one_tensor_forward(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD) \
        and params[0].default is inspect.Parameter.empty


def _exact_sites(module: nn.Module) -> bool:
    return any(isinstance(m, SugarActivation) and m.options.save == "full" and not m.inplace
               for m in module.modules())


def _island(module: nn.Module, path: str, cfg: SugarConfig) -> tuple[torch.fx.GraphModule | None, dict]:
    """``(GraphModule or None, {activation path: (fused, why not)})`` for one candidate submodule."""
    graph = None
    for tracer in (_IslandTracer, _ShallowTracer):
        try:
            graph = tracer().trace(module)
            break
        except Exception:  # noqa: BLE001 - tracing runs the user's code: a submodule that does not trace stays
            continue
    if graph is None:
        return None, {}
    modules = dict(module.named_modules())
    for node in list(graph.nodes):
        act = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(act, SugarActivation):
            continue
        if act.inplace or node.kwargs or len(node.args) != 1:
            return None, {}
        full = f"{path}.{node.target}" if path else str(node.target)
        node.op, node.target, node.args = "call_function", OP, sugar_args(node.args[0], act.options)
        node.meta["sugarize"] = {"path": full, "spelling": act.spelling, "kind": act.kind, "call": None}
    done = fusion.fuse(graph, modules, fusion.enabled(cfg))
    if not done.fused:
        return None, {}
    gm = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    if sorted(gm.state_dict()) != sorted(module.state_dict()):
        return None, {}  # the graph would drop a key (a parameter the forward never reads)
    gm.train(module.training)
    gm.meta["sugarize"] = {KEY: module}
    result = {}
    for node in graph.nodes:
        info = node.meta.get("sugarize")
        if info and "path" in info:
            result[info["path"]] = (done.fused.get(node.name, ""), done.unfused.get(node.name, ""))
    return gm, result


def convert_(root: nn.Module, cfg: SugarConfig) -> dict[str, tuple[str, str]]:
    """In place on a module-path model: each traceable submodule with a fusable site becomes a fused
    GraphModule (module docstring). Returns ``{activation path: (what was fused, why not)}``."""
    if not fusion.enabled(cfg):
        return {}
    counts: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    found: dict[str, tuple[str, str]] = {}
    taken: list[str] = []
    for path, module in list(root.named_modules()):
        if not path or any(path.startswith(t + ".") for t in taken) or isinstance(module, SugarActivation):
            continue
        if counts[id(module)] > 1 or isinstance(module, torch.fx.GraphModule) or not _exact_sites(module) \
                or not _one_tensor_forward(module):
            continue
        gm, result = _island(module, path, cfg)
        if gm is None:
            continue
        parent, _, leaf = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, leaf, gm)
        taken.append(path)
        found.update(result)
    return found


def _islands(model: nn.Module) -> list[tuple[str, torch.fx.GraphModule]]:
    return [(p, m) for p, m in model.named_modules() if p and is_island(m)]


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _synced(path: str, gm: torch.fx.GraphModule) -> nn.Module:
    """The island's submodule, holding every module that was swapped into the island after
    conversion (a PEFT LoRA wrapper, a user's own): what the island computes with is what the
    submodule gets back, so nothing trained is left behind.

    Raises:
        StripRefusedError: naming the module, where the submodule would still hold other parameters
            or buffers than the island (something was added to the island outside its submodules).
    """
    from ..errors import StripRefusedError

    original = gm.meta["sugarize"][KEY]
    mine = dict(original.named_modules(remove_duplicate=False))
    # top down: a swapped module is taken whole (its own children come with it)
    taken: list[str] = []
    for name, module in gm.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        if name in mine and mine[name] is not module and not isinstance(mine[name], SugarActivation):
            _put(original, name, module)
            taken.append(name)
    island, kept = gm.state_dict(keep_vars=True), original.state_dict(keep_vars=True)
    lost = sorted(set(island) - set(kept))
    changed = sorted(k for k in set(island) & set(kept) if island[k] is not kept[k])
    if lost or changed:
        where = f"{path}.{(lost or changed)[0]}" if path else (lost or changed)[0]
        raise StripRefusedError(
            f"strip would drop or replace {len(lost) + len(changed)} tensor(s) of {path or 'the model'} that were "
            f"added to its fused graph after conversion (first: {where}); add them to the module's "
            "submodules instead (a wrapper swapped in for a submodule is kept), or strip before adding them")
    return original


def restore_(model: nn.Module) -> int:
    """In place: each island's submodule back in its place (its parameters are the island's, and
    any module swapped into the island after conversion goes with it, ``_synced``). Returns how
    many were put back.

    Raises:
        StripRefusedError: where the submodule cannot hold all the island holds (nothing is changed
            then)."""
    islands = _islands(model)
    back = [(path, _synced(path, gm), gm) for path, gm in islands]
    for path, original, gm in back:
        original.train(gm.training)
        _put(model, path, original)
    return len(islands)


@contextlib.contextmanager
def originals(model: nn.Module):
    """While in the block, each island's submodule stands in its place (the audit records its
    activation modules; modules swapped into the island after conversion are its too); the
    islands are put back after."""
    islands = _islands(model)
    for path, gm in islands:
        _put(model, path, _synced(path, gm))
    try:
        yield model
    finally:
        for path, gm in islands:
            _put(model, path, gm)

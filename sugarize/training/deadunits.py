"""Dead units and activation sparsity per activation site, on any model and data.

A unit is a feature (last dimension) for 2-D and 3-D activations, a channel (dimension 1)
for 4-D and 5-D ones. A unit *fires* on an input when its pre-activation is positive
anywhere in that input; it is *dead* when it fires on no input of the data. Sparsity is the
fraction of exact zeros in the activation's output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
import torch.nn as nn

from ..errors import InputError, first_line
from ..modes import eval_mode
from ..passes.capture import capture
from ..passes.match import is_sugar, match_node, module_path

__all__ = ["audit", "AuditReport", "SiteAudit"]


@dataclass
class SiteAudit:
    path: str
    spelling: str
    kind: str
    units: int
    dead: int
    zeros: int
    elements: int
    fire_counts: list[int] = field(repr=False, default_factory=list)

    @property
    def dead_fraction(self) -> float:
        return self.dead / self.units if self.units else 0.0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.elements if self.elements else 0.0


@dataclass
class AuditReport:
    sites: list[SiteAudit]
    samples: int

    @property
    def units(self) -> int:
        return sum(s.units for s in self.sites)

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.sites)

    @property
    def dead_fraction(self) -> float:
        return self.dead / self.units if self.units else 0.0

    @property
    def sparsity(self) -> float:
        elements = sum(s.elements for s in self.sites)
        return sum(s.zeros for s in self.sites) / elements if elements else 0.0

    def to_dict(self, counts: bool = False) -> dict[str, Any]:
        sites = []
        for s in self.sites:
            d = asdict(s)
            if not counts:
                d.pop("fire_counts")
            d["dead_fraction"], d["sparsity"] = s.dead_fraction, s.sparsity
            sites.append(d)
        return {"samples": self.samples, "units": self.units, "dead": self.dead,
                "dead_fraction": self.dead_fraction, "sparsity": self.sparsity, "sites": sites}


class _Recorder:
    def __init__(self):
        self.fires: dict[int, torch.Tensor] = {}
        self.zeros: dict[int, int] = {}
        self.elements: dict[int, int] = {}
        self.samples = 0

    def record(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach(), y.detach()
        if x.dim() < 2:
            return
        pos = x > 0
        if x.dim() in (4, 5):
            per_sample = pos.flatten(2).any(-1)  # N, C
        else:
            per_sample = pos.flatten(1, -2).any(1) if x.dim() == 3 else pos  # N, units
        counts = per_sample.sum(0).to(torch.int64)
        self.fires[index] = self.fires[index] + counts if index in self.fires else counts
        self.zeros[index] = self.zeros.get(index, 0) + int((y == 0).sum())
        self.elements[index] = self.elements.get(index, 0) + y.numel()


def _instrument(model: nn.Module, recorder: _Recorder):
    gm, _ = capture(model)
    modules = dict(gm.named_modules())
    sites = []
    for node in list(gm.graph.nodes):
        if is_sugar(node):
            info = node.meta.get("sugarize", {})
            spelling, kind, x = "SUGAR " + str(node.args[1]), info.get("kind", "relu"), node.args[0]
            path = info.get("path", module_path(node))
        else:
            match = match_node(node, modules)
            if match is None or match.input is None:
                continue
            spelling, kind, x, path = match.spelling, match.kind, match.input, module_path(node)
        index = len(sites)
        sites.append((path, spelling, kind))
        with gm.graph.inserting_after(node):
            gm.graph.call_function(recorder.record, (index, x, node))
    gm.recompile()
    return gm, sites


def _first(batch):
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    if isinstance(batch, dict) and "input" in batch:
        return (batch["input"],)
    raise InputError(f"cannot take model inputs from a batch of type {type(batch).__name__}; yield (x, y) or x")


def audit(model: nn.Module, batches: Iterable[Any]) -> AuditReport:
    """Dead units and sparsity for every ReLU, SUGAR (and GELU/SiLU) site of ``model``.

    Works the same on the original, the converted and the stripped model: a SUGAR site
    fires exactly where the ReLU it replaced fires.

    Args:
        model: any model ``sugarize`` can capture; it is run in eval mode without grad.
        batches: an iterable of ``(x, y)`` pairs or inputs ``x`` (a DataLoader, a list).

    Returns:
        An ``AuditReport`` with per-site and total figures, and per-unit firing counts.
    """
    recorder = _Recorder()
    gm, sites = _instrument(model, recorder)
    with torch.no_grad(), eval_mode(gm):  # gm shares the model's submodules: their modes come back
        for batch in batches:
            inputs = _first(batch)
            try:
                gm(*inputs)
            except Exception as exc:
                raise InputError(f"the model rejected a batch (x {tuple(inputs[0].shape)} {inputs[0].dtype}): "
                                 f"{type(exc).__name__}: {first_line(exc, 200)}; make the batches fit the model") from exc
            recorder.samples += inputs[0].shape[0]
    if not recorder.samples:
        raise InputError("no batches to audit: the loader yielded nothing")
    out = []
    for i, (path, spelling, kind) in enumerate(sites):
        fires = recorder.fires.get(i)
        if fires is None:
            continue
        out.append(SiteAudit(path, spelling, kind, fires.numel(), int((fires == 0).sum()), recorder.zeros[i],
                             recorder.elements[i], fires.tolist()))
    return AuditReport(out, recorder.samples)

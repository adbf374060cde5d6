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
from ..passes.paths import instrument

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
    """Firing counts and zeros per site in the order first seen. A site's key starts with
    (path, spelling, kind); the fx path adds the node's name."""

    def __init__(self):
        self.fires: dict[tuple, torch.Tensor] = {}
        self.zeros: dict[tuple, int] = {}
        self.elements: dict[tuple, int] = {}
        self.samples = 0

    def record(self, index: tuple, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            return
        x, y = x.detach(), y.detach()
        if x.dim() < 2:
            return
        pos = x > 0
        if x.dim() in (4, 5):
            per_sample = pos.flatten(2).any(-1)  # N, C
        else:
            per_sample = pos.flatten(1, -2).any(1) if x.dim() == 3 else pos  # N, units
        counts = per_sample.sum(0).to(torch.int64)
        index = (*index, counts.numel())  # one site called on inputs of other widths is another site
        self.fires[index] = self.fires[index] + counts if index in self.fires else counts
        self.zeros[index] = self.zeros.get(index, 0) + int((y == 0).sum())
        self.elements[index] = self.elements.get(index, 0) + y.numel()


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
        model: any model, on every capture path (fx graph, or activation modules and calls
            recorded as they run); it is run in eval mode without grad.
        batches: an iterable of ``(x, y)`` pairs or inputs ``x`` (a DataLoader, a list).

    Returns:
        An ``AuditReport`` with per-site and total figures, and per-unit firing counts.
    """
    recorder = _Recorder()
    with instrument(model, recorder.record) as gm, torch.no_grad(), eval_mode(gm):
        # gm is the model or shares its submodules: their modes come back
        for batch in batches:
            inputs = _first(batch)
            try:
                gm(*inputs)
            except Exception as exc:
                raise InputError(f"the model rejected a batch (x {tuple(inputs[0].shape)} {inputs[0].dtype}): "
                                 f"{type(exc).__name__}: {first_line(exc)}; make the batches fit the model") from exc
            recorder.samples += inputs[0].shape[0]
    if not recorder.samples:
        raise InputError("no batches to audit: the loader yielded nothing")
    out = []
    for key, fires in recorder.fires.items():
        path, spelling, kind = key[:3]
        out.append(SiteAudit(path, spelling, kind, fires.numel(), int((fires == 0).sum()), recorder.zeros[key],
                             recorder.elements[key], fires.tolist()))
    return AuditReport(out, recorder.samples)

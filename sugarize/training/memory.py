"""What a model keeps for its backward pass, against the same model with plain ReLU, module by module.

``memory_report(model, *args)`` runs one forward pass of ``model`` and of ``strip(model)`` (the same
weights, ReLU at every site) on the same inputs, with gradients, and counts the unique storages
autograd saves (parameters, buffers and the inputs left out), attributed to the innermost module
that holds a SUGAR site (the rest to the model itself). It changes nothing: the model's mode, its
weights and BatchNorm statistics are as before (the forwards run on copies where they would change).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import SugarizeWarning, first_line

__all__ = ["memory_report", "MemoryReport", "MemoryRow"]


@dataclass(frozen=True)
class MemoryRow:
    """One module holding SUGAR sites ("" is the rest of the model): what each model keeps there."""

    module: str
    sites: tuple[str, ...]
    runs: str  # what the report says the sites run as ("mul + Linear", "Conv2d (output rebuilt)", "unfused: ...")
    sugar_bytes: int
    relu_bytes: int

    @property
    def ratio(self) -> float:
        return self.sugar_bytes / self.relu_bytes if self.relu_bytes else (1.0 if not self.sugar_bytes else float("inf"))


@dataclass(frozen=True)
class MemoryReport:
    rows: tuple[MemoryRow, ...]
    notes: tuple[str, ...] = field(default=())  # what the forward said of sites that ran unfused

    @property
    def sugar_bytes(self) -> int:
        return sum(r.sugar_bytes for r in self.rows)

    @property
    def relu_bytes(self) -> int:
        return sum(r.relu_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.sugar_bytes / self.relu_bytes if self.relu_bytes else 1.0

    def __str__(self) -> str:
        mib = 1 << 20
        lines = [f"saved for backward: {self.sugar_bytes / mib:.2f} MiB, plain ReLU {self.relu_bytes / mib:.2f} MiB "
                 f"({self.ratio:.3f}x)"]
        for r in self.rows:
            lines.append(f"  {r.module or '(the rest)'}: {r.sugar_bytes / mib:.2f} / {r.relu_bytes / mib:.2f} MiB "
                         f"({r.ratio:.3f}x){'  ' + r.runs if r.runs else ''}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _where(path: str, names: list[str]) -> str:
    """``path`` in ``model`` now: as it is, or under the wrapper put around the converted model since
    (PEFT's ``base_model.model.``), or "" where it cannot be told."""
    if not path or path in names:
        return path
    found = [n for n in names if n.endswith("." + path)]
    return found[0] if len(found) == 1 else ""


def _saved(model: nn.Module, holders: list[str], args, kwargs) -> dict[str, int]:
    """Bytes of unique saved storages per holder path ("" for the rest), for one forward with gradients."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    skip |= {a.untyped_storage().data_ptr() for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)}
    stack, seen, per = [""], set(), {h: 0 for h in ["", *holders]}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in skip:
            seen.add(key)
            per[stack[-1]] += t.untyped_storage().nbytes()
        return t

    modules = dict(model.named_modules())
    handles = []
    for path in holders:
        module = modules.get(path)
        if module is None or not path:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, p=path: stack.append(p) and None))
        handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*args, **kwargs)
        del out
    finally:
        for h in handles:
            h.remove()
    return per


def memory_report(model: nn.Module, *args, **kwargs) -> MemoryReport:
    """Saved-for-backward bytes of ``model`` on these inputs against the same model with plain ReLU
    (``strip(model)``), per module that holds SUGAR sites.

    Args:
        model: a model from ``sugarize`` (its mode, train or eval, is used as it is).
        *args, **kwargs: one batch, as the model's forward takes it.

    Returns:
        ``MemoryReport``: ``ratio`` (SUGAR / ReLU), ``rows`` per module with what its sites run as,
        and ``notes``: what the forward said of a site reported fused that ran unfused.

    Example:
        >>> print(sugarize.memory_report(sm, batch))      # doctest: +SKIP
    """
    from ..passes.report import report_of
    from ..passes.strip import strip

    report = report_of(model)
    sites = [s for s in (report.sites if report is not None else []) if s.status in ("converted", "sugar")]
    names = [n for n, _ in model.named_modules() if n]
    holders: dict[str, list] = {}
    for s in sites:
        holders.setdefault(_where(_parent(s.path), names), []).append(s)
    paths = sorted(p for p in holders if p)
    measured = copy.deepcopy(model)  # BatchNorm statistics and counters change in a train-mode forward
    relu = strip(model)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", SugarizeWarning)
        ours = _saved(measured, paths, args, kwargs)
    theirs = _saved(relu, paths, args, kwargs)
    rows = []
    for path in ["", *paths]:
        group = holders.get(path, [])
        runs = "; ".join(sorted({(f"fused with {s.fused}" if s.fused else f"unfused: {s.unfused}" if s.unfused
                                  else "") for s in group} - {""}))
        rows.append(MemoryRow(path, tuple(s.path for s in group), runs, ours.get(path, 0), theirs.get(path, 0)))
    notes = tuple(dict.fromkeys(first_line(w.message) for w in said if issubclass(w.category, SugarizeWarning)))
    return MemoryReport(tuple(rows), notes)

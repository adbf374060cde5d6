"""Typed records of what a pass saw and did: one Site per activation call."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Site", "Report", "report_of"]


@dataclass(frozen=True)
class Site:
    """One activation call site.

    Attributes:
        path: dotted module path of the call ("" is the model itself).
        spelling: how the model spells it ("nn.ReLU(inplace=True)", "F.relu", ...).
        kind: "relu", or the activation a relufied site replaced ("gelu", "silu", ...).
        node: the fx node name, unique within the graph ("" for a site found at runtime).
        status: "converted", "sugar" (already SUGAR), "convertible" (inspect only),
            "skipped" or "stripped".
        reason: why a site was skipped, or what to know about it.
        surrogate: the surrogate it uses (or would use), "" if none.
        forward_changed: True for relufied sites, whose forward is no longer the original.
        calls: for a site found at runtime (or inside TorchScript), how many calls it made in
            one forward pass; None for a graph node.
        capture: the capture path that found it: "fx", "modules" or "calls" ("" inside TorchScript).
        fused: what the SUGAR op was fused with on the fx path ("BatchNorm2d", "BatchNorm2d + add":
            its eager backward rebuilds x from the BatchNorm's input instead of keeping it;
            "Linear", "mul + Linear": its backward rebuilds relu(x) and the product from x instead
            of keeping them; "Conv2d (output rebuilt)", "mul + peft Linear (output rebuilt)": any
            other module read alone by the site keeps what it keeps, its copy of relu(x) rebuilt
            from x); "" if none. ``sugarize.memory_report`` measures what a batch really keeps.
        unfused: for an exact converted site on the fx path that was not fused with a consumer,
            why ("read by linear, not a module", "its output is read by 2 nodes"); "" otherwise.
    """

    path: str
    spelling: str
    kind: str
    node: str
    status: str
    reason: str = ""
    surrogate: str = ""
    forward_changed: bool = False
    calls: int | None = None
    capture: str = ""
    fused: str = ""
    unfused: str = ""


@dataclass
class Report:
    """Every activation site of a model and what a pass did with it."""

    sites: list[Site] = field(default_factory=list)
    capture: str = "fx"  # the capture= option's word for the path taken: "fx" or "modules"
    notes: list[str] = field(default_factory=list)
    runtime: dict[str, Any] | None = None  # ReLU calls counted in one forward pass, when inputs were given

    def by_status(self, status: str) -> list[Site]:
        return [s for s in self.sites if s.status == status]

    @property
    def converted(self) -> list[Site]:
        return [s for s in self.sites if s.status in ("converted", "sugar")]

    @property
    def skipped(self) -> list[Site]:
        return self.by_status("skipped")

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {"sites": len(self.sites)}
        for s in self.sites:
            out[s.status] = out.get(s.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "capture": self.capture,
            "totals": self.totals(),
            "notes": list(self.notes),
            "runtime": self.runtime,
            "sites": [asdict(s) for s in self.sites],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        return cls(
            sites=[Site(**s) for s in data.get("sites", [])],
            capture=data.get("capture", ""),
            notes=list(data.get("notes", [])),
            runtime=data.get("runtime"),
        )

    def summary(self) -> str:
        t = self.totals()
        parts = [f"{t.get(k, 0)} {k}" for k in ("converted", "sugar", "convertible", "stripped", "skipped") if t.get(k)]
        line = f"{t['sites']} activation sites: " + (", ".join(parts) if parts else "none")
        fused = sum(1 for s in self.sites if s.fused and s.status in ("converted", "sugar"))
        if fused:
            line += f"; {fused} fused with their BatchNorm or Linear (less kept for the backward)"
        if self.runtime:
            r = self.runtime
            line += (f"; at runtime {r['converted_calls']} SUGAR calls, {r['unconverted_calls']} ReLU calls left "
                     f"(the original makes {r['relu_calls']})")
        return line

    def __str__(self) -> str:
        rows = [("path", "spelling", "status", "surrogate", "reason")]
        for s in self.sites:
            reason = s.reason or (f"fused with {s.fused}" if s.fused else "") or (
                f"not fused: {s.unfused}" if s.unfused else "")
            rows.append((s.path or "<model>", s.spelling, s.status, s.surrogate, reason))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else "") for r in rows]
        return "\n".join(lines + [self.summary() + f" (capture: {self.capture})"])


def report_of(model: Any) -> Report:
    """The report of the last sugarize pass over ``model``: ``sugarize`` (every converted site) or
    ``strip`` (every stripped site), on every capture path. It lives in one place,
    ``model.meta["sugarize"]["report"]``; a stripped model keeps it as plain data (``to_dict``),
    so no sugarize object is left in it.

    Raises:
        InputError: ``model`` did not come from ``sugarize.sugarize`` or ``sugarize.strip``.
    """
    from ..errors import InputError

    report = (getattr(model, "meta", None) or {}).get("sugarize", {}).get("report")
    if isinstance(report, dict):
        return Report.from_dict(report)
    if not isinstance(report, Report):
        raise InputError(f"{type(model).__name__} was not produced by sugarize.sugarize: it has no report; "
                         "call sugarize.inspect(model) to list its activation sites")
    return report

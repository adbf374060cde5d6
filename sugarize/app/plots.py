"""Pictures (matplotlib, imported only here): surrogates, audit bars and firing histograms."""

from __future__ import annotations

from pathlib import Path

from ..errors import SugarizeError
from ..files.fsutil import atomic_path

__all__ = ["plot_surrogates", "save_figure"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SugarizeError("plotting needs matplotlib: pip install 'sugarize[plot]'") from exc
    return plt


def save_figure(fig, path, *, force: bool = True) -> Path:
    plt = _pyplot()
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_surrogates(path, *, force: bool = True) -> Path:
    """One panel per surrogate: s(x) and s'(x) with default parameters, next to ReLU and its 0/1 derivative."""
    import torch

    from ..method.surrogates import get_surrogate, list_surrogates

    plt = _pyplot()
    names = list_surrogates()
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    for ax, name in zip(axes.flat, names):
        e = get_surrogate(name)
        ax.plot(x, torch.relu(x), color="0.6", lw=1, label="relu")
        ax.plot(x, (x > 0).double(), color="0.6", lw=1, ls="--", label="relu'")
        ax.plot(x, e.primitive(x, **e.defaults()), label="s(x)")
        ax.plot(x, e.derivative(x, **e.defaults()), label="s'(x)")
        ax.set_title(name)
        ax.set_ylim(-1.5, 3)
        ax.axhline(0, color="0.85", lw=0.5)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return save_figure(fig, path, force=force)


def plot_audit(report, path, *, force: bool = True) -> Path:
    """Per-site dead and sparsity bars, and the paper's view: how often each unit fires."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{i}:{s.path or 'model'}" for i, s in enumerate(report.sites)]
    xs = range(len(report.sites))
    a1.bar([x - 0.2 for x in xs], [100 * s.dead_fraction for s in report.sites], width=0.4, label="dead units %")
    a1.bar([x + 0.2 for x in xs], [100 * s.sparsity for s in report.sites], width=0.4, label="zeros %")
    a1.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    a1.legend()
    a1.set_title(f"dead {100 * report.dead_fraction:.1f}% of {report.units} units")
    counts = [c for s in report.sites for c in s.fire_counts]
    a2.hist(counts, bins=40)
    a2.set_xlabel(f"inputs (of {report.samples}) on which a unit fires")
    a2.set_ylabel("units")
    return save_figure(fig, path, force=force)


def plot_demo(result, path, *, force: bool = True) -> Path:
    """Demo: accuracy and dead units per variant, and firing histograms (seed 0)."""
    plt = _pyplot()
    rows = result.rows()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = [r["variant"] for r in rows]
    axes[0].bar(names, [100 * r["accuracy_mean"] for r in rows], yerr=[100 * r["accuracy_std"] for r in rows])
    axes[0].set_ylabel("validation accuracy %")
    axes[0].set_ylim(min(100 * r["accuracy_mean"] for r in rows) - 10, 100)
    axes[1].bar(names, [100 * r["dead_mean"] for r in rows], yerr=[100 * r["dead_std"] for r in rows], color="C3")
    axes[1].set_ylabel("dead units %")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    for name in ("ReLU", "SUGAR B-SiLU"):
        if name in result.firing:
            axes[2].hist(result.firing[name], bins=40, alpha=0.6, label=name)
    axes[2].set_xlabel("training inputs on which a unit fires")
    axes[2].legend()
    fig.suptitle("sugarize demo: fine-tuning a ReLU MLP whose units died (digits, 8x8)")
    return save_figure(fig, path, force=force)

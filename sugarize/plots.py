"""Pictures (matplotlib, imported only here): surrogates, audit bars and firing histograms."""

from __future__ import annotations

from pathlib import Path

from .errors import SugarizeError
from .fsutil import atomic_path

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


def plot_surrogates(path) -> Path:
    """One panel per surrogate: s(x) and s'(x) with default parameters, next to ReLU and its 0/1 derivative."""
    import torch

    from .surrogates import get_surrogate, list_surrogates

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
    return save_figure(fig, path)

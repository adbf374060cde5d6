"""Pictures (matplotlib, imported only here): surrogates, audit bars and firing histograms."""

from __future__ import annotations

from pathlib import Path

from ..errors import SugarizeError
from ..files.fsutil import atomic_path

__all__ = ["plot_surrogates", "save_figure", "check_plotting"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SugarizeError("plotting needs matplotlib: pip install 'sugarize[plot]'") from exc
    return plt


def check_plotting() -> None:
    """Raises the error a plot would raise (matplotlib missing) before any work is done."""
    _pyplot()


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


def _bars(ax, rows, key: str, ylabel: str, color=None):
    names = [r["variant"] for r in rows]
    ax.bar(names, [100 * r[f"{key}_mean"] for r in rows], yerr=[100 * r[f"{key}_std"] for r in rows], color=color)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)


def plot_demo(result, path, *, force: bool = True) -> Path:
    """Demo: both cases side by side (accuracy and dead units per variant), the firing histogram
    of case 1 and the revival curve of case 2 (dead units per epoch)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cases = [("case 1: a trained model", result.rows(), False)]
    if result.dead_runs:
        cases.append(("case 2: a mostly dead model", result.rows(dead_case=True), True))
    fig, axes = plt.subplots(len(cases), 3, figsize=(16, 4.2 * len(cases)), squeeze=False)
    for row, (title, rows, dead_case) in zip(axes, cases):
        _bars(row[0], rows, "accuracy", "validation accuracy %")
        row[0].set_title(title)
        accs = [100 * r["accuracy_mean"] for r in rows if r["accuracy_mean"] == r["accuracy_mean"]]
        if accs:
            row[0].set_ylim(max(0, min(accs) - 10), 100)
        _bars(row[1], rows, "dead", "dead units %", color="C3")
        row[1].set_title(title + ": dead units after the fine-tune")
        if dead_case:
            for name, curve in result.dead_curves(dead_case=True).items():
                row[2].plot(range(len(curve)), [100 * d for d in curve], marker=".", label=name)
            row[2].xaxis.set_major_locator(MaxNLocator(integer=True))
            row[2].set_xlabel("epoch (0: the starting weights)")
            row[2].set_ylabel("dead units %")
            row[2].set_title("case 2: the revival, epoch by epoch (mean over seeds)")
            row[2].legend(fontsize=8)
        else:
            for name in ("ReLU", "SUGAR (default)", "SUGAR B-SiLU"):
                if name in result.firing:
                    row[2].hist(result.firing[name], bins=40, alpha=0.6, label=name)
            row[2].set_xlabel("training inputs on which a unit fires (seed 0)")
            row[2].legend()
    fig.suptitle("sugarize demo: fine-tuning a ReLU MLP whose units died (digits, 8x8)")
    fig.tight_layout()
    return save_figure(fig, path, force=force)


def plot_sweep(result, path, *, force: bool = True) -> Path:
    """Sweep: each candidate's metric (mean and spread over seeds) against ReLU's, and its dead units
    at the end and the units it revived."""
    plt = _pyplot()
    rows = [s for s in result.summaries if s.verdict != "diverged"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(10, 0.7 * len(rows) + 6), 4.5))
    names = [s.name for s in rows]
    scale = 100 if result.higher_is_better else 1
    colors = {"baseline": "0.5", "better": "C2", "worse": "C3", "within noise": "C0"}
    a1.bar(names, [scale * s.metric_mean for s in rows], yerr=[scale * s.metric_std for s in rows],
           color=[colors.get(s.verdict, "C0") for s in rows])
    a1.axhline(scale * rows[0].metric_mean, color="0.5", lw=1, ls="--", label="ReLU")
    a1.set_ylabel(result.metric + (" %" if result.higher_is_better else ""))
    lo = min(scale * (s.metric_mean - s.metric_std) for s in rows)
    hi = max(scale * (s.metric_mean + s.metric_std) for s in rows)
    a1.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    a1.set_title("green: better than ReLU, red: worse, blue: within noise")
    a2.bar([i - 0.2 for i in range(len(rows))], [100 * s.dead_end_mean for s in rows], width=0.4,
           label="dead units at the end %", color="C3")
    a2.axhline(100 * result.dead_start, color="C3", lw=1, ls="--", label="dead at the start %")
    a2b = a2.twinx()
    revived = [float("nan") if s.revived_mean is None else s.revived_mean for s in rows]  # n/a: no bar
    a2b.bar([i + 0.2 for i in range(len(rows))], revived, width=0.4, color="C2",
            label="revived units")
    a2b.set_ylabel("revived units (mean over seeds)")
    a2.set_xticks(range(len(rows)), names)
    a2.set_ylabel("dead units %")
    a2.legend(loc="upper left", fontsize=8)
    a2b.legend(loc="upper right", fontsize=8)
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle(f"sugarize sweep: {len(rows) - 1} candidates vs ReLU, {rows[0].seeds} seeds")
    return save_figure(fig, path, force=force)


def plot_history(history, path, *, force: bool = True) -> Path:
    """Fine-tuning curves per epoch: training loss, validation accuracy and dead units."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = [h.epoch for h in history]
    axes[0].plot(epochs, [h.loss for h in history], marker="o")
    axes[0].set_ylabel("training loss")
    acc = [(h.epoch, 100 * h.val_accuracy) for h in history if h.val_accuracy is not None]
    if acc:
        axes[1].plot(*zip(*acc), marker="o", color="C2")
    axes[1].set_ylabel("validation accuracy %")
    dead = [(h.epoch, 100 * h.dead_fraction) for h in history if h.dead_fraction is not None]
    if dead:
        axes[2].plot(*zip(*dead), marker="o", color="C3")
    axes[2].set_ylabel("dead units %")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.suptitle("sugarize finetune")
    return save_figure(fig, path, force=force)

"""The demo's comparison over more seeds, plus the settings where SUGAR does not win.

    python benchmarks/demo_seeds.py [--seeds 10] [--out benchmarks/results]

Writes ``demo_seeds.md`` and ``demo_seeds.json``. Each setting fine-tunes every variant from
the same pretrained ReLU weights per seed (or trains from scratch); "paired" columns compare
SUGAR B-SiLU with ReLU seed by seed, which removes the spread the pretraining causes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, machine_line, md_table, mean_std, write  # noqa: E402

from sugarize.app.demo import VARIANTS, DemoConfig, run_demo  # noqa: E402


def settings(seeds: int) -> list[tuple[str, DemoConfig]]:
    base = DemoConfig(seeds=tuple(range(seeds)))
    few = tuple(range(min(seeds, 5)))
    return [
        ("demo case 1: AdamW-pretrained 10x32 MLP, SGD fine-tune lr 0.003", base),
        ("harsher fine-tune: same, SGD lr 0.01", dataclasses.replace(base, seeds=few, lr=0.01, dead_case=False)),
        ("from scratch: no pretraining, SGD lr 0.01, 20 epochs",
         dataclasses.replace(base, seeds=few, pretrain_epochs=0, lr=0.01, epochs=20, dead_case=False)),
    ]


def paired(result, metric: str, better, runs=None) -> tuple[float, int, int]:
    by = {(r.variant, r.seed): getattr(r, metric) for r in (result.runs if runs is None else runs)}
    diffs = [by[("SUGAR B-SiLU", s)] - by[("ReLU", s)] for s in result.config.seeds]
    ok = [d for d in diffs if d == d]
    wins = sum(1 for d in ok if better(d))
    return (sum(ok) / len(ok) if ok else float("nan")), wins, len(diffs)


def section(title, cfg, result, runs, start, epochs, seconds) -> str:
    """One markdown section: the variants' table and the paired B-SiLU - ReLU figures."""
    rows = []
    for row in result.rows(dead_case=runs is result.dead_runs):
        acc, acc_sd = row["accuracy_mean"], row["accuracy_std"]
        dead, dead_sd = row["dead_mean"], row["dead_std"]
        failed = sum(1 for r in runs if r.variant == row["variant"] and not (r.accuracy > 0.2))
        rows.append([row["variant"], f"{100 * acc:.1f} ± {100 * acc_sd:.1f}" if row["seeds"] else "diverged",
                     f"{100 * dead:.1f} ± {100 * dead_sd:.1f}" if row["seeds"] else "-",
                     f"{failed}/{len(cfg.seeds)}"])
    d_acc, acc_wins, n = paired(result, "accuracy", lambda d: d >= 0, runs)
    d_dead, dead_wins, _ = paired(result, "dead", lambda d: d < 0, runs)
    pre_acc, _ = mean_std([a for a, _ in start])
    pre_dead, _ = mean_std([d for _, d in start])
    both = ", both demo cases" if result.dead_runs else ""
    took = f" ({seconds:.0f} s{both})" if seconds is not None else ""
    return (f"### {title}\n\n{len(cfg.seeds)} seeds, {epochs} epochs per variant; starting point: "
            f"val accuracy {100 * pre_acc:.1f} %, dead units {100 * pre_dead:.1f} %.{took}\n\n"
            + md_table(["variant", "val accuracy %", "dead units %", "collapsed or diverged (acc <= 20 %)"], rows)
            + f"\n\nPaired, SUGAR B-SiLU minus ReLU per seed: accuracy {100 * d_acc:+.2f} points "
            f"(B-SiLU >= ReLU in {acc_wins}/{n} seeds), dead units {100 * d_dead:+.2f} points "
            f"(fewer dead in {dead_wins}/{n} seeds).\n")


def record(title, cfg, result, runs, start) -> dict:
    d_acc, acc_wins, n = paired(result, "accuracy", lambda d: d >= 0, runs)
    d_dead, dead_wins, _ = paired(result, "dead", lambda d: d < 0, runs)
    return {"title": title, "config": dataclasses.asdict(cfg), "start": start,
            "runs": [{"variant": r.variant, "seed": r.seed, "accuracy": r.accuracy, "dead": r.dead} for r in runs],
            "paired": {"accuracy": d_acc, "accuracy_wins": acc_wins, "dead": d_dead, "dead_wins": dead_wins, "n": n}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    m = machine()
    start = time.perf_counter()
    sections, data = [], {"machine": m, "settings": []}
    for title, cfg in settings(args.seeds):
        t = time.perf_counter()
        result = run_demo(cfg, export=False)
        sections.append(section(title, cfg, result, result.runs, result.pretrained, cfg.epochs,
                                time.perf_counter() - t))
        data["settings"].append(record(title, cfg, result, result.runs, result.pretrained))
        print(sections[-1], flush=True)
        if result.dead_runs:
            title = (f"demo case 2: mostly dead 10x32 MLP (every hidden bias {cfg.dead_bias:g} at init), "
                     f"SGD lr {cfg.dead_lr}, {cfg.dead_epochs} epochs")
            sections.append(section(title, cfg, result, result.dead_runs, result.dead_start, cfg.dead_epochs, None))
            data["settings"].append(record(title, cfg, result, result.dead_runs, result.dead_start))
            print(sections[-1], flush=True)
    # The op's saved-derivative precision: does opt-in compression change training results?
    t = time.perf_counter()
    prec_rows, data["save_precision"] = [], {}
    for save in ("full", "bfloat16", "uint8"):
        cfg = dataclasses.replace(settings(args.seeds)[0][1], save=save, dead_case=False,
                                  variants=("ReLU", "SUGAR B-SiLU"))
        result = run_demo(cfg, export=False)
        runs = [r for r in result.runs if r.variant == "SUGAR B-SiLU"]
        acc, acc_sd = mean_std([r.accuracy for r in runs])
        dead, dead_sd = mean_std([r.dead for r in runs])
        data["save_precision"][save] = [{"seed": r.seed, "accuracy": r.accuracy, "dead": r.dead} for r in runs]
        prec_rows.append([save, f"{100 * acc:.2f} ± {100 * acc_sd:.2f}", f"{100 * dead:.2f} ± {100 * dead_sd:.2f}"])
    sections.append("### SUGAR B-SiLU by saved-derivative precision (demo case 1; full is the exact default)\n\n"
                    f"Same seeds and starting weights for each precision ({time.perf_counter() - t:.0f} s).\n\n"
                    + md_table(["save", "val accuracy %", "dead units %"], prec_rows) + "\n")
    print(sections[-1], flush=True)
    total = time.perf_counter() - start
    md = ("# Demo comparison over seeds\n\n"
          f"`python benchmarks/demo_seeds.py --seeds {args.seeds}` on {machine_line(m)}; {total:.0f} s.\n"
          f"Variants: {', '.join(VARIANTS)}. Dead = never positive on the 1,348 training images.\n\n"
          + "\n".join(sections))
    data["seconds"] = total
    md_path, _ = write("demo_seeds", md, data, args.out)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`sugarize.sweep` on the demo's two cases: which surrogate, and is it beyond noise?

    python benchmarks/sweep.py [--seeds 3] [--candidates all] [--out benchmarks/results]

Writes ``sweep.md`` and ``sweep.json``. Case 1 is the demo's trained model (a 10x32 ReLU MLP
pretrained with AdamW at lr 0.01 on the digits, seed 0's weights), each candidate fine-tuned
15 epochs with SGD at lr 0.003; case 2 the demo's mostly dead model (every hidden bias at
-0.75), 20 epochs at lr 0.01. Every candidate of a seed starts from the same weights and sees
the same batches as that seed's ReLU run; the verdict is the paired per-seed comparison
(``sugarize.training.sweep``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import machine, machine_line, md_table, write  # noqa: E402

from sugarize.app.demo import DeepMLP, DemoConfig  # noqa: E402
from sugarize.training.digits import load_digits_split, loader  # noqa: E402
from sugarize.training.sweep import sweep  # noqa: E402
from sugarize.training.train import DataSpec, finetune, seed_everything  # noqa: E402


def cases(cfg: DemoConfig, data: DataSpec):
    seed_everything(0)
    trained = DeepMLP(cfg.depth, cfg.width)
    finetune(trained, data, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, optimizer=cfg.pretrain_optimizer,
             momentum=cfg.momentum, seed=1000, audit_dead=False)
    seed_everything(0)
    dead = DeepMLP(cfg.depth, cfg.width)
    with torch.no_grad():
        for layer in dead.body:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.fill_(cfg.dead_bias)
    return [("case 1: a trained model (demo), 15 epochs at lr 0.003", trained, cfg.epochs, cfg.lr),
            ("case 2: a mostly dead model (demo), 20 epochs at lr 0.01", dead, cfg.dead_epochs, cfg.dead_lr)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--candidates", default="all")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    cfg = DemoConfig()
    (xt, yt), (xv, yv) = load_digits_split()
    data = DataSpec(lambda: loader(xt, yt, cfg.batch_size, shuffle=True), lambda: loader(xv, yv, 512),
                    torch.nn.functional.cross_entropy)
    m = machine()
    md = ["# `sugarize sweep` on the demo's two cases", "",
          f"`python benchmarks/sweep.py --seeds {args.seeds} --candidates {args.candidates}` on {machine_line(m)}.", "",
          "Validation accuracy after each fine-tune, mean ± std over seeds; *vs ReLU*: the paired per-seed "
          "difference (candidate - ReLU, same starting weights and batches), mean ± std; the verdict is a "
          "paired t-test at 95 % with the metric's resolution (one validation sample) as a floor. *revived*: "
          "units dead at the start (firing on no training input) that fire at the end, mean over seeds.", ""]
    data_out = {"machine": m, "cases": {}}
    for title, model, epochs, lr in cases(cfg, data):
        print(f"[{time.perf_counter() - start:.0f} s] {title}", flush=True)
        t0 = time.perf_counter()
        r = sweep(model, data, candidates=args.candidates, seeds=args.seeds, epochs=epochs, lr=lr)
        seconds = time.perf_counter() - t0
        rows = []
        for s in r.summaries:
            if s.verdict == "diverged":
                rows.append([s.name, "diverged", "-", "-", "-", "-", s.verdict])
                continue
            rows.append([s.name, f"{100 * s.metric_mean:.1f} ± {100 * s.metric_std:.1f}",
                         "" if s.verdict == "baseline" else f"{100 * s.diff_mean:+.1f} ± {100 * s.diff_std:.1f}",
                         "" if s.verdict == "baseline" else f"{s.better_seeds}/{s.seeds}",
                         f"{100 * s.dead_end_mean:.1f}", f"{s.revived_mean:.1f}", s.verdict])
        md += [f"## {title}", "",
               f"Start: val accuracy {100 * r.start_metric:.1f} %, dead units {100 * r.dead_start:.1f} % "
               f"({r.dead_units_start} of {r.units}). {len(r.runs)} fine-tunes in {seconds:.0f} s.", "",
               md_table(["candidate", "val accuracy %", "vs ReLU (points)", "better seeds", "dead at end %",
                         "revived", "verdict"], rows), "", f"Advice: {r.advice}.", ""]
        data_out["cases"][title] = {**r.to_dict(), "sweep_seconds": seconds}
    total = time.perf_counter() - start
    md.append(f"Total: {total:.0f} s.")
    data_out["seconds"] = total
    md_path, _ = write("sweep", "\n".join(md) + "\n", data_out, args.out)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

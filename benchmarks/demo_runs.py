"""`sugarize demo` as a user runs it, several times in fresh processes: its time and how far its tables move.

    python benchmarks/demo_runs.py [--runs 3] [--out benchmarks/results]

Each run is `python -m sugarize demo --json` in a fresh process and a fresh folder, alone on the
machine. Writes ``demo_runs.md`` and ``.json``: per run the wall time and the demo's own
``seconds``, and per variant of both cases the mean accuracy and dead units over the demo's
seeds; then, over the runs, the spread of each figure (max - min). float32 training on a CPU is
not bit-reproducible across processes, so the README quotes the tables with that spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import finish, machine, machine_line, md_table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "sugarize", "demo", "--json", "--out", tmp],
                                 capture_output=True, text=True, check=True, cwd=tmp,
                                 env={**os.environ, "PYTHONPATH": str(HERE.parent)})
            wall = time.perf_counter() - t
        data = json.loads(res.stdout)
        rows = {("case 1", r["variant"]): r for r in data["rows"]}
        rows.update({("case 2", r["variant"]): r for r in (data["dead_case"] or {}).get("rows", [])})
        runs.append({"wall_s": wall, "seconds": data["seconds"],
                     "rows": {f"{c}|{v}": {"accuracy": 100 * r["accuracy_mean"], "accuracy_std": 100 * r["accuracy_std"],
                                           "dead": 100 * r["dead_mean"]} for (c, v), r in rows.items()}})
        print(f"run {i + 1}: {wall:.1f} s wall, demo {data['seconds']:.1f} s", flush=True)
    keys = list(runs[0]["rows"])
    table = []
    for k in keys:
        case, variant = k.split("|")
        accs = [r["rows"][k]["accuracy"] for r in runs]
        deads = [r["rows"][k]["dead"] for r in runs]
        table.append([case, variant, " / ".join(f"{a:.1f} ± {r['rows'][k]['accuracy_std']:.1f}" for a, r in zip(accs, runs)),
                      f"{max(accs) - min(accs):.1f}", " / ".join(f"{d:.1f}" for d in deads), f"{max(deads) - min(deads):.1f}"])
    walls = [r["wall_s"] for r in runs]
    m = machine()
    md = ["# `sugarize demo`, run several times", "",
          f"`python benchmarks/demo_runs.py --runs {args.runs}` on {machine_line(m)}; each run a fresh process, "
          "alone on the machine.", "",
          md_table(["run", "wall s (process)", "demo s (its own count)"],
                   [[i + 1, f"{r['wall_s']:.1f}", f"{r['seconds']:.1f}"] for i, r in enumerate(runs)]), "",
          f"Wall time {min(walls):.1f} to {max(walls):.1f} s.", "",
          "Per variant, over the demo's seeds (mean ± std), run by run, and the spread over the runs (max - min):", "",
          md_table(["case", "variant", "val accuracy % per run", "spread", "dead units % per run", "spread"], table), ""]
    return finish("demo_runs", md, {"machine": m, "runs": runs}, start, args.out)


if __name__ == "__main__":
    raise SystemExit(main())

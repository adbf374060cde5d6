"""The first training step and the steady one, with the op's fused eager kernels on and off.

    python benchmarks/first_step.py [--rounds 30] [--fresh 2]

Writes ``first_step.md`` and ``first_step.json``. On the models of ``perf.py`` (ResNet-18-style
CNN 32x32 batch 64, MLP 8x1024 batch 256), one SGD step:

- *first step*: in a fresh process per variant with an empty Inductor cache
  (``TORCHINDUCTOR_CACHE_DIR`` a new folder), the time of the first and the second training
  step of a converted model (``--fresh`` processes each; the median is reported);
- *steady step*: in one process, ReLU, SUGAR with the fused kernels off and SUGAR with them on
  (compiled before timing), steps interleaved with the order rotated every round; each
  variant's ratio to ReLU's step in the same round, median and quartiles over ``--rounds``.

The fused kernels are the eager op's ``torch.compile``-generated encode/decode kernels
(``sugarize.method.kernels``); off is the eager ATen formulas.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import finish, interleaved, machine, machine_line, md_table, ratio_stats  # noqa: E402

VARIANTS = ["ReLU", "SUGAR, fused kernels off", "SUGAR, fused kernels on"]

_CHILD = r"""
import sys, time, json
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads({threads})
import perf
from sugarize.method import kernels
name, variant = {model!r}, {variant!r}
kernels.set_enabled(variant.endswith("on"))
model = perf.build(name, "ReLU" if variant == "ReLU" else "sugarize B-SiLU (default, exact)")
x, y = perf.batch(name)
step = perf.make_step(model, x, y)
t = time.perf_counter(); step(); first = time.perf_counter() - t
t = time.perf_counter(); step(); second = time.perf_counter() - t
print(json.dumps({{"first_s": first, "second_s": second}}))
"""


def fresh_process(model: str, variant: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
               "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        env.pop("SUGARIZE_FUSED", None)
        code = _CHILD.format(here=str(HERE), threads=threads, model=model, variant=variant)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def steady(model_name: str, rounds: int) -> dict[str, dict]:
    import perf
    from sugarize.method import kernels

    x, y = perf.batch(model_name)
    steps = {}
    for v in VARIANTS:
        model = perf.build(model_name, "ReLU" if v == "ReLU" else "sugarize B-SiLU (default, exact)")
        step = perf.make_step(model, x, y)
        on = v.endswith("on")

        def run(step=step, on=on):
            kernels.set_enabled(on)
            step()
        run()  # compiles the fused kernels for the "on" variant
        run()
        steps[v] = run
    out, times = interleaved(steps, rounds, "ReLU")
    kernels.set_enabled(False)
    on, off = times["SUGAR, fused kernels on"], times["SUGAR, fused kernels off"]
    out["on/off"] = {**ratio_stats(on, off), "on_faster_rounds": sum(1 for a, b in zip(on, off) if a < b)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fresh", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import perf

    start = time.perf_counter()
    m = machine()
    data = {"machine": m, "models": {}}
    md = ["# The first training step and the steady one, fused eager kernels on and off", "",
          f"`python benchmarks/first_step.py --rounds {args.rounds} --fresh {args.fresh}` on {machine_line(m)}.", "",
          f"*First step*: a fresh process per variant with an empty Inductor cache, median of {args.fresh}. "
          f"*Steady*: one process, steps interleaved, the order rotated each round; the median over {args.rounds} "
          "rounds of the ratio to ReLU's step in the same round, with the quartiles. *on/off*: the same, "
          "SUGAR with the kernels on against SUGAR with them off, and the rounds in which on was faster.", ""]
    for model_name in perf.MODELS:
        print(f"[{time.perf_counter() - start:.0f} s] {model_name}: fresh processes", flush=True)
        fresh = {v: [fresh_process(model_name, v, args.threads) for _ in range(args.fresh)] for v in VARIANTS}
        print(f"[{time.perf_counter() - start:.0f} s] {model_name}: steady steps", flush=True)
        st = steady(model_name, args.rounds)
        data["models"][model_name] = {"fresh": fresh, "steady": st}
        relu_first = statistics.median(r["first_s"] for r in fresh["ReLU"])
        rows = []
        for v in VARIANTS:
            first = statistics.median(r["first_s"] for r in fresh[v])
            second = statistics.median(r["second_s"] for r in fresh[v])
            s = st[v]
            rows.append([v, f"{first:.2f}", f"{first / relu_first:.2f}x", f"{second:.2f}", f"{s['step_ms']:.1f}",
                         f"{s['ratio']:.3f}", f"{s['ratio_q1']:.3f}-{s['ratio_q3']:.3f}"])
        oo = st["on/off"]
        md += [f"## {model_name}", "",
               md_table(["variant", "first step s (cold cache)", "vs ReLU", "second step s", "steady step ms",
                         "steady ratio", "q1-q3"], rows), "",
               f"Kernels on vs off, paired: {oo['ratio']:.3f} (q1-q3 {oo['ratio_q1']:.3f}-{oo['ratio_q3']:.3f}); "
               f"on was faster in {oo['on_faster_rounds']} of {args.rounds} rounds.", ""]
    return finish("first_step", md, data, start, args.out)


if __name__ == "__main__":
    sys.exit(main())

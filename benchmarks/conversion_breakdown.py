"""Where sugarize + strip spend their time beyond symbolic_trace (Linear+ReLU sites).

    python benchmarks/conversion_breakdown.py [--sites 2000]

Prints the best of 5 for each phase (garbage collected before each run); the figures behind
the conversion rows of perf.md. sugarize = trace the graph + rewrite it + build the
GraphModule (one code generation); strip = rewrite + one code generation.
"""
import argparse
import copy
import gc
import time

import torch
import torch.nn as nn

import sugarize
from sugarize.passes.config import SugarConfig
from sugarize.passes.capture import Tracer, graph_module, trace_graph
from sugarize.passes.rewrite import convert_graph

ap = argparse.ArgumentParser()
ap.add_argument("--sites", type=int, default=2000)
n_sites = ap.parse_args().sites
layers = []
for _ in range(n_sites):
    layers += [nn.Linear(4, 4), nn.ReLU()]
m = nn.Sequential(*layers)


def best_of(name, run, setup=None, n=5):
    best = float("inf")
    for _ in range(n):
        arg = setup() if setup else None
        gc.collect()
        t = time.perf_counter()
        run(arg) if setup else run()
        best = min(best, time.perf_counter() - t)
    print(f"{name:44s} {1e3 * best:8.1f} ms")
    return best


trace = best_of("symbolic_trace (graph + code)", lambda: torch.fx.symbolic_trace(m))
best_of("  of which Tracer().trace (graph only)", lambda: Tracer().trace(m))
best_of("  of which recompile (code only)", lambda gm: gm.recompile(), lambda: torch.fx.symbolic_trace(m))
best_of("deepcopy of the model (copy=True, each pass)", lambda: copy.deepcopy(m))
best_of("sugarize: rewrite the graph", lambda a: convert_graph(a[1], dict(a[0].named_modules()), SugarConfig()),
        lambda: trace_graph(m, copy=False))
best_of("sugarize: GraphModule of the rewritten graph", lambda a: graph_module(a[0], a[1], m),
        lambda: (lambda r: (convert_graph(r[1], dict(r[0].named_modules()), SugarConfig()), r)[1])(
            trace_graph(m, copy=False)))
s = best_of("sugarize(copy=False)", lambda: sugarize.sugarize(m, copy=False))
st = best_of("strip(copy=False) (rewrite + recompile)", lambda sm: sugarize.strip(sm, copy=False),
             lambda: sugarize.sugarize(m, copy=False))
best_of("sugarize (defaults)", lambda: sugarize.sugarize(m))
best_of("strip (defaults)", lambda sm: sugarize.strip(sm), lambda: sugarize.sugarize(m))
print(f"sugarize + strip with copy=False, beyond one trace: {(s + st - trace) / trace:.2f}x the trace")

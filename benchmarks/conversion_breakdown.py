"""Where sugarize + strip spend their time beyond symbolic_trace (2,000 Linear+ReLU sites).

    python benchmarks/conversion_breakdown.py [--sites 2000]

Prints the best of 3 for each step; the figures behind the conversion rows of perf.md.
"""
import argparse
import copy
import time

import torch
import torch.nn as nn

import sugarize
from sugarize.passes.capture import capture
from sugarize.passes.rewrite import convert_graph
from sugarize.config import SugarConfig
ap = argparse.ArgumentParser()
ap.add_argument("--sites", type=int, default=2000)
n_sites = ap.parse_args().sites
layers = []
for _ in range(n_sites):
    layers += [nn.Linear(4, 4), nn.ReLU()]
m = nn.Sequential(*layers)
def t(name, f, n=3):
    best = 1e9
    for _ in range(n):
        a=time.perf_counter(); r=f(); best=min(best, time.perf_counter()-a)
    print(f"{name:28s} {best:.3f}"); return r
t("symbolic_trace", lambda: torch.fx.symbolic_trace(m))
t("deepcopy model", lambda: copy.deepcopy(m))
gm, _ = capture(m)
t("capture", lambda: capture(m))
t("recompile", lambda: gm.recompile())
t("convert_graph (incl recompile)", lambda: convert_graph(capture(m)[0], SugarConfig()))
sm = t("sugarize", lambda: sugarize.sugarize(m))
t("deepcopy gm", lambda: copy.deepcopy(sm))
t("strip", lambda: sugarize.strip(sm))
t("state_dict", lambda: sm.state_dict())

"""The fusion rules are one table (``fusion.RULES``): ``fuse`` runs the enabled rules, ``unfuse``
finds a node's rule by its target, the config's switches and ``warmup`` read the table."""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn as nn

import sugarize
from sugarize.passes import fusion
from sugarize.passes.config import SugarConfig
from sugarize.passes.opnodes import FUSED_TARGETS, fused_nodes

from helpers import same_bits


class BNThenLinear(nn.Module):
    """One site fed by a BatchNorm (the bn rule), one read by a Linear alone (the linear rule)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def _fused(sm) -> list[str]:
    return [fusion.rule_of(n).name for n in fused_nodes(sm.graph)]


def test_every_rule_names_a_config_switch_a_sugarize_keyword_and_a_fused_target():
    fields = {f.name for f in dataclasses.fields(SugarConfig)}
    keywords = set(inspect.signature(sugarize.sugarize).parameters)
    assert [r.name for r in fusion.RULES] == ["bn", "linear"]  # producer before consumer
    for rule in fusion.RULES:
        assert rule.config_key in fields and rule.config_key in keywords
        assert rule.target in FUSED_TARGETS
    assert fusion.enabled(SugarConfig()) == {"bn", "linear"}
    assert fusion.enabled(SugarConfig(fuse_bn=False)) == {"linear"}


def test_fuse_runs_only_the_enabled_rules_and_unfuse_undoes_each_by_its_rule():
    torch.manual_seed(0)
    model = BNThenLinear()
    x = torch.randn(2, 3, 6, 6)
    assert sorted(_fused(sugarize.sugarize(model))) == ["bn", "linear"]
    assert _fused(sugarize.sugarize(model, fuse_linear=False)) == ["bn"]
    assert _fused(sugarize.sugarize(model, fuse_bn=False)) == ["linear"]
    assert _fused(sugarize.sugarize(model, fuse_bn=False, fuse_linear=False)) == []
    sm = sugarize.sugarize(model)
    fusion.unfuse_all(sm.graph)
    sm.recompile()
    assert fused_nodes(sm.graph) == [] and same_bits(sm(x), model(x))


def test_warmup_calls_each_fused_rules_hook(monkeypatch):
    """warmup reads the table: a rule's warm hook is what compiles its backward's kernels."""
    from sugarize.method import kernels

    calls = []
    rules = tuple(dataclasses.replace(r, warm=lambda o, dtype, device, name=r.name: calls.append((name, dtype)) or True)
                  for r in fusion.RULES)
    monkeypatch.setattr(fusion, "RULES", rules)
    monkeypatch.setattr(kernels, "compile_for", lambda *a, **k: True)
    sm = sugarize.sugarize(BNThenLinear())
    try:
        out = sugarize.warmup(sm)
    finally:
        kernels.use_kernels(sm, False)
    assert sorted(calls) == [("bn", torch.float32), ("linear", torch.float32)] and out["failed"] == 0

"""The demo's speed-ups keep its figures: the per-epoch dead-unit count equals the audit's, and
seeds run in worker processes give what one process gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sugarize.app.demo import DeepMLP, DemoConfig, _variants, body_dead_fraction, run_demo
from sugarize.training.deadunits import audit


@pytest.mark.parametrize("variant", ["ReLU", "SUGAR (default)", "SUGAR B-SiLU", "SUGAR NeLU", "LeakyReLU", "GELU"])
@pytest.mark.parametrize("bias", [0.0, -0.75])
def test_the_per_epoch_dead_fraction_is_the_audits(variant, bias):
    torch.manual_seed(0)
    base = DeepMLP(10, 32)
    with torch.no_grad():
        for layer in base.body:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.fill_(bias)
    model = _variants("full")[variant](base)
    x = torch.randn(300, 64)
    assert body_dead_fraction(model, x) == audit(model, [x]).dead_fraction
    assert 0 < audit(model, [x]).dead_fraction or bias == 0.0  # the dead case has dead units to count


def test_seeds_in_two_processes_give_the_figures_of_one():
    cfg = dataclasses.replace(DemoConfig(), seeds=(0, 1), depth=3, width=16, pretrain_epochs=1, epochs=1,
                              dead_epochs=2)
    torch.set_num_threads(3)
    try:
        one = run_demo(cfg, export=False, workers=1)
        assert torch.get_num_threads() == 3  # the in-process run gives the caller's setting back
        two = run_demo(cfg, export=False, workers=2)
        assert torch.get_num_threads() == 3  # the workers set their own, not this process's
    finally:
        torch.set_num_threads(2)
    assert [(r.variant, r.seed) for r in two.runs] == [(r.variant, r.seed) for r in one.runs]
    for a, b in zip(one.runs + one.dead_runs, two.runs + two.dead_runs):
        assert a.accuracy == pytest.approx(b.accuracy, abs=0.02) and len(a.dead_curve) == len(b.dead_curve)
    assert set(two.firing) == set(one.firing) and len(two.dead_runs) == len(one.dead_runs)

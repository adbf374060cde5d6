"""The eager op compiles nothing unless asked: the fused kernels are opt-in (``sugarize.warmup``)."""

from __future__ import annotations

import torch
import torch.nn as nn

import sugarize
from sugarize.method import kernels


def _frames() -> int:
    """Graphs Dynamo compiled so far in this process (AOTAutograd's count too: either moves on a compile)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"] + counters["aot_autograd"]["total"]


def _model():
    # 128 x 1024 = 131,072 elements at the site: above MIN_NUMEL, where the old default compiled
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _step(model, x):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()


def test_converting_and_a_training_step_compile_nothing():
    """Before, the first large tensor compiled the op's fused kernels with torch.compile: a
    multi-second pause in the first step, a C++ compiler needed."""
    assert not kernels.enabled()  # the default
    x = torch.randn(128, 64)
    assert 128 * 1024 >= kernels.MIN_NUMEL
    before = _frames()
    for capture in ("fx", "modules"):
        sm = sugarize.sugarize(_model(), capture=capture)
        _step(sm, x)
    assert _frames() == before, "a conversion or an eager training step ran torch.compile"


def test_warmup_compiles_the_kernels_now_and_the_training_step_then_compiles_nothing():
    was = kernels.enabled()
    try:
        sm = sugarize.sugarize(_model(), "nelu", alpha=0.3)  # a configuration no other test compiles
        before = _frames()
        result = sugarize.warmup(sm)
        assert result["kernels"] == 1 and result["failed"] == 0 and kernels.enabled()
        assert _frames() > before  # compiled here, where the user asked
        x = torch.randn(128, 64)
        after_warmup = _frames()
        _step(sm, x)
        assert _frames() == after_warmup
        assert kernels.fused_encode(torch.randn(128, 1024), "nelu", [0.3], False, "full", None) is not None
    finally:
        kernels.set_enabled(was)

"""The eager op compiles nothing unless asked: the fused kernels are opt-in (``sugarize.warmup``)."""

from __future__ import annotations

import contextlib

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
        # on for this model (#30: a model's setting, not the process's)
        assert result["kernels"] == 1 and result["failed"] == 0 and kernels.enabled_for(sm) is True
        assert not kernels.enabled()
        assert _frames() > before  # compiled here, where the user asked
        x = torch.randn(128, 64)
        after_warmup = _frames()
        _step(sm, x)
        assert _frames() == after_warmup
        with kernels.scoped(True):
            assert kernels.fused_encode(torch.randn(128, 1024), "nelu", [0.3], False, "full", None) is not None
    finally:
        kernels.set_enabled(was)


class _BNNet(nn.Module):
    """conv-bn-relu, a residual conv-bn-add-relu, and one with a downsampling conv-bn shortcut, at
    8 x 16 x 32 x 32 (the last 8 x 16 x 32 x 32 too, stride 1): above MIN_NUMEL."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.d, self.db = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)) + h)
        return self.head(torch.relu(self.b3(self.c3(h)) + self.db(self.d(h))))


def _sum_step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()


def test_the_fused_batchnorm_backward_kernel_is_opt_in_one_pass_and_matches_the_eager_formulas():
    import copy

    from sugarize.method.fused import bn_sugar

    was = kernels.enabled()
    try:
        sm = sugarize.sugarize(_BNNet(), "bsilu", alpha=1.1)  # a configuration no other test compiles
        assert len(sm.graph.find_nodes(op="call_function", target=bn_sugar)) == 3
        eager = copy.deepcopy(sm)
        result = sugarize.warmup(sm)
        assert result["failed"] == 0 and result["kernels"] == 2  # the op's saved forms, the fused backward
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(8, 3, 32, 32).contiguous(memory_format=layout)
            m1, m2 = (copy.deepcopy(m).to(memory_format=layout) for m in (eager, sm))
            kernels.use_kernels(m2)  # a GraphModule's deep copy is rebuilt without the hooks holding the setting
            kernels.set_enabled(False)
            _sum_step(m1, x)
            kernels.set_enabled(True)
            before = _frames()
            with _spy_runs() as calls:
                _sum_step(m2, x)
            assert calls.count("bn_grad") == 3, calls  # every fused site took the one-pass kernel
            assert _frames() == before  # warmup compiled it for both layouts
            for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
                rel = ((p.grad - q.grad).abs().max() / p.grad.abs().max()).item()
                assert rel <= 1e-5, (layout, n, rel)
    finally:
        kernels.set_enabled(was)


def test_two_models_in_one_process_run_their_own_kernels():
    """warmup sets the kernels on the model it was given; another model, and the process default,
    keep theirs (#30): a spy on the kernel runner counts what each training step ran."""
    warmed = sugarize.sugarize(_model(), "nelu", alpha=0.3)
    plain = sugarize.sugarize(_model(), "nelu", alpha=0.3)
    sugarize.warmup(warmed)
    assert kernels.enabled_for(warmed) is True and kernels.enabled_for(plain) is None and not kernels.enabled()
    with _spy_runs() as calls:
        x = torch.randn(128, 64)
        _step(plain, x)
        assert calls == []  # the unwarmed model: the eager formulas, forward and backward
        _step(warmed, x)
        assert calls.count("encode") >= 1 and calls.count("decode") >= 1  # its own kernels, both ways
        calls.clear()
        kernels.use_kernels(warmed, False)  # and a model's setting can be turned off again
        _step(warmed, x)
        assert calls == [] and kernels.enabled_for(warmed) is False
    assert not kernels.enabled()  # the process default never changed


@contextlib.contextmanager
def _spy_runs():
    """The kinds of kernel the op ran ("encode", "decode", "bn_grad") while in the block."""
    calls = []
    real = kernels._run

    def spy(key, *args, **kw):
        calls.append(key[0])
        return real(key, *args, **kw)

    kernels._run = spy
    try:
        yield calls
    finally:
        kernels._run = real

"""The default surrogate (#40): B-SiLU at dead units, ReLU's exact gradient elsewhere.

Its gradient against an independent float64 reference on every path a site can take (the op, BatchNorm-
and Linear-fused sites, a rebuilt consumer, torch.compile); no harm on a healthy model where the
paper's form harms; revival on a dead one where ReLU stays dead; old checkpoints keep their surrogate."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn

import sugarize
from sugarize.options import DEFAULT_SURROGATE
from sugarize.training.digits import load_digits_split, loader
from sugarize.training.train import DataSpec, evaluate, finetune

from helpers import load_fixture


def _reference_grad(x: torch.Tensor, upstream: torch.Tensor, a: float = 1.67) -> torch.Tensor:
    """Written from the definition, in float64, with no sugarize code: a unit (channel of a 4-D
    activation, else the last dim's feature) that is <= 0 over the whole batch gets B-SiLU's
    s'(x) = sig(x) + (x + a) sig(x) (1 - sig(x)); every other element ReLU's 1 (x > 0) or 0."""
    x, g = x.double(), upstream.double()
    unit = 1 if x.dim() == 4 else x.dim() - 1
    moved = x.movedim(unit, -1).reshape(-1, x.shape[unit])
    dead = torch.tensor([bool((moved[:, u] <= 0).all()) for u in range(x.shape[unit])])
    shape = [1] * x.dim()
    shape[unit] = -1
    dead = dead.view(shape)
    sig = 1 / (1 + torch.exp(-x))
    bsilu = sig + (x + a) * sig * (1 - sig)
    return g * torch.where(dead, bsilu, (x > 0).double())


def _with_dead_units(shape, unit_dim, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    index = [slice(None)] * len(shape)
    for u in (0, 2):
        index[unit_dim] = u
        x[tuple(index)] = -x[tuple(index)].abs() - 0.1  # units 0 and 2: dead over the batch
    return x


def test_the_default_is_the_dead_unit_bsilu_and_reports_itself():
    assert DEFAULT_SURROGATE == "bsilu_dead"
    sm = sugarize.sugarize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert [s.surrogate for s in sugarize.report_of(sm).sites] == ["bsilu_dead"]
    assert sm.meta["sugarize"]["config"]["surrogate"] == "bsilu_dead"  # what the recipe records


@pytest.mark.parametrize("shape,unit_dim", [((16, 6), 1), ((4, 5, 6), 2), ((4, 6, 3, 3), 1)])
def test_the_ops_gradient_equals_the_independent_reference(shape, unit_dim):
    x = _with_dead_units(shape, unit_dim)
    upstream = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    xg = x.clone().requires_grad_()
    y = sugarize.sugar(xg)  # the default
    y.backward(upstream)
    assert torch.equal(y, torch.relu(x))
    want = _reference_grad(x, upstream)
    assert torch.allclose(xg.grad.double(), want, rtol=1e-6, atol=1e-7)
    # the units the reference calls dead got B-SiLU's gradient, the others ReLU's exactly
    alive = [u for u in range(shape[unit_dim]) if u not in (0, 2)]
    got, ref = xg.grad.movedim(unit_dim, 0), want.movedim(unit_dim, 0)
    assert torch.equal(got[alive].double(), ref[alive]) and (got[[0, 2]] != 0).all()
    # negative control: the paper's B-SiLU differs at the alive units
    xp = x.clone().requires_grad_()
    sugarize.sugar(xp, "bsilu").backward(upstream)
    assert not torch.allclose(xp.grad.double(), want, rtol=1e-3, atol=1e-4)


class _Net(nn.Module):
    """A BatchNorm-fed site, a Linear-read site and a Conv-read site (fused, fused, rebuilt)."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.conv2, self.bn, self.act2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.fc, self.act3, self.head = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)
        with torch.no_grad():
            self.conv.bias[:2] = -50.0  # two channels dead over any batch
            self.bn.bias[:2] = -8.0  # two more
            self.fc.bias[:3] = -50.0  # three features dead

    def forward(self, x):
        h = self.act2(self.bn(self.conv2(self.act(self.conv(x)))))
        return self.head(self.act3(self.fc(h.mean((2, 3)))))


class _RefNet(_Net):
    """The same network with each site's gradient written out by hand (``_reference_grad``)."""

    def forward(self, x):
        site = lambda t: _Ref.apply(t)  # noqa: E731
        h = site(self.bn(self.conv2(site(self.conv(x)))))
        return self.head(site(self.fc(h.mean((2, 3)))))


class _Ref(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _reference_grad(x, g).to(g.dtype)


@pytest.mark.parametrize("compiled", [False, True])
def test_every_fusion_and_the_compiler_give_the_references_gradients(compiled):
    torch.manual_seed(0)
    model = _Net()
    reference = _RefNet()
    reference.load_state_dict(model.state_dict())
    sm = sugarize.sugarize(model)
    fused = [s.fused for s in sugarize.report_of(sm).sites]
    assert fused == ["Conv2d (output rebuilt)", "BatchNorm2d", "Linear"]
    x = torch.randn(8, 3, 6, 6)
    run = torch.compile(sm) if compiled else sm
    if compiled:
        torch._dynamo.reset()
    run(x).square().sum().backward()
    reference.double()(x.double()).square().sum().backward()
    scale = max(q.grad.abs().max().item() for q in reference.parameters())
    for (name, p), q in zip(sm.named_parameters(), reference.parameters()):
        # float32 against float64: at each gradient's scale, and at the model's for a bias before
        # BatchNorm (exactly 0 in the reference, rounding in float32)
        err = (p.grad.double() - q.grad).abs().max().item()
        assert err <= 1e-4 * q.grad.abs().max().item() or err <= 1e-6 * scale, f"{name}: {err:.3g}"
    dead_rows = reference.fc.weight.grad[:3]
    assert dead_rows.abs().sum() > 0  # the dead features got gradient (B-SiLU's), as the reference says


@contextlib.contextmanager
def _one_thread():
    """Training on one intra-op thread, given back after: the same figures in every process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _digits():
    (xt, yt), (xv, yv) = load_digits_split()
    val = loader(xv, yv, 512)
    return DataSpec(lambda: loader(xt, yt, 64, shuffle=True), lambda: val, nn.functional.cross_entropy), val


def _healthy_mlp():
    torch.manual_seed(0)
    layers, w = [], 64
    for _ in range(8):
        layers += [nn.Linear(w, 64), nn.ReLU()]
        w = 64
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    (xt, yt), _ = load_digits_split()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(8):
        for x, y in loader(xt, yt, 64, shuffle=True, seed=epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def test_no_harm_on_a_healthy_deep_mlp_where_the_papers_form_harms():
    """SGD (momentum 0.9) at 0.01, where ReLU stays healthy: the default stays within 2 points of its
    ReLU twin on each seed; the paper's B-SiLU (the negative control) falls 5+ points on average."""
    with _one_thread():
        model = _healthy_mlp()
        data, val = _digits()
        assert evaluate(model, val)[1] > 0.88
        acc = {"relu": [], "default": [], "paper": []}
        for seed in (0, 1):
            for name, make in (("relu", lambda: copy.deepcopy(model)), ("default", lambda: sugarize.sugarize(model)),
                               ("paper", lambda: sugarize.sugarize(model, surrogate="bsilu"))):
                h = finetune(make(), data, epochs=2, lr=0.01, seed=seed, audit_dead=False, stop_on_collapse=False)
                acc[name].append(100 * h[-1].val_accuracy)
    assert all(d >= r - 2.0 for d, r in zip(acc["default"], acc["relu"])), acc
    assert sum(acc["paper"]) / 2 <= sum(acc["relu"]) / 2 - 5.0, acc


def test_revival_on_a_dead_mlp_where_relu_stays_dead():
    with _one_thread():
        data, val = _digits()
        (xt, _), _ = load_digits_split()
        dead = load_fixture("dead_mlp").build_model()
        start = sugarize.audit(sugarize.sugarize(dead), [(xt,)]).dead_fraction
        out = {}
        for name, make in (("relu", lambda: copy.deepcopy(dead)), ("default", lambda: sugarize.sugarize(dead))):
            m = make()
            h = finetune(m, data, epochs=5, lr=3e-3, optimizer="adamw", seed=0, audit_dead=False,
                         stop_on_collapse=False)
            out[name] = (100 * h[-1].val_accuracy, sugarize.audit(sugarize.sugarize(m) if name == "relu" else m,
                                                                    [(xt,)]).dead_fraction)
    assert start > 0.3
    assert out["relu"][0] < 20 and out["relu"][1] >= start - 1e-9, out  # ReLU: no gradient reaches a dead unit
    assert out["default"][0] >= out["relu"][0] + 10 and out["default"][1] < start - 0.05, out


def test_a_checkpoint_written_with_the_old_default_still_runs_the_papers_bsilu(tmp_path):
    """A recipe written before the change records surrogate "bsilu" (the old default, which the
    config always spells out): it loads as the paper's B-SiLU, not as the new default."""
    import json

    from safetensors import safe_open
    from typer.testing import CliRunner

    from sugarize.app.cli import app
    from helpers import MODELS

    resnet = str(MODELS / "tiny_resnet.py")
    ck = tmp_path / "old.sugar.safetensors"
    res = CliRunner().invoke(app, ["convert", resnet, "-o", str(ck), "--surrogate", "bsilu"])
    assert res.exit_code == 0, res.output
    with safe_open(str(ck), framework="pt") as f:
        recipe = json.loads(f.metadata()["sugarize"])
    assert recipe["config"]["surrogate"] == "bsilu"
    back = sugarize.load_checkpoint(ck, model=resnet)
    assert {s.surrogate for s in sugarize.report_of(back).sites} == {"bsilu"}
    new = sugarize.load_checkpoint(ck, model=resnet)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for m, surrogate in ((back, None), (sugarize.sugarize(sugarize.strip(new), surrogate="bsilu"), "bsilu")):
        m.train()
        m.zero_grad()
        m(x).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))

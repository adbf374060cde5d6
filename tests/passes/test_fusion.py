"""BatchNorm (+ residual add) + SUGAR fused on the fx path: the same values as the unfused op,
BatchNorm's statistics bit for bit, and no copy of x kept for the backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sugarize
from sugarize.method.fused import bn_sugar

from helpers import fgi, same_bits

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Block(nn.Module):
    """conv-bn-F.relu, conv-bn-(+ shortcut)-nn.ReLU: the residual block of a ResNet."""

    def __init__(self, dims=2, cin=4, c=4, downsample=False, act=nn.ReLU, **bn):
        super().__init__()
        self.conv1 = CONV[dims](cin, c, 3, padding=1, bias=False)
        self.bn1 = BN[dims](c, **bn)
        self.conv2 = CONV[dims](c, c, 3, padding=1, bias=False)
        self.bn2 = BN[dims](c, **bn)
        self.act = act()
        self.down = nn.Sequential(CONV[dims](cin, c, 1, bias=False), BN[dims](c, **bn)) if downsample else None

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        short = x if self.down is None else self.down(x)
        return self.act(h + short)


class Net(nn.Module):
    """Two blocks (plain and downsampling shortcut), a Linear-BatchNorm1d-relu head and a Linear-relu
    site that no BatchNorm feeds."""

    def __init__(self, dims=2, **bn):
        super().__init__()
        self.b1 = Block(dims, 3, 4, downsample=True, **bn)
        self.b2 = Block(dims, 4, 4, **bn)
        self.fc = nn.Linear(4, 6, bias=False)  # before a BatchNorm: its gradient would be 0 up to rounding
        self.bn = nn.BatchNorm1d(6, **bn)
        self.fc2 = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.b2(self.b1(x)).flatten(2).mean(-1)
        h = torch.relu(self.bn(self.fc(h)))
        return self.out(self.fc2(h).relu())


def _input(dims, dtype=torch.float32, batch=4):
    return torch.randn(batch, 3, *([6] * dims), dtype=dtype, requires_grad=True)


def _pair(model, **options):
    fused = sugarize.sugarize(model, **options)
    unfused = sugarize.sugarize(model, fuse_bn=False, fuse_linear=False, **options)  # the plain op everywhere
    return fused, unfused


def _step(model, x, weight=None):
    """Forward and backward; the output, every gradient (input first) and every buffer."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = model(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y) if weight is None else weight
    (y * w).sum().backward()
    grads = {"input": x.grad} | {n: p.grad for n, p in model.named_parameters()}
    return y, grads, dict(model.named_buffers())


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _same_as_unfused(fused, unfused, x, tol=1e-5):
    """One forward and backward of each: outputs bit for bit, gradients within ``tol``, buffers
    (running statistics, num_batches_tracked) bit for bit."""
    y1, g1, b1 = _step(fused, x)
    y2, g2, b2 = _step(unfused, x)
    assert same_bits(y1, y2)
    for name in g2:
        assert _rel(g1[name], g2[name]) <= tol, name
    for name in b2:
        assert same_bits(b1[name], b2[name]), name
    return b1


def _fused_nodes(gm):
    return gm.graph.find_nodes(op="call_function", target=bn_sugar)


def test_the_report_and_the_graph_name_every_fused_site_and_the_site_without_batchnorm_stays_apart():
    # the site no BatchNorm feeds is fused with the Linear that reads it by default (#31); apart here
    default = sugarize.sugarize(Net())
    assert sorted(s.fused for s in sugarize.report_of(default).sites)[-1] == "Linear"
    sm = sugarize.sugarize(Net(), fuse_linear=False)
    sites = {(s.path, s.node): s.fused for s in sugarize.report_of(sm).sites}
    assert sorted(sites.values()) == ["", "BatchNorm1d", "BatchNorm2d", "BatchNorm2d", "BatchNorm2d + add",
                                      "BatchNorm2d + add + shortcut BatchNorm2d"]
    assert len(_fused_nodes(sm)) == 5  # the graph holds what the report says
    assert len(next(n for n in _fused_nodes(sm) if len(n.args) == 8).args) == 8  # the shortcut's BatchNorm
    plain = sm.graph.find_nodes(op="call_function", target=torch.ops.sugarize.sugar.default)
    assert [n.name for n in plain] == [node for (_, node), what in sites.items() if not what]  # fc2's relu
    assert "5 fused with their BatchNorm" in sugarize.report_of(sm).summary()
    assert sorted(sm.state_dict()) == sorted(Net().state_dict())  # module tree and keys unchanged
    assert sugarize.count_sugar(sm) == 6


@pytest.mark.parametrize("surrogate", sugarize.list_surrogates())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_sites_give_the_unfused_ops_values_and_gradients_on_every_surrogate(surrogate, dtype):
    model = Net().to(dtype)
    fused, unfused = _pair(model, surrogate=surrogate)
    assert len(_fused_nodes(fused)) == 5 and not _fused_nodes(unfused)
    x = _input(2, dtype)
    y1, g1, b1 = _step(fused, x)
    y2, g2, b2 = _step(unfused, x)
    assert same_bits(y1, y2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name in g2:
        assert _rel(g1[name], g2[name]) <= tol, name
    for name in b2:
        assert same_bits(b1[name], b2[name]), name


@pytest.mark.parametrize("negative_only", [False, True])
def test_fused_gradient_equals_a_hand_built_forward_gradient_injection_model_in_float64(negative_only):
    model = Net().double()
    ref = copy.deepcopy(model)
    for block in (ref.b1, ref.b2):  # every ReLU of the reference by FGI (the paper's form)
        block.act = _FGI(negative_only)
        block.forward = _fgi_block_forward(block, negative_only)
    ref.forward = _fgi_net_forward(ref, negative_only)
    fused = sugarize.sugarize(model, negative_only=negative_only)
    x = _input(2, torch.float64)
    y1, g1, _ = _step(fused, x)
    y2, g2, _ = _step(ref, x)
    assert torch.equal(y1, y2)
    for name in g2:
        assert _rel(g1[name], g2[name]) <= 1e-12, name


class _FGI(nn.Module):
    def __init__(self, negative_only):
        super().__init__()
        self.negative_only = negative_only

    def forward(self, x):
        return fgi(x, None, self.negative_only)


def _fgi_block_forward(b, negative_only):
    def forward(x):
        h = fgi(b.bn1(b.conv1(x)), None, negative_only)
        h = b.bn2(b.conv2(h))
        return b.act(h + (x if b.down is None else b.down(x)))
    return forward


def _fgi_net_forward(n, negative_only):
    def forward(x):
        h = n.b2(n.b1(x)).flatten(2).mean(-1)
        h = fgi(n.bn(n.fc(h)), None, negative_only)
        return n.out(fgi(n.fc2(h), None, negative_only))
    return forward


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bn", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "cumulative", "no-affine", "no-running-stats"])
def test_batchnorm_statistics_change_bit_for_bit_as_the_original_models(dims, bn):
    model = Net(dims, **bn)
    fused = sugarize.sugarize(model)
    assert len(_fused_nodes(fused)) == 5
    for _ in range(3):  # num_batches_tracked 1, 2, 3: the cumulative average's factor changes
        x = _input(dims)
        y_orig = model(x)
        y = fused(x)
        assert same_bits(y, y_orig)
        y.sum().backward()
    original = dict(model.named_buffers())
    got = dict(fused.named_buffers())
    assert set(got) == set(original)
    for name in original:
        assert same_bits(got[name], original[name]), name
    if bn.get("track_running_stats", True):
        assert int(got["b1.bn1.num_batches_tracked"]) == 3


def test_eval_mode_batchnorm_fine_tunes_with_running_statistics_and_leaves_them_alone():
    model = Net()
    model(_input(2))  # running statistics away from their initial values
    model.eval()
    fused, unfused = _pair(model)
    fused.b1.bn2.train()  # one BatchNorm in train mode inside an eval model: read at each call
    unfused.b1.bn2.train()
    b1 = _same_as_unfused(fused, unfused, _input(2))
    assert same_bits(b1["b1.bn1.running_mean"], dict(model.named_buffers())["b1.bn1.running_mean"])


def _saved_bytes(model, x):
    """Bytes of the unique non-parameter storages autograd saves in one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


class _Chain(nn.Module):
    """conv-bn-relu twice, then a residual block whose shortcut is its input: every ReLU fed by BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(2, 8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_a_fused_site_keeps_no_copy_of_x_it_saves_what_the_relu_model_saves():
    model = _Chain()
    x = torch.randn(4, 3, 16, 16)
    fused, unfused = _pair(model)
    assert len(_fused_nodes(fused)) == 4
    relu = _saved_bytes(model, x)
    one_x = 4 * 8 * 16 * 16 * 4  # one activation tensor, float32
    assert _saved_bytes(unfused, x) == relu + 4 * one_x  # the unfused exact op keeps s'(x) at each site
    # fused: nothing beyond the ReLU model's; a few bytes less, as BatchNorm's own backward keeps its
    # running statistics (4 x 2 x 8 floats) and the fused one, in train mode, does not read them
    assert _saved_bytes(fused, x) == relu - 4 * 2 * 8 * 4


def test_a_downsampling_shortcut_is_fused_too_and_its_output_is_rebuilt_not_kept():
    block = nn.Sequential(Block(2, 3, 8, downsample=True), nn.Conv2d(8, 2, 1))  # the next layer keeps y
    x = torch.randn(4, 3, 16, 16)
    fused = sugarize.sugarize(block)
    unfused = sugarize.sugarize(block, fuse_bn=False, fuse_linear=False)  # before any forward changes the running statistics
    what = [s.fused for s in sugarize.report_of(fused).sites]
    assert what == ["BatchNorm2d", "BatchNorm2d + add + shortcut BatchNorm2d"]
    # the shortcut's BatchNorm output, which no layer of the ReLU model keeps, is rebuilt from the
    # shortcut's input (which its BatchNorm keeps anyway): nothing beyond the ReLU model's, less
    # the three BatchNorms' running statistics
    assert _saved_bytes(fused, x) == _saved_bytes(block, x) - 3 * 2 * 8 * 4
    one_x = 4 * 8 * 16 * 16 * 4
    assert _saved_bytes(unfused, x) == _saved_bytes(block, x) + 2 * one_x
    _same_as_unfused(fused, unfused, x.requires_grad_())


def test_sites_not_fed_by_an_unshared_batchnorm_or_not_exact_stay_unfused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.bn(self.conv(x))
            return F.relu(h) + h  # the BatchNorm output is read twice: x must be kept

    sm = sugarize.sugarize(Shared())
    assert not _fused_nodes(sm) and [s.fused for s in sugarize.report_of(sm).sites] == [""]
    for save in ("bfloat16", "uint8"):
        sm = sugarize.sugarize(Net(), save=save)
        assert not _fused_nodes(sm)
        assert not any(s.fused for s in sugarize.report_of(sm).sites)


def test_hooks_on_the_batchnorm_still_fire_and_no_grad_runs_unfused():
    sm = sugarize.sugarize(_Chain())
    calls = []
    sm.get_submodule("stem.1").register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = torch.randn(2, 3, 8, 8)
    y = sm(x)
    assert calls == [torch.Size([2, 8, 8, 8])]
    y.sum().backward()
    with torch.no_grad():
        z = sm(x)
    assert len(calls) == 2 and z.grad_fn is None
    assert same_bits(z, y.detach())


def test_strip_gives_back_batchnorm_the_add_and_the_relu_and_the_onnx_graph_is_the_originals(tmp_path):
    from sugarize.deploy.export import export_onnx
    from sugarize.deploy.structure import compare_structure

    model = Net().eval()
    fused = sugarize.sugarize(model)
    assert len(_fused_nodes(fused)) == 5
    plain = sugarize.strip(fused)
    assert not _fused_nodes(plain) and sugarize.count_sugar(plain) == 0
    assert "bn_sugar" not in plain.code and "sugarize" not in plain.code
    traced = torch.fx.symbolic_trace(model)
    order = [n.name for n in traced.graph.nodes if n.op == "call_module" and "bn" in n.name or n.name.startswith("add")]
    assert [n.name for n in plain.graph.nodes if n.name in order] == order  # each back in its place, by name
    x = torch.randn(2, 3, 6, 6)
    assert same_bits(plain(x), model(x))
    args = (x,)
    original = export_onnx(model, tmp_path / "orig.onnx", args).path
    stripped = export_onnx(plain, tmp_path / "stripped.onnx", args).path
    report = compare_structure(stripped, original)
    assert report.passed, report.first_difference


def test_an_unstripped_fused_model_exports_to_plain_relu():
    model = Net().eval()
    fused = sugarize.sugarize(model)
    ep = torch.export.export(fused, (torch.randn(2, 3, 6, 6),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("sugarize.sugar.default") == 6  # every site the SUGAR op, unfused for the tracer
    assert sum("batch_norm" in t for t in targets) == 6  # the shortcut's BatchNorm among them


def test_audit_reads_every_fused_sites_pre_activation():
    model = _Chain()
    fused = sugarize.sugarize(model)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    got = sugarize.audit(fused, batches)
    want = sugarize.audit(sugarize.sugarize(model, fuse_bn=False), batches)
    assert [s.fire_counts for s in got.sites] == [s.fire_counts for s in want.sites]
    assert len(got.sites) == 4 and len(_fused_nodes(fused)) == 4  # the audit left the model fused


def test_autocast_bfloat16_and_channels_last_match_the_unfused_op():
    model = Net()
    fused, unfused = _pair(model)
    x = _input(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, g1, b1 = _step(fused, x)
        y2, g2, b2 = _step(unfused, x)
    assert y1.dtype == torch.bfloat16 and same_bits(y1, y2)
    for name in g2:
        assert _rel(g1[name], g2[name]) <= 1e-5, name
    cl_fused, cl_unfused = (m.to(memory_format=torch.channels_last) for m in _pair(_Chain()))
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    y1, g1, _ = _step(cl_fused, x)
    y2, g2, _ = _step(cl_unfused, x)
    assert same_bits(y1, y2)
    assert g1["input"].is_contiguous(memory_format=torch.channels_last) == \
        g2["input"].is_contiguous(memory_format=torch.channels_last)
    for name in g2:
        assert _rel(g1[name], g2[name]) <= 1e-5, name


def test_compiled_fused_model_matches_eager():
    model = _Chain()
    fused = sugarize.sugarize(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    eager = copy.deepcopy(fused)
    y1, g1, b1 = _step(eager, x)
    y2, g2, b2 = _step(torch.compile(fused, fullgraph=True), x)
    assert torch.allclose(y1, y2, atol=1e-5)
    for name in g1:
        key = name if name in g2 else "_orig_mod." + name
        assert torch.allclose(g1[name], g2[key], rtol=1e-4, atol=1e-5), name
    for name in b1:
        key = name if name in b2 else "_orig_mod." + name
        assert torch.allclose(b1[name], b2[key], rtol=1e-5, atol=1e-6), name


def test_ddp_gives_the_same_gradients():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    fused = sugarize.sugarize(_Chain())
    plain = copy.deepcopy(fused)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        wrapped = DDP(fused)
        x = torch.randn(4, 3, 8, 8, requires_grad=True)
        _, g1, b1 = _step(wrapped, x)
        _, g2, b2 = _step(plain, x)
    finally:
        dist.destroy_process_group()
    for name in g2:
        key = name if name in g1 else "module." + name
        assert torch.equal(g1[key], g2[name]), name
    for name in b2:
        assert torch.equal(b1["module." + name], b2[name]), name


class _UntracedWithBlock(nn.Module):
    """Does not trace as a whole (data-dependent branch); its conv-BN-ReLU block does, on its own."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.block(x)
        return self.head(y) if y.sum() > 0 else -self.head(y)


def test_an_islands_batchnorm_fusion_is_reported_with_fuse_linear_off():
    """paths._fusion_of returned early when fuse_linear was off: the BatchNorm fusion went unreported."""
    sm = sugarize.sugarize(_UntracedWithBlock(), fuse_linear=False)
    report = sugarize.report_of(sm)
    assert report.capture == "modules" and [s.fused for s in report.sites] == ["BatchNorm2d"]
    off = sugarize.report_of(sugarize.sugarize(_UntracedWithBlock(), fuse_linear=False, fuse_bn=False))
    assert [s.fused for s in off.sites] == [""] and [s.unfused for s in off.sites] == [""]

"""SUGAR + the Linear that reads it fused on the fx path (#31): the forward bit for bit, the
unfused op's gradients, the ReLU model's saved bytes, strip back to the original graph, and the
run-time fallbacks (hooks, LoRA swapped in, no grad) giving the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sugarize
from sugarize.method.fused_linear import linear_sugar
from sugarize.passes import islands
from sugarize.passes.opnodes import FusedLinear, fused_of, is_sugar, options_of

from helpers import same_bits


class MLP(nn.Module):
    def __init__(self, width=32, depth=3):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(width if i else 12, width) for i in range(depth))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        for fc in self.fc:
            x = F.relu(fc(x))
        return self.head(x)


class GLU(nn.Module):
    """A gated MLP, as Llama's: ``down(act(gate(h)) * up(h))`` (and the product spelled the other way)."""

    def __init__(self, hidden=12, inter=24, swap=False):
        super().__init__()
        self.gate, self.up = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.act, self.swap = nn.ReLU(), swap

    def forward(self, h):
        a = self.act(self.gate(h))
        return h + self.down(self.up(h) * a if self.swap else a * self.up(h))


class OwnForward(nn.Linear):  # fx traces through it: its F.linear call is not a module call
    def forward(self, x):
        return super().forward(x) * 2


class Wrapper(nn.Module):  # a LoRA-style wrapper around a Linear: not itself a Linear
    def __init__(self, n):
        super().__init__()
        self.base = nn.Linear(n, n)

    def forward(self, x):
        return self.base(x)


class Mixed(nn.Module):
    """Sites a consumer rule must leave apart: read twice, read by a Linear subclass with its own
    forward or by a convolution; and one read by a wrapper fx traces through, to the plain Linear
    inside it, which is fused."""

    def __init__(self, n=8):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(n, n) for _ in range(4))
        self.own, self.wrap, self.conv = OwnForward(n, n), Wrapper(n), nn.Conv1d(1, 1, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        y = self.own(h) + h  # read twice
        y = self.wrap(torch.relu(self.b(y)))
        y = self.own(torch.relu(self.c(y)))
        return self.conv(torch.relu(self.d(y)).unsqueeze(1)).squeeze(1)


MODELS = {"mlp": (MLP, (6, 12)), "glu": (GLU, (3, 5, 12)), "glu_swapped": (lambda: GLU(swap=True), (3, 5, 12))}


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {"input": x.grad, **{n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_the_report_names_each_fused_site_and_why_the_others_are_not():
    for name, want in (("mlp", ["Linear"] * 3), ("glu", ["mul + Linear"])):
        sm = sugarize.sugarize(MODELS[name][0]())
        report = sugarize.report_of(sm)
        assert [s.fused for s in report.sites] == want, name
        # the graph says so too: of every SUGAR node (the plain op included), each is a fused Linear
        nodes = [n for n in sm.graph.nodes if is_sugar(n)]
        assert [n.target is linear_sugar and isinstance(fused_of(n), FusedLinear) for n in nodes] == [True] * len(want)
        assert "fused with" in str(report)
    report = sugarize.report_of(sugarize.sugarize(Mixed()))
    assert [s.fused for s in report.sites] == ["", "Linear", "", ""]
    assert [s.unfused for s in report.sites] == [
        "its output is read by 2 nodes", "", "read by linear, not a module",
        "read by unsqueeze, not a module"]
    assert "not fused: its output is read by 2 nodes" in str(report)
    off = sugarize.report_of(sugarize.sugarize(MLP(), fuse_linear=False))
    assert [s.fused for s in off.sites] == [""] * 3 and [s.unfused for s in off.sites] == [""] * 3


def test_module_tree_state_dict_and_options_are_unchanged_and_read_from_the_node():
    model = GLU()
    sm = sugarize.sugarize(model, "nelu", alpha=0.2)
    assert sorted(sm.state_dict()) == sorted(model.state_dict())
    (node,) = sm.graph.find_nodes(op="call_function", target=linear_sugar)
    options = options_of(node)
    assert (options.surrogate, options.params, options.negative_only, options.save) == ("nelu", (0.2,), False, "full")
    assert sugarize.count_sugar(sm) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("surrogate", sugarize.list_surrogates())
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_sites_give_the_unfused_ops_values_bit_for_bit_and_its_gradients(name, surrogate, dtype):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    fused = sugarize.sugarize(model, surrogate)
    apart = sugarize.sugarize(model, surrogate, fuse_linear=False)
    assert sugarize.report_of(fused).sites[0].fused and not sugarize.report_of(apart).sites[0].fused
    x = torch.randn(*shape, dtype=dtype)
    y1, g1 = _grads(fused, x)
    y2, g2 = _grads(apart, x)
    assert same_bits(y1, y2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for key in g2:
        assert g1[key] is not None and _rel(g1[key], g2[key]) <= tol, key


def _saved_bytes(model, x) -> int:
    """Bytes of the unique storages autograd keeps for the backward (parameters and the input left out)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(v for k, v in seen.items() if k not in skip)


@pytest.mark.parametrize("name", ["mlp", "glu"])
def test_a_fused_site_keeps_what_relu_keeps_and_the_unfused_one_more(name):
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(*shape, requires_grad=True)
    relu = _saved_bytes(model, x)
    fused = _saved_bytes(sugarize.sugarize(model), x)
    apart = _saved_bytes(sugarize.sugarize(model, fuse_linear=False), x)
    if name == "mlp":
        assert fused == relu  # x where ReLU keeps relu(x): the same size
    else:
        assert fused < relu  # gate(h) and up(h), where ReLU keeps relu(gate(h)), up(h) and their product
    assert apart > relu  # the negative control: the unfused op keeps x (or s'(x)) and the Linear relu(x)


def test_strip_gives_back_the_original_graph_op_for_op_and_its_values():
    for build, shape in MODELS.values():
        model = build()
        stripped = sugarize.strip(sugarize.sugarize(model))
        # the graph the unfused conversion strips to (a module ReLU comes back as F.relu, as ever),
        # node for node, name for name, in the original's order
        apart = sugarize.strip(sugarize.sugarize(model, fuse_linear=False))
        assert [(n.op, n.name, str(n.target), str(n.args)) for n in stripped.graph.nodes] == \
               [(n.op, n.name, str(n.target), str(n.args)) for n in apart.graph.nodes]
        original = torch.fx.symbolic_trace(model)
        assert [n.name for n in stripped.graph.nodes] == [n.name for n in original.graph.nodes]
        x = torch.randn(*shape)
        assert same_bits(stripped(x), model(x))


def test_a_hooked_linear_falls_back_to_the_unfused_calls_and_runs_its_hook():
    model = MLP()
    fused = sugarize.sugarize(model)
    apart = sugarize.sugarize(model, fuse_linear=False)
    calls = []
    fused.get_submodule("fc.1").register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    x = torch.randn(6, 12)
    y1, g1 = _grads(fused, x)
    y2, g2 = _grads(apart, x)
    assert calls == [torch.Size([6, 32])]  # the hook saw relu(x): the Linear was called as a module
    assert same_bits(y1, y2) and all(_rel(g1[k], g2[k]) <= 1e-6 for k in g2)
    with torch.no_grad():
        assert same_bits(fused(x), apart(x))


def test_lora_swapped_in_after_conversion_runs_unfused_with_equal_gradients():
    peft = pytest.importorskip("peft")
    model = GLU()
    config = dict(r=4, lora_alpha=8, target_modules=["down"], init_lora_weights=False)
    torch.manual_seed(0)
    fused = peft.get_peft_model(sugarize.sugarize(model), peft.LoraConfig(**config))
    torch.manual_seed(0)
    apart = peft.get_peft_model(sugarize.sugarize(model, fuse_linear=False), peft.LoraConfig(**config))
    x = torch.randn(3, 5, 12)
    y1, g1 = _grads(fused, x)
    y2, g2 = _grads(apart, x)
    assert any("lora_A" in k for k in g1) and set(g1) == set(g2)
    assert same_bits(y1, y2)
    for key in g2:
        if g2[key] is not None:
            assert _rel(g1[key], g2[key]) <= 1e-6, key
    # LoRA applied first: the model no longer traces (peft's layers iterate over their adapters),
    # the module path converts it, the GLU traces with its submodules as leaves, and the site feeds
    # the LoRA wrapper with its output rebuilt
    wrapped = peft.get_peft_model(GLU(), peft.LoraConfig(**config))
    sm = sugarize.sugarize(wrapped)
    sites = sugarize.report_of(sm).sites
    assert [s.fused for s in sites] == ["mul + peft Linear (output rebuilt)"]
    assert _rel(_grads(sm, x)[1]["input"], _grads(sugarize.sugarize(wrapped, fuse_linear=False), x)[1]["input"]) == 0


def _llama(hidden=32, inter=64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   use_cache=False, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg)


def _hf_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_a_relufied_llama_gets_fused_mlps_with_the_unfused_gradients_and_less_kept():
    """The whole model does not trace; each MLP does, alone, and is fused with its down projection."""
    model = _llama()
    ids = torch.randint(0, 64, (2, 12))
    fused = sugarize.sugarize(model, relufy=("silu",))
    apart = sugarize.sugarize(model, relufy=("silu",), fuse_linear=False)
    report = sugarize.report_of(fused)
    assert report.capture == "modules" and [s.fused for s in report.sites] == ["mul + Linear"] * 2
    assert [s.unfused for s in sugarize.report_of(apart).sites] == ["", ""]
    assert all(islands.is_island(layer.mlp) for layer in fused.model.layers)
    assert sorted(fused.state_dict()) == sorted(model.state_dict()) and sugarize.count_sugar(fused) == 2
    y1, g1 = _hf_grads(fused, ids)
    y2, g2 = _hf_grads(apart, ids)
    assert same_bits(y1, y2)
    for key in g2:
        assert _rel(g1[key], g2[key]) <= 1e-5, key
    relu_bytes = _saved_bytes(_relu_llama(model), ids)
    assert _saved_bytes(fused, ids) < relu_bytes < _saved_bytes(apart, ids)  # the unfused op: the negative control


def _relu_llama(model):
    import copy

    relu = copy.deepcopy(model)
    for layer in relu.model.layers:
        layer.mlp.act_fn = nn.ReLU()
    return relu


def test_an_island_is_audited_and_stripped_as_the_module_it_replaced():
    model = _llama()
    ids = torch.randint(0, 64, (2, 12))
    fused = sugarize.sugarize(model, relufy=("silu",))
    apart = sugarize.sugarize(model, relufy=("silu",), fuse_linear=False)
    got, want = sugarize.audit(fused, [(ids,)]), sugarize.audit(apart, [(ids,)])
    assert [(s.path, s.dead, s.units) for s in got.sites] == [(s.path, s.dead, s.units) for s in want.sites]
    assert len(got.sites) == 2 and all(islands.is_island(layer.mlp) for layer in fused.model.layers)  # still fused
    plain = sugarize.strip(fused)
    assert [type(layer.mlp).__name__ for layer in plain.model.layers] == ["LlamaMLP"] * 2
    assert [type(layer.mlp.act_fn) for layer in plain.model.layers] == [nn.ReLU] * 2
    assert sugarize.count_sugar(plain) == 0 and not any(isinstance(m, torch.fx.GraphModule) for m in plain.modules())
    with torch.no_grad():
        assert same_bits(plain(ids).logits, _relu_llama(model)(ids).logits)


@pytest.mark.parametrize("name", ["mlp", "glu"])
def test_compiled_fused_sites_match_eager_and_keep_what_compiled_relu_keeps(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    fused = sugarize.sugarize(model)
    x = torch.randn(*shape)
    y1, g1 = _grads(fused, x)
    torch._dynamo.reset()
    compiled = torch.compile(fused)
    y2, g2 = _grads(compiled, x)
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-6)
    for key in g1:
        assert _rel(g2[key], g1[key]) <= 1e-5, key
    xg = x.clone().requires_grad_(True)
    relu = _saved_bytes(torch.compile(model), xg)
    got = _saved_bytes(compiled, xg)
    apart = _saved_bytes(torch.compile(sugarize.sugarize(model, fuse_linear=False)), xg)
    if name == "mlp":
        assert got == relu
        assert apart > relu  # the negative control: unfused, the compiled op keeps x beside relu(x)
    else:  # compiled, the unfused gated MLP keeps what ReLU keeps; fused, one tensor less
        assert got < relu == apart

"""ReLU's memory at every consumer of a SUGAR site (#37): a LoRA wrapper (before or after conversion,
dropout 0 and 0.05), a Conv, autocast and gradient checkpointing keep no more than the ReLU model,
with the unfused op's gradients. Each has the unfused op (fuse_linear=False) as its negative control:
it keeps more than ReLU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sugarize

from helpers import LLAMA_LINEARS, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LINEARS = LLAMA_LINEARS
IDS = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))


def _llama():
    return tiny_llama(intermediate=256, positions=64)


def _relu(model):
    relu = copy.deepcopy(model)
    for layer in relu.model.layers:
        layer.mlp.act_fn = nn.ReLU()
    return relu


def _lora(model, dropout):
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS,
                                                      lora_dropout=dropout, init_lora_weights=False))


def saved_bytes(model, **inputs) -> int:
    """Unique storages autograd keeps (parameters and inputs left out): the test's own counter."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in inputs.values()}
    del out
    return sum(v for k, v in seen.items() if k not in skip)


def _grads(model, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _builds(order, dropout):
    """(default, unfused op, ReLU reference) with the same weights and LoRA."""
    if order == "after":
        made = [_lora(sugarize.sugarize(_llama(), relufy=("silu",), **kw), dropout)
                for kw in ({}, {"fuse_linear": False})]
    else:
        made = [sugarize.sugarize(_lora(_llama(), dropout), relufy=("silu",), **kw) for kw in ({}, {"fuse_linear": False})]
    return made[0], made[1], _lora(_relu(_llama()), dropout)


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_lora_keeps_relus_bytes_with_the_unfused_gradients(order, dropout):
    fused, unfused, relu = _builds(order, dropout)
    for m in (fused, unfused, relu):
        m.train()
    want = saved_bytes(relu, input_ids=IDS)
    assert saved_bytes(fused, input_ids=IDS) <= want < saved_bytes(unfused, input_ids=IDS)
    y1, g1 = _grads(fused)
    y2, g2 = _grads(unfused)
    assert torch.equal(y1, y2) and set(g1) == set(g2) and any("lora_A" in k for k in g1)
    for key in g2:
        assert _rel(g1[key], g2[key]) <= 1e-6, key
    # the library's own measure agrees with the test's
    report = sugarize.memory_report(fused, input_ids=IDS)
    assert report.ratio <= 1.0 and any("mlp" in r.module and r.sites for r in report.rows)


def test_bf16_autocast_keeps_relus_bytes_with_the_unfused_gradients():
    fused = sugarize.sugarize(_llama(), relufy=("silu",))
    unfused = sugarize.sugarize(_llama(), relufy=("silu",), fuse_linear=False)
    relu = _relu(_llama())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = saved_bytes(relu, input_ids=IDS)
        assert saved_bytes(fused, input_ids=IDS) <= want < saved_bytes(unfused, input_ids=IDS)
        y1, g1 = _grads(fused)
        y2, g2 = _grads(unfused)
    assert torch.equal(y1, y2)
    for key in g2:
        assert _rel(g1[key], g2[key]) <= 1e-6, key


def test_gradient_checkpointing_composes_with_the_rebuild():
    """The site's hooks hand every tensor on to checkpointing's: same gradients, nothing kept inside."""
    fused = sugarize.sugarize(_lora(_llama(), 0.0), relufy=("silu",))
    unfused = sugarize.sugarize(_lora(_llama(), 0.0), relufy=("silu",), fuse_linear=False)
    relu = _lora(_relu(_llama()), 0.0)
    for m in (fused, unfused, relu):
        m.train()
        m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert saved_bytes(fused, input_ids=IDS) <= saved_bytes(relu, input_ids=IDS)
    y1, g1 = _grads(fused)
    y2, g2 = _grads(unfused)
    assert torch.equal(y1, y2)
    for key in g2:
        assert _rel(g1[key], g2[key]) <= 1e-6, key


class _VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.c2, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.pool, self.head = nn.MaxPool2d(2), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.pool(self.a2(self.c2(self.a1(self.c1(x))))))


def test_a_conv_or_pooling_consumer_keeps_relus_bytes_with_the_unfused_gradients():
    model = _VGG()
    fused, unfused = sugarize.sugarize(model), sugarize.sugarize(model, fuse_linear=False)
    assert [s.fused for s in sugarize.report_of(fused).sites] == ["Conv2d (output rebuilt)",
                                                                   "MaxPool2d (output rebuilt)"]
    x = torch.randn(4, 3, 16, 16)
    want = saved_bytes(model, x=x)
    assert saved_bytes(fused, x=x) <= want < saved_bytes(unfused, x=x)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for m, xi in zip((fused, unfused), xs):
        m(xi).square().sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)
    for (n, p), (_, q) in zip(fused.named_parameters(), unfused.named_parameters()):
        assert _rel(p.grad, q.grad) <= 1e-6, n


def test_a_site_reported_fused_that_runs_unfused_says_so_once_naming_itself():
    """A DTensor-like subclass input cannot keep x alone: the site says so once, and memory_report shows it."""
    sm = sugarize.sugarize(_llama(), relufy=("silu",))
    from sugarize.method import fused_linear

    fused_linear._SAID.clear()
    mlp = sm.model.layers[0].mlp

    class Sub(torch.Tensor):
        pass

    h = torch.randn(2, 8, 32).as_subclass(Sub).requires_grad_()
    with pytest.warns(sugarize.SugarizeWarning, match=r"model\.layers\.0\.mlp\.act_fn .*runs unfused") as said:
        mlp(h)
        mlp(h)
    assert len([w for w in said if issubclass(w.category, sugarize.SugarizeWarning)]) == 1

"""Strip keeps what was trained: LoRA (PEFT) and a user's own wrapper swapped in after conversion,
the order people use (relufy, get_peft_model, train, strip, merge)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sugarize
from sugarize.passes import islands

from helpers import LLAMA_LINEARS, same_bits, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LINEARS = LLAMA_LINEARS


def _llama():
    return tiny_llama()


def _lora(model, dropout=0.0):
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS,
                                                      lora_dropout=dropout, init_lora_weights=False))


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _train_one_step(model):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    model.eval()
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(same_bits(a[k], b[k]) for k in a)


def _relu_llama():
    relu = _llama()
    for layer in relu.model.layers:
        layer.mlp.act_fn = nn.ReLU()
    return relu


@pytest.fixture
def old_restore(monkeypatch):
    """The negative control: strip as it was, putting back the submodule kept aside at conversion."""
    monkeypatch.setattr(islands, "_synced", lambda path, gm: gm.meta["sugarize"][islands.KEY])


@pytest.mark.parametrize("order", ["relufy-then-lora", "lora-then-relufy"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_strip_keeps_every_lora_adapter_and_the_logits(order, dropout):
    if order == "relufy-then-lora":
        trained = _lora(sugarize.sugarize(_llama(), relufy=("silu",)), dropout)
        assert all(islands.is_island(layer.mlp) for layer in trained.base_model.model.model.layers)  # fused MLPs
    else:
        trained = sugarize.sugarize(_lora(_llama(), dropout), relufy=("silu",))
    _train_one_step(trained)
    state, logits = _state(trained), _logits(trained)
    assert sum("lora_A" in k for k in state) == 2 * len(LINEARS)
    plain = sugarize.strip(trained)
    assert sugarize.count_sugar(plain) == 0 and not any(isinstance(m, torch.fx.GraphModule) for m in plain.modules())
    assert _same_state(_state(plain), state)
    assert same_bits(_logits(plain), logits)
    # merged after strip = the ReLU model with the same LoRA weights, merged
    reference = _lora(_relu_llama(), dropout)
    reference.load_state_dict(state)
    merged, want = plain.merge_and_unload(), reference.merge_and_unload()
    assert _same_state(_state(merged), _state(want))
    assert torch.equal(_logits(merged), _logits(want))
    assert not any("lora" in k for k in merged.state_dict())


def test_the_old_strip_loses_the_mlp_adapters(old_restore):
    """Negative control: without carrying the swapped modules back, the MLP adapters are gone."""
    trained = _train_one_step(_lora(sugarize.sugarize(_llama(), relufy=("silu",))))
    state, logits = _state(trained), _logits(trained)
    plain = sugarize.strip(trained)
    lost = sorted(set(state) - set(plain.state_dict()))
    assert any("mlp.down_proj.lora_A" in k for k in lost) and not _same_state(_state(plain), state)
    assert not torch.equal(_logits(plain), logits)


class Scaled(nn.Module):
    """A user's own wrapper: the wrapped layer's output times a trained scale."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.inner(x) * self.scale


def _wrapped_after_conversion():
    sm = sugarize.sugarize(_llama(), relufy=("silu",))
    for layer in sm.model.layers:
        layer.mlp.down_proj = Scaled(layer.mlp.down_proj)
    return _train_one_step(sm)


def test_a_users_wrapper_swapped_in_after_conversion_survives_strip_strip_and_audit():
    trained = _wrapped_after_conversion()
    state, logits = _state(trained), _logits(trained)
    assert "model.layers.0.mlp.down_proj.scale" in state
    audit = sugarize.audit(trained, [(IDS,)])
    assert len(audit.sites) == 2 and _same_state(_state(trained), state)  # the audit's view left it whole
    for plain in (sugarize.strip(trained), sugarize.strip(trained, copy=False)):
        assert [type(layer.mlp.down_proj) for layer in plain.model.layers] == [Scaled] * 2
        assert _same_state(_state(plain), state) and same_bits(_logits(plain), logits)


def test_the_old_strip_drops_a_users_wrapper(old_restore):
    trained = _wrapped_after_conversion()
    plain = sugarize.strip(trained)
    assert "model.layers.0.mlp.down_proj.scale" not in plain.state_dict()


def test_a_tensor_added_to_the_fused_graph_itself_is_refused_naming_it():
    sm = sugarize.sugarize(_llama(), relufy=("silu",))
    sm.model.layers[1].mlp.register_parameter("extra", nn.Parameter(torch.ones(3)))
    before = copy.deepcopy(sm.state_dict())
    with pytest.raises(sugarize.StripRefusedError, match=r"model\.layers\.1\.mlp\.extra") as err:
        sugarize.strip(sm, copy=False)
    assert err.value.exit_code == 2
    assert islands.is_island(sm.model.layers[1].mlp) and _same_state(_state(sm), before)  # nothing changed


def test_the_readme_lora_workflow_end_to_end(tmp_path):
    """relufy, LoRA, train, strip, merge, export, verify: what the README's fine-tuning section shows."""
    import onnx

    model = sugarize.sugarize(_llama(), relufy=("silu",))                       # relufy: SiLU -> ReLU + SUGAR
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=LINEARS))  # LoRA on every Linear
    _train_one_step(model)                                                      # train (the user's loop)
    trained = _logits(model)
    merged = sugarize.strip(model).merge_and_unload()                            # strip, then merge
    assert same_bits(_logits(merged), trained) or torch.allclose(_logits(merged), trained, atol=1e-5)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.hidden_act == "relu"
    result = sugarize.export_onnx(merged, tmp_path / "llama.onnx", (IDS,))       # export
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "Relu" in ops and not any("lora" in i.name for i in onnx.load(str(result.path)).graph.initializer)
    report = sugarize.verify(result.path, merged, (IDS,))                       # verify in onnxruntime
    assert report.passed

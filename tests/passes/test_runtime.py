"""The runtime path (untraceable models): include, exclude and relufy by module path, as on the
fx path; inspect without inputs; Hugging Face causal language models relufied."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sugarize

from helpers import FGI, load_fixture, same_bits

ZOO = load_fixture("zoo")


def _grads(model, args):
    model.zero_grad(set_to_none=True)
    out = model(*args)
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.float().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_include_selects_the_module_sites_of_an_untraceable_model():
    model, args, _ = ZOO.build("data_dependent")
    sm = sugarize.sugarize(model, include=["relu"], example_args=args)
    report = sugarize.report_of(sm)
    assert report.capture == "modules"
    assert {(s.path, s.status) for s in report.sites} == {("relu", "converted"), ("", "skipped")}
    assert report.runtime["converted_calls"] == 1 and report.runtime["unconverted_calls"] >= 1
    assert same_bits(sm(*args), model(*args))
    reference = copy.deepcopy(model)
    reference.relu = FGI()  # the selected module, by hand; the functional ReLUs stay ReLU
    got, want = _grads(sm, args), _grads(reference, args)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_exclude_leaves_the_excluded_module_calls_as_relu():
    model, args, _ = ZOO.build("data_dependent")
    sm = sugarize.sugarize(model, exclude=["relu"], example_args=args)
    report = sugarize.report_of(sm)
    assert [s.status for s in report.sites if s.path == "relu"] == ["skipped"]
    assert report.runtime["unconverted_sites"] == ["relu: nn.ReLU(inplace=True) x1"]
    assert same_bits(sm(*args), model(*args))


def _bert(transformers):
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_act="relu", max_position_embeddings=32)).eval()


def test_bert_layer_selection_by_module_path():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _bert(transformers)
    ids = torch.randint(0, 100, (2, 10))
    sm = sugarize.sugarize(model, include=["encoder.layer.0.*"], example_args=(ids,))
    report = sugarize.report_of(sm)
    assert report.runtime["converted_calls"] == 1 and report.runtime["relu_calls"] == 2
    assert same_bits(sm(ids).last_hidden_state, model(ids).last_hidden_state)
    reference = copy.deepcopy(model)
    reference.encoder.layer[0].intermediate.intermediate_act_fn = FGI()
    got, want = _grads(sm, (ids,)), _grads(reference, (ids,))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_inspect_lists_activation_modules_without_inputs():
    transformers = pytest.importorskip("transformers")
    report = sugarize.inspect(_bert(transformers))
    assert report.capture == "modules" and report.notes == [
        n for n in report.notes if "functional" not in n]  # BERT's forwards call no activation function
    assert [(s.path, s.spelling, s.status) for s in report.sites] == [
        (f"encoder.layer.{i}.intermediate.intermediate_act_fn", "nn.ReLU", "convertible") for i in range(2)]


def _llama(transformers):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   use_cache=False)  # no KV-cache object in the outputs: it does not export
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(transformers):
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _by_hand(model, attribute_path: str, make):
    """A copy of ``model`` whose every MLP activation (``attribute_path`` under each layer) is ``make()``."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if name.endswith(attribute_path):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent), leaf, make())
    return out


@pytest.mark.parametrize(("family", "relufy", "act"), [("llama", "silu", "mlp.act_fn"), ("gpt2", "gelu", "mlp.act")])
def test_causal_lms_relufy_forward_relu_backward_the_activations_own_derivative(tmp_path, family, relufy, act):
    """Llama's SiLU (gated MLP) and GPT-2's gelu_new (NewGELUActivation, converted whole): the
    forward equals the model relufied by hand bit for bit, the gradient that of the activation's
    own derivative; strip then ONNX export is the relufied-by-hand graph and passes parity."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = {"llama": _llama, "gpt2": _gpt2}[family](transformers)
    ids = torch.randint(0, 64, (2, 12))
    sm = sugarize.sugarize(model, relufy=(relufy,), example_args=(ids,))
    report = sugarize.report_of(sm)
    assert report.capture == "modules"
    converted = [s for s in report.sites if s.status == "converted"]
    assert len(converted) == 2 and all(s.forward_changed for s in converted), report
    relu_model = _by_hand(model, act, nn.ReLU)
    assert same_bits(sm(ids).logits, relu_model(ids).logits)
    surrogate = "silu" if relufy == "silu" else "gelu_tanh"
    reference = _by_hand(model, act, lambda: FGI(surrogate))
    got, want = _grads(sm, (ids,)), _grads(reference, (ids,))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    # one fine-tuning step, then strip and export: the relufied-by-hand graph, with parity
    opt = torch.optim.SGD(sm.parameters(), lr=1e-2)
    F.cross_entropy(sm(ids).logits.flatten(0, 1), ids.flatten()).backward()
    opt.step()
    relu_model.load_state_dict(sm.state_dict())
    plain = sugarize.strip(sm)
    res = sugarize.export_onnx(plain, tmp_path / "lm.onnx", (ids,))
    ref = sugarize.export_onnx(relu_model, tmp_path / "lm.ref.onnx", (ids,))
    assert res.op_types.count("Relu") == ref.op_types.count("Relu") == 2
    report = sugarize.verify(res.path, relu_model, (ids,), stripped=plain, reference_artifact=ref.path, batches=1,
                             atol=1e-4, rtol=1e-4)
    assert report.passed, report.summary()

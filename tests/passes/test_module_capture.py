"""Module capture as users get it: Hugging Face models and data-dependent models, read back from
what the user holds (a reloaded model's logits, the hooks and classes left on a module, compiled
gradients, two threads at once)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sugarize
from sugarize.passes import islands

from helpers import FGI, ROOT, fgi, load_fixture, same_bits

transformers = pytest.importorskip("transformers")
ZOO = load_fixture("zoo")


def _llama(**extra):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, **extra)
    return transformers.LlamaForCausalLM(cfg).eval()  # the default config: use_cache=True


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_act="relu", max_position_embeddings=32)).eval()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _grads(model, args):
    model.zero_grad(set_to_none=True)
    _logits(model(*args)).float().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _set(model, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _hooks(module: nn.Module) -> int:
    return sum(len(getattr(module, name)) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
        "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"))


def _no_sugarize_left(model: nn.Module) -> None:
    """No module of a sugarize class, no hook, and nothing but plain data from sugarize anywhere."""
    for path, module in model.named_modules():
        assert not type(module).__module__.startswith("sugarize"), (path, type(module))
        assert _hooks(module) == 0, path
        for name, value in vars(module).items():
            if name == "meta":
                json.dumps(value.get("sugarize", {}))  # the strip report, as plain data
                continue
            assert not type(value).__module__.startswith("sugarize"), (path, name, type(value))


_FRESH = [sys.executable, "-c"]
_NO_SUGARIZE = "import sys; sys.modules['sugarize'] = None  # any import of sugarize fails\n"


def _fresh(code: str) -> str:
    """Runs ``code`` in a fresh interpreter that cannot import sugarize; returns its stdout."""
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(_FRESH + [_NO_SUGARIZE + code], capture_output=True, text=True, env=env, cwd=ROOT / "tests",
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_stripped_relufied_llama_reloads_with_from_pretrained_as_a_relu_model(tmp_path):
    """save_pretrained -> LlamaForCausalLM.from_pretrained in an interpreter that never imports
    sugarize: the config says relu and the logits are the stripped model's, bit for bit."""
    model = _llama()
    ids = torch.randint(0, 64, (2, 12))
    sm = sugarize.sugarize(model, relufy=("silu",))
    assert model.config.hidden_act == "silu"
    # each MLP traced on its own and fused with its down projection (#31): strip must undo that too
    assert [s.fused for s in sugarize.report_of(sm).sites] == ["mul + Linear"] * 2
    assert all(islands.is_island(layer.mlp) for layer in sm.model.layers)
    opt = torch.optim.SGD(sm.parameters(), lr=0.05)  # a fine-tuning step, so the weights are new
    sm.train()
    sm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    plain = sugarize.strip(sm.eval())
    _no_sugarize_left(plain)
    assert plain.config.hidden_act == "relu" and sm.config.hidden_act == "silu"  # the SUGAR model keeps its own
    assert model.config.hidden_act == "silu"  # and the user's model too
    plain.save_pretrained(tmp_path / "ckpt")
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = plain(ids).logits
    torch.save(want, tmp_path / "want.pt")
    printed = _fresh(f"""
import torch, transformers
m = transformers.LlamaForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
with torch.no_grad():
    got = m(ids).logits
print(m.config.hidden_act, type(m.model.layers[0].mlp.act_fn).__name__, torch.equal(got, want))
""")
    assert printed.split() == ["relu", "ReLU", "True"], printed


@pytest.mark.parametrize("case", ["llama_relufied", "bert_default", "data_dependent_functional"])
def test_a_stripped_model_holds_no_sugarize_class_or_hook_and_unpickles_without_sugarize(tmp_path, case):
    if case == "llama_relufied":
        model, args = _llama(), (torch.randint(0, 64, (2, 12)),)
        sm = sugarize.sugarize(model, relufy=("silu",))
    elif case == "bert_default":
        model, args = _bert(), (torch.randint(0, 100, (2, 10)),)
        sm = sugarize.sugarize(model)
    else:
        model, args, _ = ZOO.build("data_dependent")
        sm = sugarize.sugarize(model, example_args=args)
        assert {s.capture for s in sugarize.report_of(sm).sites} == {"modules", "calls"}
    assert sugarize.report_of(sm).capture == "modules" and type(sm) is type(model)
    plain = sugarize.strip(sm)
    _no_sugarize_left(plain)
    report = sugarize.report_of(plain)  # the strip report, read from the stripped model
    assert report.sites and {s.status for s in report.sites} == {"stripped"}
    with torch.no_grad():
        assert same_bits(_logits(plain(*args)), _logits(sm(*args)))
    if case != "llama_relufied":
        with torch.no_grad():
            assert same_bits(_logits(plain(*args)), _logits(model(*args)))
    if case == "data_dependent_functional":
        return  # its class lives in a fixture file loaded by path: not importable by name elsewhere
    torch.save(plain, tmp_path / "whole.pt")  # the whole module pickled: any sugarize class would be in it
    torch.save(args, tmp_path / "args.pt")
    torch.save(_logits(plain(*args)).detach(), tmp_path / "want.pt")
    printed = _fresh(f"""
import torch, transformers
m = torch.load({str(tmp_path / 'whole.pt')!r}, weights_only=False)
args = torch.load({str(tmp_path / 'args.pt')!r}, weights_only=True)
want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
with torch.no_grad():
    out = m(*args)
got = out.logits if hasattr(out, 'logits') else out.last_hidden_state
print(torch.equal(got, want))
""")
    assert printed.split() == ["True"], printed


def test_relufying_only_some_sites_of_a_config_field_warns_and_keeps_the_field():
    model = _llama()
    sm = sugarize.sugarize(model, relufy=("silu",), include=["model.layers.0.*"])
    with pytest.warns(sugarize.SugarizeWarning, match=r"hidden_act='silu' governs 2 sites but only 1 were relufied"):
        plain = sugarize.strip(sm)
    assert plain.config.hidden_act == "silu"
    assert type(plain.model.layers[0].mlp.act_fn) is nn.ReLU
    assert type(plain.model.layers[1].mlp.act_fn) is type(model.model.layers[1].mlp.act_fn)


def _llama_reference(model, include_layer0_only: bool):
    ref = copy.deepcopy(model)
    for i, layer in enumerate(ref.model.layers):
        if i == 0 or not include_layer0_only:
            layer.mlp.act_fn = FGI("silu")
    return ref


class _DataDependentReference(nn.Module):
    """The zoo's DataDependent by hand, with exclude=["relu"]: its nn.ReLU stays ReLU and every
    functional ReLU is SUGAR (forward gradient injection)."""

    def __init__(self, model):
        super().__init__()
        self.a, self.b, self.relu = model.a, model.b, model.relu

    def forward(self, x):
        h = self.relu(self.a(x))
        h = fgi(self.b(h)) if h.mean() > 0.1 else fgi(self.b(-h))
        out = self.a(h)
        return fgi(out) if out.sum() > 0 else out


@pytest.mark.parametrize("case", ["llama_include_relufy", "bert_default", "data_dependent_exclude"])
def test_compiled_with_options_the_gradients_equal_eager_and_a_hand_built_reference(case):
    """torch.compile on every capture: with include/relufy on a Hugging Face model (fullgraph=True,
    as the original compiles), with the defaults on BERT, and with exclude on a model whose
    functional calls are caught at run time (graph breaks: its control flow depends on values)."""
    if case == "llama_include_relufy":
        model, args = _llama(use_cache=False), (torch.randint(0, 64, (2, 12)),)
        sm = sugarize.sugarize(model, relufy=("silu",), include=["model.layers.0.*"])
        reference, fullgraph, backend = _llama_reference(model, True), True, "inductor"
    elif case == "bert_default":
        model, args = _bert(), (torch.randint(0, 100, (2, 10)),)
        sm = sugarize.sugarize(model)
        reference, fullgraph, backend = copy.deepcopy(model), True, "aot_eager"
        for layer in reference.encoder.layer:
            layer.intermediate.intermediate_act_fn = FGI()
    else:
        model, args, _ = ZOO.build("data_dependent")
        sm = sugarize.sugarize(model, exclude=["relu"])
        reference = _DataDependentReference(copy.deepcopy(model))
        fullgraph, backend = False, "aot_eager"
    assert sugarize.report_of(sm).capture == "modules"
    eager = _grads(sm, args)
    want = _grads(reference, args)
    compiled = torch.compile(sm, fullgraph=fullgraph, backend=backend)
    sm.zero_grad(set_to_none=True)
    _logits(compiled(*args)).float().square().mean().backward()
    got = {n: p.grad.clone() for n, p in sm.named_parameters() if p.grad is not None}
    assert set(eager) == set(want) and set(want) <= set(got)
    assert all(not got[k].any() for k in set(got) - set(want))  # compiled: zeros for the unused pooler
    for k in want:
        torch.testing.assert_close(eager[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(got[k], eager[k], rtol=1e-4, atol=1e-6, msg=k)
    torch._dynamo.reset()


def test_audit_and_finetune_a_hugging_face_model():
    from sugarize.training.train import DataSpec, finetune

    model = _llama(use_cache=False)
    sm = sugarize.sugarize(model, relufy=("silu",))
    data = [(torch.randint(0, 64, (4, 12)), torch.randint(0, 64, (4, 12))) for _ in range(3)]
    report = sugarize.audit(sm, data)
    paths = [s.path for s in report.sites]
    assert paths == [f"model.layers.{i}.mlp.act_fn" for i in range(2)] and report.samples == 12
    assert all(s.units == 64 and s.spelling == "SUGAR silu" for s in report.sites)
    # what the audit says, by hand: the gate projection's output, positive anywhere per sample
    gates = []
    handle = sm.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, a, o: gates.append(o.detach()))
    with torch.no_grad():
        for x, _ in data:
            sm(x)
    handle.remove()
    fires = sum((g > 0).flatten(1, -2).any(1).sum(0) for g in gates)
    assert report.sites[0].fire_counts == fires.tolist()
    assert not sm._forward_hooks and not sm.model.layers[0].mlp._forward_hooks  # the audit left nothing

    def loss(out, y):
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    before = {k: v.clone() for k, v in sm.state_dict().items()}
    history = finetune(sm, DataSpec(lambda: data, lambda: data, loss), epochs=1, lr=0.05)
    assert len(history) == 1 and history[0].dead_fraction is not None
    assert any(not torch.equal(before[k], v) for k, v in sm.state_dict().items())


def _threads_compute_their_own(models, args, rounds: int = 12):
    """Each model run alone, then all at once in threads, many times: the same outputs and grads."""
    alone = []
    for m in models:
        out = _logits(m(*args))
        alone.append((out.detach().clone(), _grads(m, args)))
    errors, results = [], [[] for _ in models]

    def work(i):
        try:
            m = models[i]
            for _ in range(rounds):
                m.zero_grad(set_to_none=True)
                out = _logits(m(*args))
                out.float().square().mean().backward()
                results[i].append((out.detach().clone(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                          if p.grad is not None}))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, runs in enumerate(results):
        for out, grads in runs:
            assert same_bits(out, alone[i][0])
            assert grads.keys() == alone[i][1].keys() and all(torch.equal(grads[k], alone[i][1][k]) for k in grads)


def test_two_models_converted_differently_run_in_two_threads_each_compute_their_own():
    """Before, process-wide module hooks mixed the two models' module paths (4 of 29 runs gave
    other numbers, one a TypeError). The call catchers are each model's own, per thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests' own threads interleave; torch's intra-op pool stays out of it
    try:
        model, args, _ = ZOO.build("data_dependent")
        a = sugarize.sugarize(model, include=["relu"])       # the module only; functional calls stay ReLU
        b = sugarize.sugarize(model, "nelu", exclude=["relu"], alpha=0.5)  # the functional calls only
        assert not same_bits(_grads(a, args)["b.weight"], _grads(b, args)["b.weight"])
        _threads_compute_their_own([a, b], args, rounds=30)  # the old hooks gave other numbers in 4 of 60 runs
        llama = _llama(use_cache=False)
        ids = (torch.randint(0, 64, (2, 12)),)
        _threads_compute_their_own([sugarize.sugarize(llama, relufy=("silu",)),
                                    sugarize.sugarize(llama, config=sugarize.SugarConfig(
                                        "nelu", relufy=("silu",), relufy_surrogate="bsilu"))],
                                   ids, rounds=4)
    finally:
        torch.set_num_threads(threads)


def test_a_causal_lm_with_its_default_config_exports_without_the_kv_cache(tmp_path):
    """use_cache=True returns a DynamicCache no graph can hold: export turns it off for the export
    (as optimum's no-past export does), says so, gives the config back, and parity holds."""
    model = _llama()
    assert model.config.use_cache is True
    ids = torch.randint(0, 64, (2, 12))
    sm = sugarize.sugarize(model, relufy=("silu",))
    plain = sugarize.strip(sm)
    res = sugarize.export_onnx(sm, tmp_path / "lm.onnx", (ids,))
    assert any("without the KV cache" in n for n in res.notes) and res.op_types.count("Relu") == 2
    assert sm.config.use_cache is True and model.config.use_cache is True
    report = sugarize.verify(res.path, plain, (ids,), stripped=plain, batches=2, atol=1e-4, rtol=1e-4)
    assert report.passed, report.summary()
    assert plain.config.use_cache is True


def test_an_export_that_cannot_capture_names_the_real_cause():
    from sugarize.deploy.export import _export_failure

    try:
        torch.onnx.export(_llama(), (torch.randint(0, 64, (2, 12)),), dynamo=True)
    except Exception as exc:  # noqa: BLE001 - what torch raises for the KV-cache object
        message = _export_failure(exc)
    assert "DynamicCache" in message and "value-dependent" not in message, message


def test_copy_false_on_the_module_path_shares_weights_and_never_changes_the_model():
    model = _llama(use_cache=False)
    sm = sugarize.sugarize(model, relufy=("silu",), copy=False)
    assert type(model.model.layers[0].mlp.act_fn).__name__ == "SiLUActivation" and not hasattr(model, "meta")
    assert all(_hooks(m) == 0 for m in model.modules())
    assert sm.model.embed_tokens.weight is model.model.embed_tokens.weight
    plain = sugarize.strip(sm, copy=False)
    assert plain is sm and plain.config.hidden_act == "relu" and model.config.hidden_act == "silu"


def test_relufied_functional_calls_stay_relu_after_strip_with_a_warning_and_strip_is_idempotent():
    """A forward that calls F.gelu and does not trace: after strip its relufied calls compute ReLU
    only through a hook (no hook can turn a Python F.gelu call into ReLU otherwise); strip says
    so, and stripping again keeps it."""
    fix = load_fixture("gelu_silu_spellings")
    model = fix.build_model()
    relu_model = fix.build_model(relu=True)
    relu_model.load_state_dict(model.state_dict())
    x = torch.randn(8, 16) * 3
    sm = sugarize.sugarize(model, relufy=("gelu", "silu"), capture="modules")
    with pytest.warns(sugarize.SugarizeWarning, match=r"change those calls to F.relu"):
        plain = sugarize.strip(sm)
    assert same_bits(plain(x), relu_model(x)) and not sugarize.count_sugar(plain)
    again = sugarize.strip(plain)
    assert same_bits(again(x), relu_model(x))

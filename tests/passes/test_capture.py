"""Any model: capture paths, runtime ReLU call counts, and training engines on converted models."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import sugarize

from helpers import load_fixture, same_bits

ZOO = load_fixture("zoo")


def _flat(out):
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _loss(out):
    return sum(t.float().pow(2).mean() for t in _flat(out) if t.is_floating_point())


def _grads(model, args):
    model.zero_grad(set_to_none=True)
    _loss(model(*args)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(ZOO.ZOO))
def test_zoo_model_every_relu_call_converted_outputs_identical_gradient_reaches(name):
    model, args, _ = ZOO.build(name)
    sm = sugarize.sugarize(model, example_args=args)
    report = sm.meta["sugarize"]["report"]
    rt = report.runtime
    assert rt["relu_calls"] > 0 and rt["converted_calls"] == rt["relu_calls"] and rt["unconverted_calls"] == 0, rt
    assert report.capture == ("modules" if name == "data_dependent" else "fx")
    sm.eval()
    assert all(same_bits(a, b) for a, b in zip(_flat(sm(*args)), _flat(model(*args))))
    g_sugar, g_relu = _grads(sm, args), _grads(model, args)
    assert g_sugar.keys() == g_relu.keys()
    assert all(torch.isfinite(g).all() for g in g_sugar.values())
    # the surrogate reaches the weights: the paper's B-SiLU (the default gives ReLU's own gradient to
    # every unit that fires, which in these healthy models may be all of them)
    g_paper = _grads(sugarize.sugarize(model, "bsilu", example_args=args), args)
    assert any(not torch.equal(g_paper[k], g_relu[k]) for k in g_paper)
    assert list(sm.state_dict()) == list(model.state_dict())


def test_relu6_and_hardswish_are_left_alone():
    model, args, _ = ZOO.build("mobile_se_hardswish_relu6")
    report = sugarize.sugarize(model, example_args=args).meta["sugarize"]["report"]
    assert [(s.kind, s.status) for s in report.sites] == [("relu", "converted"), ("relu6", "skipped")]
    assert report.runtime["relu_calls"] == 1


@pytest.mark.parametrize("name", [n for n, (_, _, e) in ZOO.ZOO.items() if e])
def test_zoo_stripped_export_matches_the_original(name, tmp_path):
    from sugarize.deploy.export import export_onnx, onnx_op_types

    model, args, _ = ZOO.build(name)
    sm = sugarize.sugarize(model)
    orig = export_onnx(model, tmp_path / "orig.onnx", args)
    res = export_onnx(sm, tmp_path / "sugar.onnx", args)
    assert onnx_op_types(res.path) == onnx_op_types(orig.path)
    report = sugarize.verify(res.path, model, args, stripped=sugarize.strip(sm), reference_artifact=orig.path,
                             batches=1, structure=False)
    assert report.passed, report.summary()


def test_module_path_gradient_equals_the_graph_paths():
    from sugarize.passes.config import SugarConfig

    mod = load_fixture("tiny_resnet")
    model, args = mod.build_model(), mod.example_inputs()
    cfg = SugarConfig()
    graph, runtime = sugarize.sugarize(model, config=cfg), sugarize.sugarize(model, config=cfg, capture="modules")
    assert same_bits(runtime(*args), graph(*args))
    g1, g2 = _grads(graph, args), _grads(runtime, args)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-7)
    plain = sugarize.strip(runtime)
    assert type(plain) is type(model) and sugarize.count_sugar(plain) == 0
    assert same_bits(plain(*args), model(*args))


def test_untraceable_model_without_fallback_is_a_clear_error():
    model, args, _ = ZOO.build("data_dependent")
    with pytest.raises(sugarize.SugarizeError, match="cannot trace DataDependent"):
        sugarize.sugarize(model, capture="fx")


def test_unconverted_calls_are_named():
    model, args, _ = ZOO.build("relu_attention")
    sm = sugarize.sugarize(model, example_args=args, exclude=["ff.*"])
    report = sm.meta["sugarize"]["report"]
    assert report.runtime["unconverted_calls"] == 1 and report.runtime["unconverted"] == {"nn.ReLU": 1}
    assert report.runtime["unconverted_sites"] == ["ff.1: nn.ReLU x1"]
    assert any("NOT converted" in n and "ff.1: nn.ReLU x1" in n for n in report.notes)


HF = {
    "bert": lambda t: t.BertModel(t.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, hidden_act="relu",
                                               max_position_embeddings=64)),
    "opt": lambda t: t.OPTForCausalLM(t.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                  num_attention_heads=2, activation_function="relu",
                                                  max_position_embeddings=64, word_embed_proj_dim=32)),
    "t5_encoder": lambda t: t.T5EncoderModel(t.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                        num_heads=2, feed_forward_proj="relu")),
}


@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_relu_models(name):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    model = HF[name](transformers).eval()
    ids = torch.randint(0, 100, (2, 10))
    sm = sugarize.sugarize(model, example_args=(ids,))
    report = sm.meta["sugarize"]["report"]
    rt = report.runtime
    assert len(report.sites) == 2 and all(s.path and s.status == "converted" for s in report.sites)
    assert rt["relu_calls"] == 2 and rt["converted_calls"] == 2 and rt["unconverted_calls"] == 0
    out, ref = sm(ids), model(ids)
    assert type(out) is type(ref)  # ModelOutput dataclasses come back as such
    assert all(same_bits(a, b) for a, b in zip(_flat(out), _flat(ref)))
    # the surrogate reaches the weights: the paper's B-SiLU (the default gives every unit that fires
    # ReLU's own gradient, which here may be every unit)
    g_sugar, g_relu = _grads(sugarize.sugarize(model, "bsilu", example_args=(ids,)), (ids,)), _grads(model, (ids,))
    assert any(not torch.equal(g_sugar[k], g_relu[k]) for k in g_sugar)
    assert sugarize.count_sugar(sugarize.strip(sm)) == 0


# --- training engines -------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_converted_models_pickle_and_deepcopy():
    from sugarize.passes.strip import has_sugar

    x = torch.randn(8, 16)
    for sm in (sugarize.sugarize(_mlp()), sugarize.sugarize(ZOO.build("data_dependent")[0])):
        for clone in (copy.deepcopy(sm), pickle.loads(pickle.dumps(sm))):
            assert sugarize.count_sugar(clone) == sugarize.count_sugar(sm)  # graph nodes (0 on the runtime path)
            assert has_sugar(clone) and has_sugar(sm)
            args = (x,)
            assert same_bits(clone(*args), sm(*args))
            g1, g2 = _grads(clone, args), _grads(sm, args)
            assert all(torch.equal(g1[k], g2[k]) for k in g1)


@pytest.mark.parametrize("capture", ["fx", "modules"])
def test_trains_under_torch_compile_with_the_same_gradients(capture):
    sm = sugarize.sugarize(_mlp(), capture=capture)
    x = torch.randn(8, 16)
    eager = _grads(sm, (x,))
    compiled = torch.compile(sm)
    sm.zero_grad(set_to_none=True)
    _loss(compiled(x)).backward()
    got = {n: p.grad for n, p in sm.named_parameters()}
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-6)


def test_trains_under_bfloat16_autocast():
    sm = sugarize.sugarize(_mlp())
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sm(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    ref = _grads(sugarize.sugarize(_mlp()), (x,))
    for n, p in sm.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, ref[n], rtol=0.1, atol=0.02)


def test_activation_checkpointing_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    sm = sugarize.sugarize(_mlp())
    x = torch.randn(8, 16)
    plain = _grads(sm, (x,))
    sm.zero_grad(set_to_none=True)
    checkpoint(sm, x, use_reentrant=False).pow(2).mean().backward()
    for n, p in sm.named_parameters():
        assert torch.equal(p.grad, plain[n])


def _ddp_worker(rank, world, path, data):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{path}.init", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(sugarize.sugarize(_mlp()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()
    if rank == 0:
        torch.save(model.module.state_dict(), path)
    dist.barrier()  # neither rank tears gloo down while the other still uses it (it aborted once under load)
    dist.destroy_process_group()


def test_distributed_data_parallel_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    data = (torch.randn(16, 16), torch.randint(0, 4, (16,)))
    path = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, path, data), nprocs=2, join=True)
    ddp = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    single = sugarize.sugarize(_mlp())
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    x, y = data
    for _ in range(3):
        opt.zero_grad()
        # each rank's half on its own, gradients averaged: the default's dead-unit mask is the local
        # batch's, as BatchNorm's statistics are without SyncBatchNorm
        sum(nn.functional.cross_entropy(single(x[i:i + 8]), y[i:i + 8]) for i in (0, 8)).div(2).backward()
        opt.step()
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)


def test_inspect_an_untraceable_model_lists_its_runtime_relu_calls():
    model, args, _ = ZOO.build("data_dependent")
    report = sugarize.inspect(model, example_args=args)
    assert report.capture == "modules" and {s.status for s in report.sites} == {"convertible"}
    (x,) = args
    with torch.no_grad():  # the fixture's forward by hand: nn.ReLU, one branch's ReLU, relu_ if out.sum() > 0
        h = torch.relu(model.a(x))
        h = torch.relu(model.b(h)) if h.mean() > 0.1 else torch.relu(model.b(-h))
        expected = 2 + int(model.a(h).sum() > 0)
    assert sum(s.calls for s in report.sites) == expected and all(s.node == "" for s in report.sites)
    bare = sugarize.inspect(model)  # without inputs: the activation modules, and what it cannot see
    assert [(s.path, s.spelling, s.status) for s in bare.sites] == [("relu", "nn.ReLU(inplace=True)", "convertible")]
    assert any("<model> makes functional activation calls" in n and "counted only with example inputs" in n
               for n in bare.notes), bare.notes


def test_hugging_face_bert_on_the_runtime_path_exports_like_the_original(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from sugarize.deploy.export import export_onnx, onnx_op_types

    torch.manual_seed(0)
    model = HF["bert"](transformers).eval()
    ids = torch.randint(0, 100, (2, 10))
    sm = sugarize.sugarize(model, example_args=(ids,))
    assert sm.meta["sugarize"]["report"].capture == "modules"
    orig = export_onnx(model, tmp_path / "bert.orig.onnx", (ids,))
    res = export_onnx(sm, tmp_path / "bert.sugar.onnx", (ids,))
    assert onnx_op_types(res.path) == onnx_op_types(orig.path) and onnx_op_types(res.path).count("Relu") == 2
    report = sugarize.verify(res.path, model, (ids,), stripped=sugarize.strip(sm), reference_artifact=orig.path,
                             batches=2)
    assert report.passed, report.summary()

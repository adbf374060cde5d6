"""Tensor parallel on SUGAR models (#31): DTensor sharding rules for every op sugarize registers,
checked on 2 (and 4) gloo processes against the single-process model."""

from __future__ import annotations

import os
import socket

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - a torch built without distributed
    pytest.skip("torch.distributed is not built in", allow_module_level=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(worker, world: int, *args):
    import torch.multiprocessing as mp

    port = _port()
    mp.spawn(_entry, args=(world, port, worker, args), nprocs=world, join=True)


def _entry(rank, world, port, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _llama_mlp(hidden=16, inter=32):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu", num_attention_heads=2,
                                   num_key_value_heads=2)
    return LlamaMLP(cfg)


def _step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y = y.full_tensor() if hasattr(y, "full_tensor") else y
    (y.square().sum() + y.sum()).backward()
    return y.detach(), {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                        for n, p in model.named_parameters()}


def _close(a, b, tol=1e-5):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() <= tol


def _tp_worker(rank, world):
    """On a 2 x 2 mesh: tensor parallel alone on each ("tp") pair, then 2-D FSDP2 + TP on all four."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import sugarize

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp = mesh["tp"]
    # the negative control first: with the rules never registered, DTensor refuses the op's
    # backward (its forward decomposes to relu), as the users saw
    from sugarize.method import sharding
    from sugarize.method.op import OP

    assert not sharding.registered()
    d = distribute_tensor(torch.randn(4, 8), tp, [Shard(1)]).requires_grad_(True)
    real, sharding.register = sharding.register, lambda: False
    try:
        with pytest.raises(NotImplementedError, match="sugar_grad.default does not have a sharding strategy"):
            OP(d, "bsilu", [1.67], False, "full").sum().backward()
    finally:
        sharding.register = real
    assert not sharding.registered()
    OP(d, "bsilu", [1.67], False, "full").sum().backward()  # the first DTensor through the op registers them
    assert {"sugar", "sugar_grad"} <= sharding.registered()

    model = _llama_mlp()
    sm = sugarize.sugarize(model, relufy=("silu",))
    assert [s.fused for s in sugarize.report_of(sm).sites] == ["mul + Linear"]
    reference = copy.deepcopy(sm)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    want_y, want_g = _step(reference, x)
    plan = {"gate_proj": ColwiseParallel(use_local_output=False), "up_proj": ColwiseParallel(use_local_output=False),
            "down_proj": RowwiseParallel()}
    for two_d in (False, True):
        parallel = parallelize_module(copy.deepcopy(reference), tp, plan)
        if two_d:
            from torch.distributed.fsdp import fully_shard

            fully_shard(parallel, mesh=mesh["dp"])
        got_y, got_g = _step(parallel, x)
        assert _close(got_y, want_y), ("output", two_d)
        for name in want_g:
            assert _close(got_g[name], want_g[name]), (name, two_d)
    # the fused op itself on DTensors, by its own rules: batch-sharded, and row-wise (no bias)
    from sugarize.method.fused_linear import LINEAR_OP

    assert sharding.registered() == {"sugar", "sugar_forward", "sugar_grad", "sugar_linear"}
    torch.manual_seed(2)
    a, u, w = torch.randn(6, 8), torch.randn(6, 8), torch.randn(4, 8)
    for placements, wp in (([Shard(0)], [Replicate()]), ([Shard(1)], [Shard(1)])):
        leaves = [distribute_tensor(t, tp, p).requires_grad_(True) for t, p in ((a, placements), (u, placements), (w, wp))]
        out = LINEAR_OP(*leaves[:2], leaves[2], None, "bsilu", [1.67], False)
        assert isinstance(out, DTensor)
        out.full_tensor().square().sum().backward()
        plain = [t.clone().requires_grad_(True) for t in (a, u, w)]
        ref = LINEAR_OP(*plain[:2], plain[2], None, "bsilu", [1.67], False)
        ref.square().sum().backward()
        assert _close(out.full_tensor(), ref.detach())
        for got, want in zip(leaves, plain):
            assert _close(got.grad.full_tensor(), want.grad), placements


def test_tensor_parallel_and_fsdp2_plus_tp_on_a_relufied_llama_mlp_match_the_single_process_model():
    """ColwiseParallel/RowwiseParallel (use_local_output=False) on each pair of a 2 x 2 gloo mesh,
    then 2-D FSDP2 + TP on all four processes: the output and every gradient of one process."""
    pytest.importorskip("transformers")
    _run(_tp_worker, 4)

"""A relufied Hugging Face model in the tools LLM users fine-tune with: save_pretrained /
from_pretrained, the Trainer (with accelerate), and PEFT LoRA adapters."""

from __future__ import annotations

import pytest
import torch

import sugarize

from helpers import same_bits

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def _relufied():
    model = _llama()
    ids = torch.randint(0, 64, (2, 12))
    return model, sugarize.sugarize(model, relufy=("silu",), example_args=(ids,)), ids


def test_save_pretrained_weights_load_into_the_plain_class(tmp_path):
    model, sm, ids = _relufied()
    with torch.no_grad():
        for p in sm.parameters():
            p.add_(0.01)  # "fine-tuned"
    sm.save_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    for k, v in sm.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


def test_the_trainer_fine_tunes_a_relufied_model():
    pytest.importorskip("accelerate")
    model, sm, ids = _relufied()
    data = [{"input_ids": torch.randint(0, 64, (12,)), "labels": torch.randint(0, 64, (12,))} for _ in range(8)]
    args = transformers.TrainingArguments(output_dir="unused", per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    trainer = transformers.Trainer(model=sm, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in sm.state_dict().items())
    assert sugarize.report_of(sm).capture == "modules"  # still the SUGAR model the Trainer trained
    by_hand = _llama()
    for layer in by_hand.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    by_hand.load_state_dict(sm.state_dict())
    sm.eval()
    assert same_bits(sm(ids).logits, by_hand.eval()(ids).logits)  # trained, and its forward is still ReLU


def test_lora_adapters_on_a_relufied_model_train_through_the_surrogate():
    peft = pytest.importorskip("peft")
    model, sm, ids = _relufied()
    lora = peft.get_peft_model(sm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"]))
    out = lora(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # the relufied forward is still ReLU under the adapters (LoRA B starts at zero)
    relu_ref = sugarize.strip(sm)
    assert same_bits(lora(input_ids=ids).logits, relu_ref(ids).logits)


def _fsdp_worker(rank, world, path, data):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{path}.init", rank=rank, world_size=world)
    model, sm, _ = _relufied()
    for layer in sm.model.layers:
        fully_shard(layer)
    fully_shard(sm)
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    ids = data[rank * len(data) // world:(rank + 1) * len(data) // world]
    for _ in range(2):
        opt.zero_grad()
        sm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sm.state_dict().items()}
    if rank == 0:
        torch.save(full, path)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_with_two_gloo_processes_gives_the_weights_of_one_process(tmp_path):
    """FSDP2 (fully_shard) on CPU, 2 processes each on half the batch: the same weights as one
    process on the whole batch (the loss is a mean over equal halves)."""
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    data = torch.randint(0, 64, (4, 12))
    path = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_worker, args=(2, path, data), nprocs=2, join=True)
    sharded = torch.load(path, weights_only=True)
    _, single, _ = _relufied()
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        single(input_ids=data, labels=data).loss.backward()
        opt.step()
    for k, v in single.state_dict().items():
        torch.testing.assert_close(sharded[k], v, rtol=1e-4, atol=1e-6, msg=k)

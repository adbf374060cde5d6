"""Helpers shared by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
MODELS = FIXTURES / "models"


def load_fixture(name: str):
    """Import fixtures/models/<name>.py as a module (as a user's model file)."""
    if f"fixture_{name}" in sys.modules:  # once per process: classes stay the same objects (pickle)
        return sys.modules[f"fixture_{name}"]
    path = MODELS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN payloads and signed zeros included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a.contiguous().view(int_dtype), b.contiguous().view(int_dtype))


def fgi(x: torch.Tensor, name: str | None = None, negative_only: bool = False, **params) -> torch.Tensor:
    """Reference SUGAR by forward gradient injection (the paper's form):
    y = s(x) - sg(s(x)) + sg(relu(x)); its gradient is autograd of the primitive s. ``name``: the
    surrogate, by default sugarize's default (for bsilu_dead, s is B-SiLU at dead units, relu elsewhere)."""
    from sugarize.options import DEFAULT_SURROGATE
    from sugarize.method.surrogates import get_surrogate, resolve_params

    name = name or DEFAULT_SURROGATE
    entry = get_surrogate(name)
    s = entry.primitive(x, **resolve_params(name, params))
    if negative_only:
        s = torch.where(x > 0, x, s)
    return s - s.detach() + torch.relu(x).detach()


class FGI(torch.nn.Module):
    """The reference activation: relu forward, the surrogate's derivative backward (``fgi``)."""

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name

    def forward(self, x):
        return fgi(x, self.name)


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(intermediate: int = 64, positions: int = 32):
    """A small LlamaForCausalLM (SiLU gated MLP, eager attention, no cache), random weights, seeded."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                                   use_cache=False, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg)

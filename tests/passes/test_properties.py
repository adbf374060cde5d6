"""Property tests: random MLPs and CNNs mixing every spelling, in-place ops and reused modules."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sugarize

from helpers import fgi, same_bits

SPELLINGS = ["module", "module_inplace", "shared", "F.relu", "F.relu_inplace", "F.relu_",
             "torch.relu", "torch.relu_", "Tensor.relu", "Tensor.relu_", "read_after_inplace"]


class RandomNet(nn.Module):
    """A stack of Linear or Conv2d layers, each followed by a ReLU spelled as ``spec`` says.

    With ``reference=True`` every ReLU is the paper's forward-gradient-injection SUGAR.
    """

    def __init__(self, spec, conv: bool, width: int = 6):
        super().__init__()
        self.spec, self.conv, self.reference = list(spec), conv, False
        make = (lambda: nn.Conv2d(width, width, 3, padding=1)) if conv else (lambda: nn.Linear(width, width))
        self.layers = nn.ModuleList(make() for _ in self.spec)
        self.acts = nn.ModuleList(nn.ReLU(inplace=s == "module_inplace") for s in self.spec)
        self.shared = nn.ReLU(inplace=True)

    def act(self, i, h):
        s = self.spec[i]
        if self.reference:
            return fgi(h) if s != "read_after_inplace" else fgi(h) * 2
        if s in ("module", "module_inplace"):
            return self.acts[i](h)
        if s == "shared":
            return self.shared(h)
        if s == "F.relu":
            return F.relu(h)
        if s == "F.relu_inplace":
            return F.relu(h, inplace=True)
        if s == "F.relu_":
            return F.relu_(h)
        if s == "torch.relu":
            return torch.relu(h)
        if s == "torch.relu_":
            return torch.relu_(h)
        if s == "Tensor.relu":
            return h.relu()
        if s == "Tensor.relu_":
            return h.relu_()
        r = h.relu_()
        return h + r  # read the mutated tensor under its old name

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = self.act(i, layer(x))
        return x


nets = st.tuples(st.lists(st.sampled_from(SPELLINGS), min_size=1, max_size=6), st.booleans(), st.integers(0, 2**16))


def _build(spec, conv, seed):
    torch.manual_seed(seed)
    net = RandomNet(spec, conv).double()
    x = torch.randn((2, 6, 5, 5) if conv else (7, 6), dtype=torch.float64) * 2
    return net, x


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets)
def test_strip_of_sugarize_is_the_identity_bit_for_bit(case):
    spec, conv, seed = case
    net, x = _build(spec, conv, seed)
    sm = sugarize.sugarize(net)
    assert sugarize.count_sugar(sm) == len(spec)
    expected = net(x.clone())
    assert same_bits(sm(x.clone()), expected)
    assert same_bits(sugarize.strip(sm)(x.clone()), expected)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets)
def test_gradient_equals_reference_sugar(case):
    spec, conv, seed = case
    net, x = _build(spec, conv, seed)
    sm = sugarize.sugarize(net)
    ref = RandomNet(spec, conv).double()
    ref.load_state_dict(net.state_dict())
    ref.reference = True
    grads = []
    for model in (sm, ref):
        xi = x.clone().requires_grad_()
        model(xi).pow(2).sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

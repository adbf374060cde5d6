"""DTensor sharding rules for every op sugarize registers, so that tensor parallel (and 2-D FSDP2 +
TP plans, which hand activations on as DTensors) runs them.

- ``sugar``, ``sugar_forward`` and ``sugar_grad`` are pointwise in their tensors: any ``Shard(d)``
  or ``Replicate`` of the input gives the same placement of the outputs. A ``Partial`` input is
  made whole first (relu of a partial sum is not the sum of relus).
- ``sugar_linear`` (``fused_linear.py``) is ``linear(relu(x) [* u])``: the Linear's rules for the
  input's batch dimensions (weight replicated), and the row-wise split (x and u sharded on their
  last dimension, the weight on its second, no bias: a partial sum out). ``linear_sugar`` does
  not hand it DTensors today (a tensor-parallel Linear has hooks and DTensor weights, so the site
  runs unfused); the rules are there for a caller that does, and tested.

Registered with DTensor's ``register_sharding`` (experimental, public), once per process, when a
DTensor first reaches one of the ops (``register_for``, from the ops' autograd set-up and the
activation module): never at ``import sugarize`` or in a conversion, as importing DTensor costs
about 0.6 s and most processes never see one. A DTensor's first forward through the op needs no
rule (DTensor decomposes it to ``relu``); its backward, the first thing that does, comes after
the set-up that registers them.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["register", "register_for", "registered"]

_OPS = ("sugar", "sugar_forward", "sugar_grad", "sugar_linear")
_done: set[str] = set()


def registered() -> frozenset[str]:
    """The ops (by name) whose rules are registered in this process."""
    return frozenset(_done)


def register_for(*tensors) -> None:
    """Registers the rules if one of ``tensors`` is a DTensor (no import otherwise: a DTensor exists
    only once its module has been imported)."""
    if len(_done) == len(_OPS):
        return
    module = sys.modules.get("torch.distributed.tensor")
    if module is not None and any(isinstance(t, module.DTensor) for t in tensors):
        register()


def register() -> bool:
    """Registers the rules of every sugarize op defined so far (once each per process); False where
    ``torch.distributed`` is not built in. The ops are looked up by name: ``op.py`` defines the first
    three, ``fused_linear.py`` the fourth when it is first imported."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    def pointwise(ndim: int, tensors_in: int, others: int, outputs: int):
        rules = [([Replicate()] * outputs, [Replicate()] * tensors_in + [None] * others)]
        for d in range(ndim):
            rules.append(([Shard(d)] * outputs, [Shard(d)] * tensors_in + [None] * others))
        return rules

    def sugar(x, surrogate, params, negative_only, save):
        return pointwise(x.ndim, 1, 4, 1)

    def sugar_forward(x, surrogate, params, negative_only, save):
        return pointwise(x.ndim, 1, 4, 2)

    def sugar_grad(grad, x, surrogate, params, negative_only):
        return pointwise(x.ndim, 2, 3, 1)

    def sugar_linear(x, other, weight, bias, surrogate, params, negative_only):
        u = (lambda p: p) if other is not None else (lambda p: None)
        b = (lambda p: p) if bias is not None else (lambda p: None)
        options = [None, None, None]
        rules = [([Replicate()], [Replicate(), u(Replicate()), Replicate(), b(Replicate())] + options)]
        for d in range(x.ndim - 1):  # batch dimensions
            rules.append(([Shard(d)], [Shard(d), u(Shard(d)), Replicate(), b(Replicate())] + options))
        if bias is None:  # row-wise: each rank's share of the inner dimension, summed later
            last = x.ndim - 1
            rules.append(([Partial()], [Shard(last), u(Shard(last)), Shard(1), None] + options))
        return rules

    rules = {"sugar": sugar, "sugar_forward": sugar_forward, "sugar_grad": sugar_grad, "sugar_linear": sugar_linear}
    for name in _OPS:
        if name not in _done and hasattr(torch.ops.sugarize, name):
            register_sharding(getattr(torch.ops.sugarize, name).default)(rules[name])
            _done.add(name)
    return True

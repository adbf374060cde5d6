"""How the SUGAR op behaves under ``torch.compile`` (Inductor).

A ``torch.library`` custom op is opaque to Inductor: left alone, it would run as a Python
fallback kernel between two generated kernels. ``register`` teaches Inductor the op, through
two of its internals, the first time Dynamo meets it:

- a decomposition (Inductor's table, applied below autograd, after the op's backward formula
  has been traced): ``sugar(x)`` becomes ``sugar_forward(x)[0]``, the first output of the
  internal op that computes ``relu(x)`` and the saved form of ``s'(x)`` together;
- a lowering for ``sugar_forward``: the eager formula, traced once per (surrogate,
  parameters, options, dtype) to ATen ops and replayed through Inductor's own lowerings, so
  both outputs are elementwise code that fuses into the kernel producing ``x`` (BatchNorm's,
  a residual add's) exactly as ReLU's relu does.

The op's ``setup_context`` asks the same ``sugar_forward`` for the saved form while traced;
AOTAutograd's CSE merges the two calls into one node. That is the point of the pair: an op
the forward needs and the partitioner may not recompute, so the 1-byte code is written once
in the forward, while ``x`` is in registers, and the backward reads 1 byte an element. With
a plain ``relu`` decomposition the partitioner chose to recompute ``s'(x)`` in the backward
from BatchNorm's saved input, and Inductor on CPU then wrote the recomputed ``x`` and its
sigmoid to memory (``should_realize_on_reuse``): for the benchmarks' ResNet-18, 275 kernels
against ReLU's 258 and 1.17x its kernel bytes. With the pair: 257 kernels and 0.94x
(``python benchmarks/perf.py``, columns *compiled kernels* and *kernel bytes ratio*).

A user surrogate whose formula has an ATen op without an Inductor lowering runs
``sugar_forward`` as an extern (eager) kernel: correct, only slower. If Inductor's lowering
API moves, the op keeps a plain ``relu`` decomposition and its traced formula; if its
decomposition table moves, the op is an opaque kernel. Numbers never change, only speed.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["register", "lowered"]

_state: dict = {"registered": False, "lowering": False}


def register(op, forward_op, forward_math: Callable) -> None:
    """Registers ``op``'s Inductor decomposition and ``forward_op``'s lowering, once per process.

    ``forward_math(x, surrogate, params, negative_only, save)`` is the eager formula of
    ``forward_op``: ``(relu(x), saved form of s'(x))`` with ATen ops only.
    """
    if _state["registered"]:
        return
    _state["registered"] = True
    try:
        from torch._inductor import decomposition as inductor_decomp
        from torch._inductor.lowering import register_lowering
    except Exception:  # noqa: BLE001 - no Inductor (or it moved): the op stays a fallback kernel
        return
    try:
        register_lowering(forward_op, type_promotion_kind=None)(
            functools.partial(_lower, forward_op, forward_math))
        _state["lowering"] = True
    except Exception:  # noqa: BLE001 - the private API moved: keep the plain relu decomposition
        pass

    def decomposition(x, surrogate, params, negative_only, save):
        if _state["lowering"]:
            return forward_op(x, surrogate, params, negative_only, save)[0]
        return torch.relu(x)

    tables = [getattr(inductor_decomp, "decompositions", None)]
    fast = getattr(inductor_decomp, "fast_random_decomps", None)
    if callable(fast):
        tables.append(fast())  # a cached copy of the table, taken the first time Inductor ran
    for table in tables:
        if isinstance(table, dict):
            table.setdefault(op, decomposition)


def lowered() -> bool:
    """Whether Inductor has the lowering of ``sugar_forward`` (and the op decomposes to it)."""
    return _state["lowering"]


@functools.lru_cache(maxsize=256)
def _formula(forward_math: Callable, surrogate: str, params: tuple[float, ...], negative_only: bool,
             save: str, dtype: torch.dtype) -> torch.fx.GraphModule | None:
    """``forward_math`` as a graph of ATen ops that all have Inductor lowerings, or None.

    Traced on a 0-d tensor: every op is elementwise, so the graph applies to any shape.
    """
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx

    def f(x):
        return forward_math(x, surrogate, list(params), negative_only, save)

    try:
        with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch.no_grad():
            gm = make_fx(torch.func.functionalize(f, remove="mutations_and_views"),
                         decomposition_table=select_decomp_table())(torch.zeros((), dtype=dtype))
    except Exception:  # noqa: BLE001 - an untraceable user surrogate: the plain path
        return None
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and node.target not in lowerings):
            return None
    return gm


def _lower(forward_op, forward_math: Callable, x, surrogate, params, negative_only, save):
    """Inductor lowering of ``sugar_forward``: the traced formula through Inductor's lowerings."""
    from torch._inductor.lowering import fallback_handler, lowerings

    gm = _formula(forward_math, surrogate, tuple(params), bool(negative_only), save, x.get_dtype())
    if gm is None:  # a user surrogate Inductor cannot generate: its eager kernel, as an extern call
        return fallback_handler(forward_op, add_to_fallback_set=False)(x, surrogate, params, negative_only, save)
    env: dict = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = x
        elif node.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if "device" in kwargs:  # constants (full, scalar_tensor) live on x's device
                kwargs = {**kwargs, "device": x.get_device()}
            env[node] = lowerings[node.target](*args, **kwargs)
        elif node.op == "output":
            return tuple(env[a] for a in node.args[0])
    raise AssertionError("traced formula without an output")

"""How the SUGAR op behaves under ``torch.compile`` (Inductor).

A ``torch.library`` custom op is opaque to Inductor: left alone, it would run as a Python
fallback kernel between two generated kernels. ``register`` teaches Inductor the op's two
forms, through two of its internals (its decomposition table and ``register_lowering``), the
first time Dynamo meets the op.

**Exact (``save="full"``, the default).** The op decomposes to ``relu``; its backward is
``sugar_grad(grad, x)``, whose lowering is the surrogate's formula replayed through
Inductor's own lowerings as one elementwise expression. The op keeps ``x`` for the backward,
and ``prefer_recompute`` marks the node that produced ``x`` (BatchNorm's affine, a residual
add) for recomputation, the way a selective-checkpoint policy marks nodes: AOTAutograd's
min-cut partitioner then rebuilds ``x`` in the backward from what the backward keeps anyway
(the convolution output, BatchNorm's statistics, the residual's operands) and saves nothing
that ReLU does not. Without the mark, the partitioner's ``ban_recompute_used_far_apart``
heuristic saves ``x`` at every site after a residual add (measured on the benchmarks'
ResNet-18: 1.14x ReLU's saved bytes; with it, 1.00x). The mark is set only on elementwise
producers: a site fed by a matmul or a convolution keeps ``x``, as recomputing it would
cost a matmul.

**Compressed (``save="bfloat16"|"uint8"``).** The op decomposes to ``sugar_forward(x)[0]``,
the first output of an internal op that computes ``relu(x)`` and the saved code together,
lowered the same way, so both fuse into the kernel producing ``x``; the backward reads the
code back.

A user surrogate whose formula has an ATen op without an Inductor lowering runs as an extern
(eager) kernel, with a one-time warning: correct, only slower. A surrogate that is not elementwise
(``bsilu_dead``, the default, reads each unit's batch) is traced at the input's rank: Inductor
generates its reduction and its elementwise tail like any other kernels. If Inductor's lowering API
moves, the op keeps a plain ``relu`` decomposition and its formulas run as extern kernels.
Numbers never change, only speed.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

__all__ = ["register", "lowered", "prefer_recompute"]

_state: dict = {"registered": False, "lowering": False, "warned": False}


def register(op, forward_op, forward_math: Callable, grad_op, grad_math: Callable) -> None:
    """Registers ``op``'s Inductor decomposition and the lowerings of ``forward_op`` and
    ``grad_op``, once per process.

    ``forward_math(x, surrogate, params, negative_only, save)`` is the eager formula of
    ``forward_op``: ``(relu(x), saved form of s'(x))``; ``grad_math(grad, x, surrogate,
    params, negative_only)`` that of ``grad_op``: ``grad * s'(x)``; ATen ops only.
    """
    if _state["registered"]:
        return
    _state["registered"] = True
    try:
        from torch._inductor import decomposition as inductor_decomp
        from torch._inductor.lowering import register_lowering
    except Exception as exc:  # noqa: BLE001 - no Inductor (or it moved): the op stays a fallback kernel
        warnings.warn(f"sugarize: Inductor's internals moved ({type(exc).__name__}); under torch.compile the SUGAR "
                      "op runs as an opaque kernel between generated ones: correct, slower", stacklevel=2)
        return
    try:
        register_lowering(forward_op, type_promotion_kind=None)(
            functools.partial(_lower_forward, forward_op, forward_math))
        register_lowering(grad_op, type_promotion_kind=None)(
            functools.partial(_lower_grad, grad_op, grad_math))
        _state["lowering"] = True
    except Exception as exc:  # noqa: BLE001 - the private API moved: keep the plain relu decomposition
        warnings.warn(f"sugarize: Inductor's register_lowering failed ({type(exc).__name__}); under torch.compile "
                      "the SUGAR formulas run as extern kernels: correct, slower", stacklevel=2)

    def decomposition(x, surrogate, params, negative_only, save):
        if _state["lowering"] and save != "full":
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


def prefer_recompute(x: torch.Tensor) -> None:
    """Marks the traced node that produced ``x`` for recomputation in the backward.

    Called by the op's ``setup_context`` while AOTAutograd traces the joint graph; sets the
    ``recompute`` policy that selective activation checkpointing sets
    (``CheckpointPolicy.PREFER_RECOMPUTE``), on that one node, only if it is elementwise.
    Anything unexpected (another tracer, a moved internal) leaves the graph unmarked.
    """
    try:
        from torch._subclasses.functional_tensor import FunctionalTensor
        from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot
        from torch.utils.checkpoint import CheckpointPolicy

        mode = get_proxy_mode()
        if mode is None:
            return
        inner = torch._from_functional_tensor(x.elem) if isinstance(x, FunctionalTensor) else x
        proxy = get_proxy_slot(inner, mode.tracer, None)
        node = getattr(getattr(proxy, "proxy", None), "node", None)
    except Exception:  # noqa: BLE001 - not traced by AOTAutograd as expected: no mark
        return
    target = getattr(node, "target", None)
    if (node is not None and node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.pointwise in target.tags):
        node.meta.setdefault("recompute", CheckpointPolicy.PREFER_RECOMPUTE)


@functools.lru_cache(maxsize=256)
def _formula(math_fn: Callable, n_inputs: int, options: tuple, dtype: torch.dtype,
             ndim: int = 0) -> torch.fx.GraphModule | None:
    """``math_fn(*inputs, *options)`` as a graph of ATen ops that all have Inductor lowerings, or None.

    Traced on 0-d tensors for an elementwise surrogate: every op is elementwise, so the graph applies
    to any shape. A surrogate that reads each unit's batch (``bsilu_dead``) is traced on tensors of
    the input's rank (``ndim``): its reductions name dimensions, never sizes, so the graph applies to
    any shape of that rank.
    """
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx

    def f(*inputs):
        return math_fn(*inputs, *[list(o) if isinstance(o, tuple) else o for o in options])

    try:
        with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch.no_grad():
            gm = make_fx(torch.func.functionalize(f, remove="mutations_and_views"),
                         decomposition_table=select_decomp_table())(
                *[torch.zeros((2,) * ndim, dtype=dtype) for _ in range(n_inputs)])
    except Exception:  # noqa: BLE001 - an untraceable user surrogate: the plain path
        return None
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and node.target not in lowerings):
            return None
    return gm


def _replay(gm: torch.fx.GraphModule, inputs: list, device):
    """The traced formula through Inductor's lowerings: one elementwise expression per output."""
    from torch._inductor.lowering import lowerings

    env: dict = {}
    placeholders = iter(inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if "device" in kwargs:  # constants (full, scalar_tensor) live on the inputs' device
                kwargs = {**kwargs, "device": device}
            env[node] = lowerings[node.target](*args, **kwargs)
        elif node.op == "output":
            out = node.args[0]
            return tuple(env[a] for a in out) if isinstance(out, (tuple, list)) else env[out]
    raise AssertionError("traced formula without an output")


def _extern(op, *args):
    """``op``'s eager kernel called from the generated code, with a one-time warning."""
    from torch._inductor.lowering import fallback_handler

    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn("sugarize: Inductor cannot generate this surrogate's formula; the SUGAR op runs "
                      "as an extern (eager) kernel between generated kernels: correct, slower", stacklevel=2)
    return fallback_handler(op, add_to_fallback_set=False)(*args)


def _rank(surrogate: str, x) -> int:
    """0 for an elementwise surrogate (its formula is traced on 0-d tensors), else the input's rank."""
    from .surrogates import get_surrogate

    return 0 if get_surrogate(surrogate).elementwise else len(x.get_size())


def _lower_forward(forward_op, forward_math: Callable, x, surrogate, params, negative_only, save):
    """Inductor lowering of ``sugar_forward``: relu(x) and the saved code, elementwise."""
    gm = _formula(forward_math, 1, (surrogate, tuple(params), bool(negative_only), save), x.get_dtype(),
                  _rank(surrogate, x))
    if gm is None:
        return _extern(forward_op, x, surrogate, params, negative_only, save)
    return _replay(gm, [x], x.get_device())


def _lower_grad(grad_op, grad_math: Callable, grad, x, surrogate, params, negative_only):
    """Inductor lowering of ``sugar_grad``: grad * s'(x) as one elementwise expression."""
    if grad.get_dtype() != x.get_dtype():
        return _extern(grad_op, grad, x, surrogate, params, negative_only)
    gm = _formula(grad_math, 2, (surrogate, tuple(params), bool(negative_only)), x.get_dtype(), _rank(surrogate, x))
    if gm is None:
        return _extern(grad_op, grad, x, surrogate, params, negative_only)
    return _replay(gm, [grad, x], x.get_device())

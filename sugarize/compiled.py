"""How the SUGAR op behaves under ``torch.compile`` (Inductor).

A ``torch.library`` custom op is opaque to Inductor: it would call SUGAR as a Python
fallback kernel between two generated kernels (the BatchNorm output written to memory, read
back, relu'd in eager, written again, then converted to the next convolution's layout).
``register_inductor_decomposition`` adds the op's post-autograd decomposition
(``aten.relu``) to Inductor's table, so the relu fuses into its producer's kernel exactly as
ReLU's does. Autograd is unaffected: the table applies below the autograd key, after the
op's own backward formula (``setup_context`` and ``backward`` in ``op.py``) has been traced.

What is saved for the backward pass is then AOTAutograd's choice: where ``x`` comes from a
matmul (Linear), it keeps the op's 1-byte code; where ``x`` is a cheap elementwise function
of tensors the backward keeps anyway (convolution -> BatchNorm -> SUGAR), it recomputes
``s'(x)`` in the backward and saves nothing extra at all.

This uses an Inductor internal (its decomposition table). It changes where the numbers are
computed, never what they are; if the internal moves, the op falls back to the opaque
kernel and stays correct, only slower.
"""

from __future__ import annotations

__all__ = ["register_inductor_decomposition"]

_registered: set = set()


def register_inductor_decomposition(op, decomposition) -> None:
    """Adds ``op -> decomposition`` to Inductor's decomposition tables, once per process."""
    if op in _registered:
        return
    _registered.add(op)
    try:
        from torch._inductor import decomposition as inductor_decomp
    except Exception:  # noqa: BLE001 - no Inductor (or it moved): the op stays a fallback kernel
        return
    tables = [getattr(inductor_decomp, "decompositions", None)]
    fast = getattr(inductor_decomp, "fast_random_decomps", None)
    if callable(fast):
        tables.append(fast())  # a cached copy of the table, taken the first time Inductor ran
    for table in tables:
        if isinstance(table, dict):
            table.setdefault(op, decomposition)

"""The op's options, their defaults and their record, defined once (no package imports: every layer
may read them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_SURROGATE", "SAVE_MODES", "DEFAULT_SAVE", "OpOptions"]

# B-SiLU at dead units only, ReLU's exact gradient elsewhere: chosen by benchmarks/study.py (no harm on
# a healthy model, revival on a dead one). The paper's form everywhere is surrogate="bsilu".
DEFAULT_SURROGATE = "bsilu_dead"
SAVE_MODES = ("full", "bfloat16", "uint8")
DEFAULT_SAVE = "full"  # exact; the compressed modes are opt-in, their error stated by op.save_error


@dataclass(frozen=True)
class OpOptions:
    """What one SUGAR op computes: its surrogate, that surrogate's parameter values (in its
    declaration order), ``negative_only`` and the ``save`` mode.

    Every layer passes this record, not a loose tuple. An fx graph holds it flattened into the
    op's arguments (``args``, the op schema's order); ``passes/opnodes.py`` is the one place that
    writes it into and reads it back from a node. Build a validated one with
    ``method.saved.op_options``."""

    surrogate: str = DEFAULT_SURROGATE
    params: tuple[float, ...] = ()
    negative_only: bool = False
    save: str = DEFAULT_SAVE

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(float(p) for p in self.params))
        object.__setattr__(self, "negative_only", bool(self.negative_only))

    @property
    def args(self) -> tuple:
        """``(surrogate, params, negative_only, save)``: the op's arguments after its input."""
        return self.surrogate, list(self.params), self.negative_only, self.save

    @classmethod
    def of_args(cls, args) -> "OpOptions":
        """The record from the op's four option arguments (``args``' inverse)."""
        surrogate, params, negative_only, save = args
        return cls(surrogate, tuple(params), negative_only, save)

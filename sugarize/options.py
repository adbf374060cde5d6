"""The op's options and their defaults, defined once (no imports: every layer may read them)."""

from __future__ import annotations

__all__ = ["DEFAULT_SURROGATE", "SAVE_MODES", "DEFAULT_SAVE"]

DEFAULT_SURROGATE = "bsilu"  # the paper's best surrogate
SAVE_MODES = ("full", "bfloat16", "uint8")
DEFAULT_SAVE = "full"  # exact; the compressed modes are opt-in, their error stated by op.save_error

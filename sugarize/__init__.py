"""sugarize: fine-tune ReLU networks with surrogate gradients (SUGAR), ship the same ReLU graph.

    >>> import sugarize
    >>> sm = sugarize.sugarize(model, "bsilu")      # every ReLU -> SUGAR; sugarize.report_of(sm)
    >>> ...                                          # fine-tune sm with your own loop
    >>> plain = sugarize.strip(sm)                   # SUGAR -> ReLU, bit-identical outputs
    >>> sugarize.export_onnx(plain, "model.onnx", example_args)

Imports are lazy: ``import sugarize`` does not import torch, onnx or onnxruntime.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# ``python -m sugarize`` puts the current folder first on sys.path before this package runs: a
# typing.py or ast.py there would stand in for the standard library's. While the package is
# being located for -m, argv[0] is "-m": the folder comes off the path before any import
# (``__main__`` says why; os and sys are loaded before any user file can be found).
if _sys.argv[:1] == ["-m"] and _sys.path and _sys.path[0] in ("", _os.getcwd()):
    _sys.path.pop(0)

import importlib  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover - the one list of public names (read below for the lazy imports)
    from .deploy.export import export_onnx
    from .deploy.parity import compare_graphs, verify
    from .deploy.target import ExportOptions, Target, TargetOption
    from .deploy.targets import register_target, unregister_target
    from .errors import (CaptureError, CheckpointError, CollapseError, DataFileError, DivergenceError, ExportError,
                         InputError,
                         InternalError, ParityError, StripRefusedError, SugarizeError, SugarizeNote,
                         SugarizeWarning)
    from .files.checkpoint import load_checkpoint, save_checkpoint
    from .files.modelfile import load_model
    from .files.weights import load_weights, save_weights
    from .method.module import SugarActivation
    from .method.op import sugar, surrogate_grad
    from .method.saved import save_error
    from .method.surrogates import Param, Surrogate, get_surrogate, list_surrogates, register_surrogate
    from .passes.config import SugarConfig
    from .passes.paths import register_capture_path, unregister_capture_path, warmup
    from .passes.report import Report, Site, report_of
    from .passes.rewrite import SugarizePass, inspect, sugarize
    from .passes.strip import StripPass, count_sugar, strip, strip_
    from .training.deadunits import audit
    from .training.memory import MemoryReport, memory_report
    from .training.sweep import sweep
    from .training.train import finetune


def _public_names() -> dict[str, str]:
    """Public name -> module, read from the ``TYPE_CHECKING`` block above: one list serves type
    checkers (static imports) and the lazy imports (this dict), so they cannot drift apart."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    return {alias.asname or alias.name: f"{__name__}.{node.module}"
            for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}


_EXPORTS = _public_names()
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sugarize' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

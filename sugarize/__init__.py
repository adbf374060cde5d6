"""sugarize: fine-tune ReLU networks with surrogate gradients (SUGAR), ship the same ReLU graph.

    >>> import sugarize
    >>> sm = sugarize.sugarize(model, "bsilu")      # every ReLU -> SUGAR, report in sm.meta
    >>> ...                                          # fine-tune sm with your own loop
    >>> plain = sugarize.strip(sm)                   # SUGAR -> ReLU, bit-identical outputs
    >>> sugarize.export_onnx(plain, "model.onnx", example_args)

Imports are lazy: ``import sugarize`` does not import torch, onnx or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "sugarize": "sugarize.passes.rewrite",
    "inspect": "sugarize.passes.rewrite",
    "strip": "sugarize.passes.strip",
    "strip_": "sugarize.passes.strip",
    "count_sugar": "sugarize.passes.strip",
    "Report": "sugarize.passes.report",
    "Site": "sugarize.passes.report",
    "SugarConfig": "sugarize.config",
    "sugar": "sugarize.op",
    "surrogate_grad": "sugarize.op",
    "save_error": "sugarize.op",
    "Param": "sugarize.surrogates",
    "Surrogate": "sugarize.surrogates",
    "register_surrogate": "sugarize.surrogates",
    "get_surrogate": "sugarize.surrogates",
    "list_surrogates": "sugarize.surrogates",
    "SugarizeError": "sugarize.errors",
    "load_model": "sugarize.io",
    "save_checkpoint": "sugarize.io",
    "load_checkpoint": "sugarize.io",
    "load_weights": "sugarize.io",
    "save_weights": "sugarize.io",
    "export_onnx": "sugarize.export",
    "verify": "sugarize.parity",
    "compare_graphs": "sugarize.parity",
    "audit": "sugarize.deadunits",
    "finetune": "sugarize.train",
}

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


if TYPE_CHECKING:  # pragma: no cover
    from .config import SugarConfig
    from .errors import SugarizeError
    from .op import save_error, sugar, surrogate_grad
    from .passes.report import Report, Site
    from .passes.rewrite import inspect, sugarize
    from .passes.strip import count_sugar, strip, strip_
    from .surrogates import Param, Surrogate, get_surrogate, list_surrogates, register_surrogate

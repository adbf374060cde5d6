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
    "SugarConfig": "sugarize.passes.config",
    "sugar": "sugarize.method.op",
    "surrogate_grad": "sugarize.method.op",
    "save_error": "sugarize.method.saved",
    "Param": "sugarize.method.surrogates",
    "Surrogate": "sugarize.method.surrogates",
    "register_surrogate": "sugarize.method.surrogates",
    "get_surrogate": "sugarize.method.surrogates",
    "list_surrogates": "sugarize.method.surrogates",
    "SugarizeError": "sugarize.errors",
    "load_model": "sugarize.files.modelfile",
    "save_checkpoint": "sugarize.files.checkpoint",
    "load_checkpoint": "sugarize.files.checkpoint",
    "load_weights": "sugarize.files.weights",
    "save_weights": "sugarize.files.weights",
    "export_onnx": "sugarize.deploy.export",
    "verify": "sugarize.deploy.parity",
    "compare_graphs": "sugarize.deploy.parity",
    "audit": "sugarize.training.deadunits",
    "finetune": "sugarize.training.train",
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
    from .passes.config import SugarConfig
    from .errors import SugarizeError
    from .method.saved import save_error
    from .method.op import sugar, surrogate_grad
    from .passes.report import Report, Site
    from .passes.rewrite import inspect, sugarize
    from .passes.strip import count_sugar, strip, strip_
    from .method.surrogates import Param, Surrogate, get_surrogate, list_surrogates, register_surrogate

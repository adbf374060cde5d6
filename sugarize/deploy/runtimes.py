"""ONNX runtimes: onnxruntime and OpenVINO sessions with explicit settings, and latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError, InputError, first_line

__all__ = ["ort_session", "ort_latency", "ort_latencies", "onnx_runner", "OrtRunner", "OpenVinoRunner"]


# One parity run of a file longer than this is stopped: no model sugarize exports takes minutes
# for one seeded batch on a CPU, and a hostile file's Loop would otherwise run until killed.
RUN_TIMEOUT_S = 300.0

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def ort_session(path, *, optimization: str = "all", optimized_path: str | None = None, threads: int | None = None,
                model_format: str | None = None):
    """An onnxruntime CPU session with an explicit optimisation level; ``model_format="ORT"``
    reads the file as the ORT format whatever its name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if model_format:
        opts.add_session_config_entry("session.load_model_format", model_format)
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc


class OrtRunner:
    """An ONNX or ORT-format file in onnxruntime's CPU provider at an explicit optimisation level."""

    def __init__(self, path, optimization: str = "all", model_format: str | None = None, threads: int | None = None,
                 timeout_s: float | None = None):
        import onnxruntime as ort

        self.session = ort_session(path, optimization=optimization, model_format=model_format, threads=threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.version, self.providers = f"onnxruntime {ort.__version__}", ["CPUExecutionProvider"]
        self.optimization = _OPT_LEVELS[optimization]
        self.timeout_s = RUN_TIMEOUT_S if timeout_s is None else timeout_s
        self.path = path

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One run, stopped after ``timeout_s`` (onnxruntime's ``RunOptions.terminate``, set from a
        timer): a file from elsewhere may hold a ``Loop`` with a trip count of 2**62."""
        import threading

        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4  # the terminate shows as our one line, not onnxruntime's log
        timer = threading.Timer(self.timeout_s, lambda: setattr(options, "terminate", True))
        timer.daemon = True
        timer.start()
        try:
            return self.session.run(self.outputs, dict(zip(self.inputs, arrays)), options)
        except Exception as exc:
            if options.terminate:
                raise ExportError(f"onnxruntime did not finish one run of {Path(str(self.path)).name} in "
                                  f"{self.timeout_s:g} s and was stopped (a Loop with a huge trip count?); check "
                                  "the file's control flow") from None
            raise
        finally:
            timer.cancel()


class OpenVinoRunner:
    """An ONNX file in OpenVINO's CPU plugin; ``precision`` None keeps the plugin's default."""

    def __init__(self, path, precision: str | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise InputError("--runtime openvino needs the openvino extra: pip install 'sugarize[openvino]'") from None
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot compile {path}: {first_line(exc)}") from exc
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.version = f"openvino {ov.__version__.split('-')[0]} (CPU, inference precision {hint})"
        self.providers = ["CPU"]
        self.optimization = "openvino default"

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        res = self.compiled(arrays)
        return [np.asarray(res[o]) for o in self.compiled.outputs]


def onnx_runner(path, runtime: str = "onnxruntime", optimization: str = "all", precision: str | None = None):
    """A runner for an ONNX file: ``onnxruntime`` (CPU provider) or ``openvino`` (CPU plugin)."""
    if runtime == "onnxruntime":
        return OrtRunner(path, optimization)
    if runtime == "openvino":
        return OpenVinoRunner(path, precision)
    raise InputError(f"runtime {runtime!r} is not one of onnxruntime, openvino")


def ort_latency(path, x: torch.Tensor, *, repeats: int = 200, warmup: int = 20, threads: int = 1) -> float:
    """Median seconds of one onnxruntime CPU run of a single-input model on ``x``."""
    return ort_latencies([path], x, repeats=repeats, warmup=warmup, threads=threads)[0]


def ort_latencies(paths, x: torch.Tensor, *, repeats: int = 200, warmup: int = 20, threads: int = 1) -> list[float]:
    """Median seconds per run of each model, runs interleaved so drift hits all alike."""
    import time

    sessions = [ort_session(p, threads=threads) for p in paths]
    feeds = [{s.get_inputs()[0].name: x.numpy()} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]

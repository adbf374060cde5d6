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
                model_format: str = "ONNX"):
    """An onnxruntime CPU session with an explicit optimisation level, reading the file as
    ``model_format`` ("ONNX" or "ORT") whatever its name: onnxruntime would go by the suffix,
    and sugarize tells a file's kind by its bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
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

    def __init__(self, path, optimization: str = "all", model_format: str = "ONNX", threads: int | None = None,
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


# OpenVINO's CPU plugin cannot be stopped mid-run (``InferRequest.cancel`` does not stop a Loop,
# and the process cannot exit while it runs): a file whose loops could run longer than a
# parity run should is refused before it runs. No graph sugarize exports has a loop.
MAX_LOOP_ITERATIONS = 10**6


def _check_loops(model, name: str, bound: int = MAX_LOOP_ITERATIONS, outer: int = 1) -> None:
    """InputError if a Loop or TensorIterator in ``model`` (nested ones multiplied) may iterate
    more than ``bound`` times: its trip count is not a constant, is -1 (until a condition), or is
    larger."""
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Loop", "TensorIterator"):
            continue
        trips = None
        if kind == "TensorIterator":
            trips = 1  # over a static axis of an input: bounded by the input's size
        else:
            src = op.input_value(0).get_node()
            if src.get_type_name() == "Constant":
                trips = int(np.asarray(src.get_data()).reshape(-1)[0])
        if trips is None or trips < 0 or outer * trips > bound:
            raise InputError(f"{name} holds a {kind} whose trip count is "
                             f"{'not a constant' if trips is None else trips}: OpenVINO cannot be stopped mid-run, "
                             f"so sugarize runs no loop over {bound:,} iterations in it; run the file in onnxruntime "
                             "(--runtime onnxruntime, bounded by its run timeout) if it is an ONNX file")
        body = op.get_function()
        if body is not None:
            _check_loops(body, name, bound, outer * max(trips, 1))


class OpenVinoRunner:
    """An ONNX file in OpenVINO's CPU plugin; ``precision`` None keeps the plugin's default."""

    def __init__(self, path, precision: str | None = None, threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise InputError("--runtime openvino needs the openvino extra: pip install 'sugarize[openvino]'") from None
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(str(path))
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot read {path}: {first_line(exc)}") from exc
        _check_loops(model, Path(str(path)).name)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
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

"""Every deploy target on the demo and fixture models: export time, artifact bytes, latency.

    python benchmarks/edge.py [--repeats 200] [--out benchmarks/results]

For each model (the demo's 10x32 MLP at batch 32, and the fixtures: a CNN with BatchNorm and
residual adds, the 10-layer dead MLP, a 2-block transformer) and each registered target (ONNX,
ORT format, ExecuTorch with XNNPACK, OpenVINO IR), the SUGAR model is stripped and exported with the library's target
(``deploy.targets``), the original ReLU model exported the same way, and:
- export seconds (the stripped model, once; torch.export and lowering included),
- artifact bytes (with companions: OpenVINO's .bin), stripped vs original, and whether they are
  byte-identical,
- structure identical (``artifact.compare_structures``) and parity max abs vs the original,
- median latency of one run in the target's runtime (1 thread where the runtime takes a
  setting: onnxruntime, OpenVINO's CPU plugin at f32; ExecuTorch's XNNPACK threadpool is its
  own), the stripped and the original artifact interleaved.
Writes ``edge.md`` and ``edge.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import finish, machine, machine_line, md_table  # noqa: E402

import sugarize  # noqa: E402


def models():
    from helpers import load_fixture

    from sugarize.app.demo import DeepMLP

    torch.manual_seed(0)
    yield "demo MLP (10x32, batch 32)", DeepMLP(10, 32).eval(), (torch.randn(32, 64),)
    for name in ("tiny_resnet", "dead_mlp", "relu_transformer"):
        mod = load_fixture(name)
        torch.manual_seed(0)
        yield name, mod.build_model().eval(), mod.example_inputs()


def latencies(runners, arrays, repeats: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        for r in runners:
            r.run(arrays)
    times = [[] for _ in runners]
    for _ in range(repeats):
        for i, r in enumerate(runners):
            t = time.perf_counter()
            r.run(arrays)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    from sugarize.deploy.artifact import compare_structures
    from sugarize.deploy.runtimes import OpenVinoRunner, OrtRunner
    from sugarize.deploy.targets import TARGETS, ExportOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, data = [], {"machine": machine(), "rows": []}
    for label, model, example in models():
        stripped = sugarize.strip(sugarize.sugarize(model))
        arrays = [t.numpy() for t in example]
        for name in list(TARGETS):
            target = TARGETS[name]
            with tempfile.TemporaryDirectory() as tmp:
                a, b = Path(tmp) / f"stripped{target.suffix}", Path(tmp) / f"original{target.suffix}"
                t0 = time.perf_counter()
                target.export(stripped, a, example, ExportOptions())
                export_s = time.perf_counter() - t0
                target.export(model, b, example, ExportOptions())
                rep = compare_structures(target.describe(a), target.describe(b))
                parity = sugarize.verify(a, model, example, reference_artifact=b, batches=2)
                if name == "pte":
                    runners = [target.runner(a), target.runner(b)]
                elif name == "openvino":  # one inference thread, f32 (the precision parity judges)
                    runners = [OpenVinoRunner(p, "f32", threads=1) for p in (a, b)]
                else:  # one intra-op thread, as on a phone's single big core
                    fmt = "ORT" if name == "ort" else "ONNX"
                    runners = [OrtRunner(p, model_format=fmt, threads=1) for p in (a, b)]
                lat = latencies(runners, arrays, args.repeats)
                size = [p.stat().st_size + sum(c.stat().st_size for c in target.companions(p, ExportOptions())
                                               if c.is_file()) for p in (a, b)]
                row = {"model": label, "target": name, "export_s": export_s, "bytes_stripped": size[0],
                       "bytes_original": size[1], "byte_identical": rep.identical_bytes,
                       "structure_identical": rep.passed, "parity_passed": parity.passed,
                       "max_abs": parity.max_abs, "latency_ms_stripped": 1e3 * lat[0],
                       "latency_ms_original": 1e3 * lat[1], "runtime": parity.runtime}
            data["rows"].append(row)
            rows.append([label, f"{target.title}", f"{export_s:.1f}",
                         f"{row['bytes_stripped']:,} / {row['bytes_original']:,}",
                         "yes" if row["byte_identical"] else "no",
                         "IDENTICAL" if rep.passed else f"DIFFERS: {rep.first_difference}",
                         f"{'PASS' if parity.passed else 'FAIL'} ({parity.max_abs:.1e})",
                         f"{row['latency_ms_stripped']:.3f} / {row['latency_ms_original']:.3f}"])
            print(rows[-1], flush=True)
    md = ["# Deploy targets: export, size, structure, parity, latency", "",
          f"Machine: {machine_line(data['machine'])}. `python benchmarks/edge.py` "
          f"(--repeats {args.repeats}; latency is the median single run, stripped / original, "
          "interleaved; onnxruntime and OpenVINO (CPU plugin, f32) at 1 thread, ExecuTorch's XNNPACK with its own "
          "threadpool; bytes include companions, OpenVINO's .bin).", "",
          md_table(["model", "target", "export s", "bytes stripped / original", "byte-identical", "structure",
                    "parity (max abs)", "latency ms stripped / original"], rows), ""]
    return finish("edge", md, data, start, args.out)


if __name__ == "__main__":
    sys.exit(main())

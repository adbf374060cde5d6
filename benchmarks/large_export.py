"""A model over protobuf's 2 GiB, converted, exported and verified as a user would.

    python benchmarks/large_export.py [--layers 10] [--width 8192] [--out benchmarks/results]

Writes ``large_export.md`` and ``.json``: an MLP of ``--layers`` float32 ``Linear(width, width)``
with ReLUs (10 x 8192^2: 2.5 GiB of weights), ``sugarize``, ``strip`` in place, then
``export_onnx`` with its defaults (the weights go to ``model.onnx.data`` by themselves: they are
over 1.5 GiB), ``onnx.checker`` on the pair, one seeded parity batch in onnxruntime against the
stripped and the original model, and the structure check against the original's export
(nodes, initializer shapes, and onnxruntime's optimised graphs, written and compared). Sizes and times of each step, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from _common import finish, machine, machine_line, md_table  # noqa: E402

import sugarize  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    times = {}

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        times[name] = time.perf_counter() - t
        print(f"{name}: {times[name]:.1f} s", flush=True)
        return value

    def build():
        torch.manual_seed(0)
        layers = []
        for _ in range(args.layers):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        with torch.no_grad():
            for m in layers[::2]:
                m.weight.mul_(0.5)  # keep activations in range through many layers
        return nn.Sequential(*layers).eval()

    model = timed("build", build)
    original = build()  # the user's ReLU model, for the structure check
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = (torch.randn(2, args.width),)
    sm = timed("sugarize (copy=False)", lambda: sugarize.sugarize(model, copy=False))
    plain = timed("strip (copy=False)", lambda: sugarize.strip(sm, copy=False))
    with tempfile.TemporaryDirectory(dir=str(HERE)) as tmp:
        path = Path(tmp) / "large.onnx"
        res = timed("export_onnx (defaults)", lambda: sugarize.export_onnx(plain, path, x))
        files = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
        ref = Path(tmp) / "ref" / "original.onnx"
        ref.parent.mkdir()
        timed("export the original (for the structure check)", lambda: sugarize.export_onnx(original, ref, x))
        report = timed("verify (1 batch, onnxruntime, structure incl. ORT_ENABLE_ALL)", lambda: sugarize.verify(
            path, original, x, stripped=plain, reference_artifact=ref, batches=1, atol=1e-4, rtol=1e-4))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = machine()
    data = {"machine": m, "layers": args.layers, "width": args.width, "weight_bytes": weight_bytes, "files": files,
            "external_data": str(res.external_data), "notes": res.notes, "relu_ops": res.op_types.count("Relu"),
            "parity_passed": report.passed, "structure_passed": bool(report.structure and report.structure.passed), "max_abs": report.max_abs, "times_s": times, "peak_rss_bytes": peak}
    md = ["# Exporting a model over 2 GiB", "", f"`python benchmarks/large_export.py` on {machine_line(m)}.", "",
          f"MLP of {args.layers} x Linear({args.width}, {args.width}) + ReLU: {weight_bytes / 2**30:.2f} GiB of "
          "float32 weights, over protobuf's 2 GiB limit for one message.", "",
          md_table(["file", "bytes"], [[k, f"{v:,}"] for k, v in sorted(files.items())]), "",
          md_table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in times.items()]), "",
          f"Export notes: {'; '.join(res.notes)}. {res.op_types.count('Relu')} Relu nodes; parity "
          f"{'PASS' if report.passed else 'FAIL'} (max abs {report.max_abs:.2e}); structure "
          f"{'IDENTICAL' if report.structure and report.structure.passed else 'DIFFERS'}. Peak RSS {peak / 2**30:.1f} GiB.",
          ""]
    return finish("large_export", md, data, start, args.out)


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the benchmark scripts: machine description, timing, and writing results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def machine_line(m: dict) -> str:
    gpu = m["cuda"] or "no GPU"
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {gpu}; "
            f"Python {m['python']}, torch {m['torch']}; {m['date']}")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), 0.0
    return statistics.mean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def write(name: str, markdown: str, data: dict, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Writes ``<name>.md`` and ``<name>.json`` (atomically) and returns their paths."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".md", markdown), (".json", json.dumps(data, indent=2, default=str) + "\n")):
        path = out / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def ratio_stats(times: list[float], base: list[float]) -> dict:
    """The median over rounds of ``times[i] / base[i]`` and its quartiles (paired rounds)."""
    ratios = sorted(a / b for a, b in zip(times, base))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"ratio": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2]}


def interleaved(steps: dict, rounds: int, baseline: str) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """Times each of ``steps`` (name -> callable) ``rounds`` times, interleaved with the order
    rotated every round (drift and position hit all alike). Returns, per name, the median step
    in ms and ``ratio_stats`` against ``baseline`` in the same rounds; and the raw times."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    out = {n: {"step_ms": 1e3 * statistics.median(times[n]), **ratio_stats(times[n], times[baseline])}
           for n in names}
    return out, times


def finish(name: str, md: list[str], data: dict, start: float, out: Path | None) -> int:
    """Adds the total time, writes ``<name>.md`` and ``.json``, prints the markdown."""
    total = time.perf_counter() - start
    md.append(f"Total: {total:.0f} s.")
    data["seconds"] = total
    md_path, _ = write(name, "\n".join(md) + "\n", data, out)
    print("\n".join(md))
    print(f"wrote {md_path}")
    return 0

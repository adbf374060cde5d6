"""Installed like users install it: the wheel carries everything the demo needs, and runs from
a directory outside the repository."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from helpers import ROOT


def test_the_wheel_installs_and_runs_the_quick_demo_outside_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("sugarize-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sugarize/training/data/digits.npz" in names and "sugarize/app/cli.py" in names
    assert not any(n.startswith(("tests/", "fixtures/", "benchmarks/")) for n in names)

    # A fresh environment: the wheel alone in its own site-packages; the dependencies (torch, onnx, ...)
    # borrowed from this interpreter's site-packages by a .pth line, which does not run this
    # checkout's editable-install hook, so `import sugarize` can only find the wheel's copy.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    res = subprocess.run([str(python), "-c", "import sugarize; print(sugarize.__file__)"], cwd=outside,
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip().startswith(str(site)), res.stdout
    res = subprocess.run([str(python), "-m", "sugarize", "demo", "--quick", "--out", str(outside / "demo")],
                         cwd=outside, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "parity PASS" in res.stdout and (outside / "demo" / "sugar_stripped.onnx").exists()

"""Outputs are atomic and checked: a kill, a failed check or a race never leaves a half-written
or unchecked file, and outputs get the mode a plain open() gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sugarize
from sugarize.files.fsutil import TEMP_MARK, atomic_path

from helpers import MODELS

SUGARIZE = [sys.executable, "-m", "sugarize"]
RESNET = MODELS / "tiny_resnet.py"


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{TEMP_MARK}*.tmp"))


@pytest.fixture()
def previous(tmp_path):
    """An existing, good export: (path, its bytes)."""
    out = tmp_path / "model.onnx"
    res = subprocess.run([*SUGARIZE, "export", str(RESNET), "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return out, out.read_bytes()


def _start_and_wait_for_temp(args, folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([*SUGARIZE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not temps(folder):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.02)
    return proc


def test_kill_9_during_export_force_keeps_the_previous_output_and_the_next_run_cleans_up(previous, tmp_path):
    out, before = previous
    proc = _start_and_wait_for_temp(["export", RESNET, "-o", out, "--force"], tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == before  # the previous output, byte for byte
    assert temps(tmp_path), "the kill should have left a temporary file behind"
    res = subprocess.run([*SUGARIZE, "export", str(RESNET), "-o", str(tmp_path / "other.onnx")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert temps(tmp_path) == []  # the next run found and removed the stale one
    assert out.read_bytes() == before


def test_sigterm_during_export_removes_its_temporary_file(previous, tmp_path):
    out, before = previous
    proc = _start_and_wait_for_temp(["export", RESNET, "-o", out, "--force"], tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and b"Traceback" not in stderr, stderr
    assert temps(tmp_path) == [] and out.read_bytes() == before


def test_a_failed_check_with_force_leaves_the_previous_output_untouched(previous, tmp_path):
    """Weights holding NaN: the export warns, parity fails (exit 1), nothing replaces the old file."""
    out, before = previous
    model = sugarize.load_model(str(RESNET)).model
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() > 1).view(-1)[0] = float("nan")
    weights = sugarize.save_weights(model, tmp_path / "nan.safetensors")
    res = subprocess.run([*SUGARIZE, "export", str(RESNET), "--weights", str(weights), "-o", str(out), "--force"],
                         capture_output=True, text=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "NOT written" in res.stdout and "NaN" in res.stdout
    assert out.read_bytes() == before and temps(tmp_path) == []


def test_concurrent_converts_to_one_new_path_have_one_winner(tmp_path):
    target = tmp_path / "ck.safetensors"
    procs = [subprocess.Popen([*SUGARIZE, "convert", str(RESNET), "-o", str(target)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already exists" in loser and len(loser.strip().splitlines()) == 1
    assert temps(tmp_path) == []
    from sugarize.files.checkpoint import read_recipe

    read_recipe(target)  # the winner's file, whole


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "out.bin", force=False) as tmp:
            tmp.write_bytes(b"x")
        weights = sugarize.save_weights({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for path in (tmp_path / "out.bin", Path(weights)):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)


def test_an_exception_inside_removes_the_temporary_file_and_keeps_the_target(tmp_path):
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, force=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and temps(tmp_path) == []


def test_atomic_folder_places_a_file_and_its_companion_or_neither(tmp_path):
    from sugarize.files.fsutil import atomic_folder

    target = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError):
        with atomic_folder(target, force=False, companions=(".data",)) as folder:
            (folder / "m.onnx").write_text("graph")
            (folder / "m.onnx.data").write_text("weights")
            raise RuntimeError("a check failed")
    assert list(tmp_path.iterdir()) == []  # neither, and no temporary folder
    with atomic_folder(target, force=False, companions=(".data",)) as folder:
        (folder / "m.onnx").write_text("graph")
        (folder / "m.onnx.data").write_text("weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert target.read_text() == "graph" and (tmp_path / "m.onnx.data").read_text() == "weights"

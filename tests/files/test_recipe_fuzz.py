"""Recipe fuzzing: every field of a real checkpoint's recipe mutated (missing, wrong type, extra
key, nested, huge); every command that reads it answers exit 0 or a one-line exit 2, never 3."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sugarize.app.cli import app

runner = CliRunner()
MLP = """import torch, torch.nn as nn
def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
def example_inputs():
    return (torch.randn(2, 8),)
"""


def _paths(obj, prefix=()):
    """Every key path in a JSON tree (dict keys and list indexes, the first two of a list)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:2]):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _deep(n: int):
    out = []
    for _ in range(n):
        out = [out]
    return out


MUTATIONS = {"missing": None, "none": None, "int": 7, "negative": -1, "float": 1.5, "string": "x",
             "list": [], "dict": {}, "bool": True, "deep": "DEEP", "extra": "EXTRA"}


def _mutate(recipe, path, how):
    import copy

    r = copy.deepcopy(recipe)
    parent = r
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if how == "missing":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif how == "extra":
        target = parent[key]
        if isinstance(target, dict):
            target["unexpected_field"] = 1
        else:
            return None
    elif how == "deep":
        parent[key] = _deep(5000)
    else:
        parent[key] = MUTATIONS[how]
    return r


def _write(src, dst, recipe):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
    try:
        meta["sugarize"] = json.dumps(recipe)
    except (RecursionError, ValueError):
        meta["sugarize"] = "[" * 100_000 + "]" * 100_000  # as deep as a file can be
    save_file(load_file(str(src)), str(dst), metadata=meta)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = root / "m.py"
    model.write_text(MLP)
    ck = root / "m.safetensors"
    assert runner.invoke(app, ["convert", str(model), "-o", str(ck)]).exit_code == 0
    from sugarize.files.checkpoint import read_recipe

    return model, ck, read_recipe(ck)


def test_every_field_mutated_is_exit_0_or_one_line_exit_2(made, tmp_path):
    """``inspect`` shows the recorded report (it runs nothing); opening the checkpoint with its
    model file (what convert, export, verify, finetune and audit do first) rebuilds the model
    and its inputs from the recipe. Each is exit 0 or one line and exit 2 for every mutation."""
    import sugarize
    from sugarize.app.workflows import open_source, resolve_inputs

    model, ck, recipe = made
    seen, failures = 0, []
    for path in _paths(recipe):
        for how in MUTATIONS:
            mutated = _mutate(recipe, path, how)
            if mutated is None:
                continue
            bad = tmp_path / "bad.safetensors"
            _write(ck, bad, mutated)
            res = runner.invoke(app, ["inspect", str(bad)])
            lines = res.stderr.strip().splitlines() if res.exit_code else []
            if res.exit_code not in (0, 2) or (res.exit_code == 2 and len(lines) != 1) or "Traceback" in res.output:
                failures.append((path, how, "inspect", res.exit_code, res.output[-300:]))
            try:
                src = open_source(str(bad), model=str(model))
                inputs = resolve_inputs(src.inputs, None, src.label)
                sugarize.report_of(src.sugar)
                src.sugar(*inputs)
            except sugarize.SugarizeError as exc:
                if exc.exit_code != 2:
                    failures.append((path, how, "open", exc.exit_code, str(exc)[:300]))
            except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
                failures.append((path, how, "open", type(exc).__name__, str(exc)[:300]))
            seen += 1
    assert seen > 100
    assert not failures, failures[:6]


def test_a_recipe_larger_than_any_recipe_is_refused_before_it_is_parsed(made, tmp_path):
    model, ck, recipe = made
    import copy

    huge = copy.deepcopy(recipe)
    huge["report"]["notes"] = ["x" * (9 << 20)]
    bad = tmp_path / "huge.safetensors"
    _write(ck, bad, huge)
    res = runner.invoke(app, ["inspect", str(bad)])
    assert res.exit_code == 2 and "more than a recipe ever holds" in res.stderr


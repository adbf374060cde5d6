"""`sugarize sweep`: which surrogate for this model, called per seed against ReLU."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import sugarize
from sugarize.app.cli import app
from sugarize.training.digits import load_digits_split, loader
from sugarize.training.sweep import parse_candidates, sweep
from sugarize.training.train import DataSpec, load_data

from helpers import FIXTURES, MODELS, load_fixture

runner = CliRunner()
DEAD = str(MODELS / "dead_mlp.py")
DIGITS = str(FIXTURES / "digits_data.py")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _digits() -> DataSpec:
    (xt, yt), (xv, yv) = load_digits_split()
    return DataSpec(lambda: loader(xt, yt, 64, shuffle=True), lambda: loader(xv, yv, 512),
                    torch.nn.functional.cross_entropy)


@pytest.fixture(scope="module")
def dead_sweep():
    model = load_fixture("dead_mlp").build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sweep(model, _digits(), candidates="bsilu,nelu", seeds=3, epochs=20, lr=0.01)  # the demo's case 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    return result


def test_on_a_mostly_dead_network_a_sugar_surrogate_beats_relu_and_is_called_better(dead_sweep):
    r = dead_sweep
    assert r.metric == "val accuracy" and r.dead_start > 0.3
    by = {s.name: s for s in r.summaries}
    assert r.summaries[0].name == "relu" and r.summaries[0].verdict == "baseline"
    assert by["bsilu"].verdict == "better" and by["bsilu"].better_seeds == 3
    assert by["bsilu"].metric_mean > by["relu"].metric_mean + 0.2
    assert r.summaries[1].name == "bsilu"  # ranked first
    assert by["bsilu"].revived_mean > 0 and by["relu"].revived_mean == 0  # ReLU cannot revive a dead unit
    assert r.winner is not None and r.winner.name == "bsilu"
    cfg = r.winner_config()
    assert cfg.surrogate == "bsilu" and dict(cfg.params) == {"alpha": 1.67}
    # the runs behind the table: 3 candidates x 3 seeds, each 20 epochs of the digits' batches
    per_epoch = len(_digits().train_loader())
    assert len(r.runs) == 9 and {run.steps for run in r.runs} == {20 * per_epoch}
    relu_runs = {run.seed: run.metric for run in r.runs if run.candidate == "relu"}
    diffs = [run.metric - relu_runs[run.seed] for run in r.runs if run.candidate == "bsilu"]
    assert by["bsilu"].diff_mean == pytest.approx(sum(diffs) / 3)


def test_on_a_healthy_network_with_a_tiny_budget_the_differences_are_within_noise():
    from sugarize.app.demo import DeepMLP

    model = DeepMLP(4, 32)  # He init, zero biases: healthy
    result = sweep(model, _digits(), candidates="bsilu,nelu:alpha=0.1,bsilu:neg", seeds=3, steps=2, lr=1e-4)
    assert [s.verdict for s in result.summaries[1:]] == ["within noise"] * 3
    assert result.winner is None and "do not convert" in result.advice
    assert {run.steps for run in result.runs} == {2}


def test_candidate_specs():
    names = [c.name for c in parse_candidates("bsilu, nelu:alpha=0.1, bsilu:alpha=1:neg, relu")]
    assert names == ["bsilu", "nelu:alpha=0.1", "bsilu:alpha=1:neg"]
    every = parse_candidates("all")
    assert {c.surrogate for c in every} == set(sugarize.list_surrogates())
    assert {dict(c.params)["alpha"] for c in every if c.surrogate == "nelu" and not c.negative_only} == \
        {0.01, 0.05, 0.1, 0.2, 1.0}
    assert any(c.negative_only for c in every) and len(every) == len(set(every))
    for bad in ("bogus", "nelu:alpha", "nelu:beta=1", "bsilu:alpha=x", "", "relu"):
        with pytest.raises(sugarize.SugarizeError):
            parse_candidates(bad)


def test_a_hugging_face_model_sweeps_like_a_cnn():
    model = load_fixture("hf_llama").build_model()
    data = load_data(FIXTURES / "lm_data.py")
    cfg = sugarize.SugarConfig(relufy=("silu",))
    result = sweep(model, data, candidates="bsilu,nelu", seeds=2, steps=2, lr=1e-3, config=cfg)
    assert result.metric == "val loss" and not result.higher_is_better
    assert [s.name for s in result.summaries][0] == "relu"
    assert {s.name for s in result.summaries} == {"relu", "bsilu", "nelu"}
    assert all(not run.diverged and run.steps == 2 and run.metric == run.val_loss for run in result.runs)
    # the SUGAR runs trained a converted model: their losses differ from ReLU's on the same seed
    relu = {run.seed: run.metric for run in result.runs if run.candidate == "relu"}
    assert any(run.metric != relu[run.seed] for run in result.runs if run.candidate == "bsilu")
    assert result.units > 0  # the relufied gate sites are audited


def test_cli_sweep_writes_the_winner_and_convert_config_reads_it_back(tmp_path):
    winner = tmp_path / "winner.json"
    plot = tmp_path / "sweep.png"
    res = run("sweep", DEAD, "--data", DIGITS, "--candidates", "nelu:alpha=0.1,bsilu", "--seeds", "3",
              "--epochs", "20", "--lr", "0.01", "-o", winner, "--plot", plot, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["winner"] == "bsilu" and data["config_file"] == str(winner)
    assert json.loads(winner.read_text()) == data["winner_config"]
    assert plot.stat().st_size > 0
    ck = tmp_path / "ck.safetensors"
    res = run("convert", DEAD, "--config", winner, "-o", ck, "--json")
    assert res.exit_code == 0, res.output
    from sugarize.files.checkpoint import read_recipe

    assert read_recipe(ck)["config"] == sugarize.SugarConfig.from_dict(data["winner_config"]).to_dict()
    text = run("sweep", DEAD, "--data", DIGITS, "--candidates", "bsilu", "--seeds", "1", "--steps", "1",
               "-o", tmp_path / "none.json")
    assert text.exit_code == 0, text.output
    assert "do not convert" in text.stdout and "no config written" in text.stdout
    assert not (tmp_path / "none.json").exists()


@pytest.mark.parametrize("args, says", [
    (["--candidates", "bogus"], "bogus"),
    (["--candidates", "nelu:alpha"], "NAME=VALUE"),
    (["--seeds", "0"], "--seeds"),
    (["--steps", "0"], "--steps"),
    (["--optimizer", "adam"], "adam"),
    (["--plot", "x.txt"], "plot"),
])
def test_cli_sweep_bad_options_are_exit_2_in_one_line(tmp_path, args, says):
    res = run("sweep", DEAD, "--data", DIGITS, "-o", tmp_path / "w.json", *args)
    assert res.exit_code == 2, res.output
    assert says in res.output and "Traceback" not in res.output
    assert not (tmp_path / "w.json").exists()


def test_cli_sweep_bad_files_are_exit_2_before_any_training(tmp_path):
    existing = tmp_path / "w.json"
    existing.write_text("{}")
    res = run("sweep", DEAD, "--data", DIGITS, "-o", existing)
    assert res.exit_code == 2 and "--force" in res.output
    assert existing.read_text() == "{}"
    res = run("sweep", DEAD, "--data", DIGITS, "-o", DEAD, "--force")
    assert res.exit_code == 2 and "is the input" in res.output
    res = run("sweep", DEAD, "--data", tmp_path / "missing.py", "-o", tmp_path / "x.json")
    assert res.exit_code == 2 and "not found" in res.output


def test_cli_convert_config_refuses_a_bad_file_and_conflicting_flags(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(sugarize.SugarConfig(surrogate="nelu").to_json())
    res = run("convert", DEAD, "--config", good, "--surrogate", "elu", "-o", tmp_path / "a.safetensors")
    assert res.exit_code == 2 and "--surrogate" in res.output
    for text, says in (("{not json", "not JSON"), ('{"surrogate": 3}', "surrogate"), ('{"bogus": 1}', "bogus"),
                       ("[1, 2]", "mapping")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        res = run("convert", DEAD, "--config", bad, "-o", tmp_path / "b.safetensors")
        assert res.exit_code == 2, res.output
        assert says in res.output and len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.safetensors"))


def test_revived_units_not_counted_are_none_not_a_hidden_minus_one():
    """#30: a run whose sites differ from the original's has revived=None, and a candidate with no
    counted run has revived_mean None (the CLI shows "n/a"), never -1 averaged as 0."""
    from sugarize.training.sweep import RELU, RunResult, _summaries, parse_candidates

    cand = parse_candidates("bsilu")[0]
    runs = [RunResult(RELU.name, s, 0.5, 1.0, 0.5, 0.1, 0, 1, 0.1) for s in (0, 1)]
    runs += [RunResult(cand.name, 0, 0.6, 0.9, 0.6, 0.1, None, 1, 0.1),
             RunResult(cand.name, 1, 0.6, 0.9, 0.6, 0.1, None, 1, 0.1)]
    relu, bsilu = _summaries([RELU, cand], runs, True, 0.0)
    assert relu.revived_mean == 0 and bsilu.revived_mean is None
    runs[3] = RunResult(cand.name, 1, 0.6, 0.9, 0.6, 0.1, 4, 1, 0.1)  # one counted run: its figure alone
    assert _summaries([RELU, cand], runs, True, 0.0)[1].revived_mean == 4


def test_the_sweep_table_fits_80_columns_and_keeps_every_candidate_name_whole(tmp_path):
    names = ["nelu:alpha=0.1", "nelu:alpha=0.1:neg", "bsilu:alpha=1.5:neg"]
    res = run("sweep", DEAD, "--data", DIGITS, "--candidates", ",".join(names), "--seeds", "1", "--steps", "2",
              "-o", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    rows = {line.split()[0] for line in lines if line.strip()}
    assert set(names) <= rows, res.output  # each name whole, on its own row
    assert "…" not in res.output  # nothing cut

"""Which surrogate for this model? Short fine-tunes of plain ReLU and of each candidate surrogate
from the same weights, on several seeds, each compared seed by seed with ReLU.

A seed sets the data order (and any dropout) of one fine-tune; every candidate of a seed starts
from the same weights and sees the same batches as that seed's ReLU run, so the per-seed
difference ``candidate - ReLU`` isolates the surrogate. The verdict on those differences:

- **better** / **worse**: their mean is larger than the metric's resolution (one validation
  sample, for accuracy) and a paired t-test over the seeds rejects "no difference" at 95 %
  (two-sided; with every seed's difference the same and non-zero, the sign decides);
- **within noise**: otherwise, and always with one seed (no noise estimate).

The winner is the best candidate called "better"; when none is, the advice is not to convert.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch.nn as nn

from ..errors import DivergenceError, ParameterError
from ..passes.config import SugarConfig
from .train import DataSpec, checked_batches, call_loader, evaluate, finetune

__all__ = ["Candidate", "default_candidates", "parse_candidates", "sweep", "SweepResult", "RunResult",
           "CandidateSummary", "BSILU_ALPHAS", "NELU_ALPHAS"]

BSILU_ALPHAS = (0.5, 1.0, 1.67, 3.0)  # the paper's default 1.67, and around it
NELU_ALPHAS = (0.01, 0.05, 0.1, 0.2, 1.0)  # the paper's 0.01 / 0.1, and public implementations' defaults

# two-sided 95 % critical values of Student's t, by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _t95(df: int) -> float:
    return next((v for k, v in sorted(_T95.items()) if df <= k), 1.96)


@dataclass(frozen=True)
class Candidate:
    """One surrogate setting to try; ``surrogate=None`` is the plain ReLU baseline."""

    name: str
    surrogate: str | None = None
    params: tuple[tuple[str, float], ...] = ()
    negative_only: bool = False

    def config(self, base: SugarConfig) -> SugarConfig:
        """``base`` (sites, relufy, save mode) with this candidate's surrogate."""
        return replace(base, surrogate=self.surrogate, params=dict(self.params), negative_only=self.negative_only)


RELU = Candidate("relu")


def _candidate(surrogate: str, params: dict | None = None, negative_only: bool = False) -> Candidate:
    from ..method.surrogates import get_surrogate, resolve_params

    entry = get_surrogate(surrogate)  # UnknownSurrogateError names the registry
    values = resolve_params(surrogate, params or {})
    given = {k: v for k, v in values.items() if params and k in params and v != entry.defaults().get(k)}
    name = surrogate + "".join(f":{k}={v:g}" for k, v in given.items()) + (":neg" if negative_only else "")
    return Candidate(name, surrogate, tuple(sorted(values.items())), negative_only)


def default_candidates() -> list[Candidate]:
    """The registry's surrogates at their defaults, the B-SiLU and NeLU alpha grids, and the
    negative-only variants of B-SiLU and NeLU."""
    from ..method.surrogates import list_surrogates

    out = [_candidate(name) for name in list_surrogates()]
    out += [_candidate("bsilu", {"alpha": a}) for a in BSILU_ALPHAS]
    out += [_candidate("nelu", {"alpha": a}) for a in NELU_ALPHAS]
    out += [_candidate("bsilu", negative_only=True), _candidate("nelu", negative_only=True)]
    return list(dict.fromkeys(out))  # the grids repeat the defaults


_GROUPS = {"all": None, "registry": "registry", "grid": "grid", "negative": "negative"}


def parse_candidates(spec: str | Sequence[str]) -> list[Candidate]:
    """Candidates from a spec: comma-separated items, each a surrogate name with optional
    ``:NAME=VALUE`` parameters and ``:neg`` (negative only), or a group: ``all`` (the default
    list), ``registry``, ``grid`` (the alpha grids), ``negative``. ``relu`` is always run.

    Example: ``"bsilu,nelu:alpha=0.1,bsilu:alpha=1:neg"``.

    Raises:
        ParameterError, UnknownSurrogateError: an item that is not a candidate.
    """
    from ..method.surrogates import list_surrogates

    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Candidate] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        word = item.lower()
        if word == "relu":
            continue  # the baseline, always run
        if word in _GROUPS:
            defaults = default_candidates()
            if word == "all":
                out += defaults
            elif word == "registry":
                out += [_candidate(n) for n in list_surrogates()]
            elif word == "grid":
                out += [c for c in defaults if c.surrogate in ("bsilu", "nelu") and not c.negative_only]
            else:
                out += [c for c in defaults if c.negative_only]
            continue
        name, *parts = item.split(":")
        params, negative_only = {}, False
        for part in parts:
            part = part.strip()
            if part.lower() in ("neg", "negative", "negative_only"):
                negative_only = True
                continue
            key, sep, value = part.partition("=")
            try:
                params[key.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep or not key.strip():
                raise ParameterError(f"candidate {item!r}: {part!r} is not NAME=VALUE or neg; write e.g. "
                                     "nelu:alpha=0.1 or bsilu:neg")
        out.append(_candidate(name.strip().lower(), params, negative_only))
    out = list(dict.fromkeys(out))
    if not out:
        raise ParameterError(f"--candidates {spec!r} names no surrogate; e.g. --candidates bsilu,nelu:alpha=0.1 "
                             "(relu, the baseline, is always run)")
    return out


@dataclass
class RunResult:
    """One fine-tune: a candidate on a seed."""

    candidate: str
    seed: int
    metric: float  # validation accuracy, or validation loss (``SweepResult.metric`` says which); NaN if diverged
    val_loss: float
    val_accuracy: float | None
    dead_end: float  # share of units that fire on no training input, after the fine-tune
    revived: int | None  # units dead at the start that fire at the end; None: not counted (the sites differ)
    steps: int
    seconds: float
    diverged: bool = False


@dataclass
class CandidateSummary:
    """A candidate over the seeds, and its paired comparison with ReLU (``diff``: candidate - ReLU,
    signed so that positive is better)."""

    name: str
    surrogate: str | None
    params: dict[str, float]
    negative_only: bool
    seeds: int
    metric_mean: float
    metric_std: float
    dead_end_mean: float
    revived_mean: float | None  # None where no run's revived units could be counted
    diff_mean: float
    diff_std: float
    better_seeds: int
    verdict: str  # "baseline", "better", "worse", "within noise", "diverged"
    diverged: int = 0


@dataclass
class SweepResult:
    metric: str  # "val accuracy" or "val loss"
    higher_is_better: bool
    start_metric: float  # the metric of the weights every fine-tune starts from
    dead_start: float
    dead_units_start: int
    units: int
    runs: list[RunResult]
    summaries: list[CandidateSummary]  # ReLU first, then best first
    winner: CandidateSummary | None
    advice: str
    base: SugarConfig
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def winner_config(self) -> SugarConfig | None:
        """The winner's conversion config (what ``sugarize convert --config`` reads); None if none won."""
        if self.winner is None:
            return None
        return replace(self.base, surrogate=self.winner.surrogate, params=dict(self.winner.params),
                       negative_only=self.winner.negative_only)

    def to_dict(self) -> dict:
        cfg = self.winner_config()
        return {"metric": self.metric, "higher_is_better": self.higher_is_better,
                "start_metric": self.start_metric, "dead_start": self.dead_start,
                "dead_units_start": self.dead_units_start, "units": self.units,
                "candidates": [asdict(s) for s in self.summaries], "runs": [asdict(r) for r in self.runs],
                "winner": self.winner.name if self.winner else None,
                "winner_config": cfg.to_dict() if cfg else None, "advice": self.advice,
                "seconds": self.seconds, "notes": list(self.notes)}


def _fires(report) -> list[list[int]]:
    return [list(s.fire_counts) for s in report.sites]


def _revived(start: list[list[int]], end: list[list[int]]) -> int | None:
    """Units dead at the start (fired on no input) that fire at the end; None if the sites differ."""
    if len(start) != len(end) or any(len(a) != len(b) for a, b in zip(start, end)):
        return None
    return sum(1 for a, b in zip(start, end) for u, v in zip(a, b) if u == 0 and v > 0)


def _steps_per_epoch(data: DataSpec) -> int | None:
    try:
        return len(call_loader(data.train_loader, "train_loader", data.path))
    except TypeError:
        return None


def _verdict(diffs: list[float], resolution: float) -> str:
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2 or abs(mean) <= resolution:
        return "within noise"
    sd = statistics.stdev(diffs)
    if sd == 0:
        return "better" if mean > 0 else "worse"
    t = mean / (sd / math.sqrt(n))
    if abs(t) < _t95(n - 1):
        return "within noise"
    return "better" if t > 0 else "worse"


def sweep(
    model: nn.Module,
    data: DataSpec,
    *,
    candidates: Iterable[Candidate] | str | None = None,
    seeds: int = 3,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    config: SugarConfig | None = None,
    capture: str = "auto",
    on_step: Callable[[int, int | None], None] | None = None,
    on_run: Callable[[RunResult], None] | None = None,
) -> SweepResult:
    """Fine-tunes ReLU and every candidate from ``model``'s weights on ``seeds`` seeds; ranks them.

    Args:
        model: the user's ReLU model (any capture path: fx, modules, run-time calls); not changed.
        data: a ``DataSpec`` (``load_data(path)``); validation on ``val_loader`` (the training
            batches if there is none).
        candidates: ``Candidate`` objects or a spec (``parse_candidates``); default: every one of
            ``default_candidates()``.
        seeds: fine-tunes per candidate (seeds 0 .. seeds-1).
        epochs, steps: the budget of each fine-tune: ``epochs`` passes over the data, or with
            ``steps`` that many optimizer steps (over as many epochs as it takes).
        lr, optimizer: as ``finetune`` takes them.
        config: the conversion's other options (sites, ``relufy``, save mode); its surrogate is
            replaced by each candidate's. With ``relufy``, the ReLU baseline is the model with
            those sites as plain ReLU.
        capture: the capture path, as ``sugarize`` takes it.
        on_step: called ``(steps done, steps in all or None)`` after every optimizer step.
        on_run: called with each finished fine-tune.

    Raises:
        ParameterError: a bad budget or candidate; DataFileError: the data file fails.
    """
    from ..passes.rewrite import sugarize

    _check_budget(seeds, epochs, steps)
    cands = _candidates_of(candidates)
    base = config or SugarConfig()
    started = time.perf_counter()
    setup = _prepare(model, data, base, capture, seeds, len(cands), epochs, steps)
    done = [0]

    def step(epoch, index):
        done[0] += 1
        if on_step:
            on_step(done[0], setup.total_steps)

    runs: list[RunResult] = []
    for seed in range(seeds):
        for cand in [RELU] + cands:
            m = copy.deepcopy(setup.start) if cand.surrogate is None else sugarize(
                model, config=cand.config(base), capture=capture)
            run = _run(cand, seed, m, data, setup, epochs, steps, lr, optimizer, step, done)
            runs.append(run)
            if on_run:
                on_run(run)
    summaries = _summaries([RELU] + cands, runs, setup.classification, setup.resolution)
    winner, advice = _advice(summaries, setup.metric, setup.classification, seeds)
    notes = list(setup.notes)
    if seeds < 2:
        notes.append("one seed gives no noise estimate: every verdict is 'within noise'; use --seeds 3 or more")
    if any(r.revived is None for r in runs if not r.diverged):
        notes.append("revived units are not counted where the converted model's sites differ from the original's")
    audit0 = setup.start_audit
    return SweepResult(setup.metric, setup.classification, setup.start_metric, audit0.dead_fraction, audit0.dead,
                       audit0.units, runs, summaries, winner, advice, base, time.perf_counter() - started, notes)


def _check_budget(seeds: int, epochs: int, steps: int | None) -> None:
    if seeds < 1:
        raise ParameterError(f"seeds={seeds}: run at least one seed (3 or more for a verdict)")
    if steps is not None and steps < 1:
        raise ParameterError(f"steps={steps} must be at least 1")
    if epochs < 1:
        raise ParameterError(f"epochs={epochs} must be at least 1")


def _candidates_of(candidates) -> list[Candidate]:
    """The candidates to sweep: the defaults, a spec string or ``Candidate`` objects."""
    if candidates is None:
        return default_candidates()
    if isinstance(candidates, str):
        return parse_candidates(candidates)
    return list(candidates)


@dataclass
class _Setup:
    """What every run of a sweep shares: the starting model and its audit, the validation data, the
    metric and its resolution, the step budget."""

    start: nn.Module
    start_audit: object
    start_fires: list[list[int]]
    val_data: object
    classification: bool
    metric: str
    start_metric: float
    resolution: float
    per_epoch: int | None
    total_steps: int | None
    notes: list[str]

    def train(self, data: DataSpec):
        return call_loader(data.train_loader, "train_loader", data.path)

    def val(self, data: DataSpec):
        return call_loader(self.val_data, "val_loader", data.path)


def _prepare(model, data: DataSpec, base: SugarConfig, capture: str, seeds: int, candidates: int,
             epochs: int, steps: int | None) -> _Setup:
    from ..passes.rewrite import sugarize
    from ..passes.strip import strip
    from .deadunits import audit

    notes = []
    # the baseline: the model itself, or with its relufied sites as plain ReLU
    start = strip(sugarize(model, config=base, capture=capture)) if base.relufy else copy.deepcopy(model)
    start_audit = audit(start, checked_batches(call_loader(data.train_loader, "train_loader", data.path),
                                               "train_loader()"))
    val_data = data.val_loader
    if val_data is None:
        notes.append("the data file has no val_loader(): the metric is measured on the training batches")
        val_data = data.train_loader
    classification = _is_classification(start, call_loader(val_data, "val_loader", data.path))
    start_loss, start_acc = evaluate(start, call_loader(val_data, "val_loader", data.path), data.loss_fn)
    val_size = _count(call_loader(val_data, "val_loader", data.path))
    per_epoch = _steps_per_epoch(data)
    budget = steps if steps is not None else (epochs * per_epoch if per_epoch is not None else None)
    return _Setup(start, start_audit, _fires(start_audit), val_data, classification,
                  "val accuracy" if classification else "val loss", start_acc if classification else start_loss,
                  1.0 / val_size if classification and val_size else 0.0, per_epoch,
                  budget * (candidates + 1) * seeds if budget is not None else None, notes)


def _run(cand: Candidate, seed: int, m: nn.Module, data: DataSpec, setup: _Setup, epochs: int, steps: int | None,
         lr: float, optimizer: str, step, done: list[int]) -> RunResult:
    """One fine-tune of ``m`` (a candidate's converted model, or the baseline's copy), evaluated."""
    from .deadunits import audit

    t0 = time.perf_counter()
    before = done[0]
    per_epoch = setup.per_epoch
    n_epochs = epochs if steps is None else (math.ceil(steps / per_epoch) if per_epoch else steps)
    try:
        finetune(m, data, epochs=n_epochs, max_steps=steps, lr=lr, optimizer=optimizer, seed=seed,
                 audit_dead=False, on_step=step, stop_on_collapse=False)  # a sweep measures collapses
    except DivergenceError:
        return RunResult(cand.name, seed, float("nan"), float("nan"), None, float("nan"), None,
                         done[0] - before, time.perf_counter() - t0, diverged=True)
    loss, acc = evaluate(m, setup.val(data), data.loss_fn)
    end = audit(m, checked_batches(setup.train(data), "train_loader()"))
    return RunResult(cand.name, seed, acc if setup.classification else loss, loss,
                     acc if setup.classification else None, end.dead_fraction,
                     _revived(setup.start_fires, _fires(end)), done[0] - before, time.perf_counter() - t0)


def _advice(summaries: list[CandidateSummary], metric: str, classification: bool,
            seeds: int) -> tuple[CandidateSummary | None, str]:
    """The winner (the candidate that beats ReLU beyond noise by the most), and what to do."""
    better = [s for s in summaries if s.verdict == "better"]
    winner = max(better, key=lambda s: s.diff_mean) if better else None
    if winner is not None:
        return winner, (f"{winner.name} beats ReLU beyond noise ({metric} {_signed(winner.diff_mean, classification)} "
                        f"per seed, better in {winner.better_seeds} of {winner.seeds} seeds): convert with it")
    return None, (f"no candidate beats ReLU beyond noise on {metric} with this budget ({seeds} seed(s)): do not "
                  "convert for this model, or sweep again with more steps or seeds")


def _signed(diff: float, classification: bool) -> str:
    return f"{100 * diff:+.2f} points" if classification else f"{-diff:+.4f}"


def _summaries(cands: list[Candidate], runs: list[RunResult], higher: bool, resolution: float):
    relu = {r.seed: r for r in runs if r.candidate == RELU.name}
    out = []
    for cand in cands:
        rs = [r for r in runs if r.candidate == cand.name]
        ok = [r for r in rs if not r.diverged]
        metrics = [r.metric for r in ok]
        diffs = [(r.metric - relu[r.seed].metric) * (1 if higher else -1) for r in ok
                 if not relu[r.seed].diverged]
        if cand.surrogate is None:
            verdict = "baseline"
        elif not ok or not diffs:
            verdict = "diverged"
        else:
            verdict = _verdict(diffs, resolution)
        nan = float("nan")
        out.append(CandidateSummary(
            cand.name, cand.surrogate, dict(cand.params), cand.negative_only, len(ok),
            statistics.mean(metrics) if metrics else nan,
            statistics.pstdev(metrics) if len(metrics) > 1 else 0.0,
            statistics.mean(r.dead_end for r in ok) if ok else nan,
            statistics.mean(counted) if (counted := [r.revived for r in ok if r.revived is not None]) else None,
            statistics.mean(diffs) if diffs else (0.0 if cand.surrogate is None else nan),
            statistics.pstdev(diffs) if len(diffs) > 1 else 0.0,
            sum(d > 0 for d in diffs), verdict, len(rs) - len(ok)))
    base, rest = out[0], out[1:]
    rest.sort(key=lambda s: (s.verdict == "diverged", -(s.diff_mean if s.diff_mean == s.diff_mean else -1e9)))
    return [base] + rest


def _is_classification(model: nn.Module, loader) -> bool:
    """Class labels (1-D integers) and logits of shape (batch, classes): accuracy is the metric."""
    import torch

    from ..modes import eval_mode

    for x, y in checked_batches(loader, "val_loader()"):
        if y.dim() != 1 or y.is_floating_point():
            return False
        with torch.no_grad(), eval_mode(model):
            out = model(x)
        return isinstance(out, torch.Tensor) and out.dim() == 2
    return False


def _count(loader) -> int:
    return sum(len(y) for _, y in checked_batches(loader, "val_loader()"))

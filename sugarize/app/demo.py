"""The built-in demonstration: SUGAR brings a ReLU model's dead units back.

On the bundled digits data (offline), two cases, each on several seeds:

1. **A trained model** (the realistic case): a deep plain MLP (no normalisation, He init)
   is trained with ReLU by AdamW at a high learning rate, the way units die in practice
   (5-20 % of them never fire again); from those same weights each variant is fine-tuned
   on the same budget: ReLU as is, SUGAR with B-SiLU and with NeLU (forward still ReLU), and
   swaps to LeakyReLU and GELU.
2. **A mostly dead model** (the case SUGAR exists for): the same MLP badly initialised,
   every hidden bias at ``dead_bias``, so that about 45 % of its units never fire and it
   predicts a single class; every variant is fine-tuned from it.

Validation accuracy and dead units (never positive on the training data) are measured, the
dead units after every epoch too (each run's ``dead_curve``: the revival, epoch by epoch).
Then the best SUGAR model of case 1 goes through strip -> ONNX -> onnxruntime parity.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..training.digits import load_digits_split, loader
from ..errors import DivergenceError
from ..options import DEFAULT_SAVE
from ..training.train import DataSpec, evaluate, finetune, seed_everything

__all__ = ["DemoConfig", "DeepMLP", "run_demo", "VARIANTS", "DEMO_FILES", "body_dead_fraction"]

# What the demo writes in its --out folder.
DEMO_FILES = ("demo.png", "sugar_stripped.onnx", "relu_original.onnx")


class DeepMLP(nn.Module):
    """A deep plain ReLU MLP without normalisation: prone to dying ReLUs."""

    def __init__(self, depth: int = 10, width: int = 32, inputs: int = 64, classes: int = 10,
                 act: Callable[[], nn.Module] = nn.ReLU):
        super().__init__()
        layers, w = [], inputs
        for _ in range(depth):
            layers += [nn.Linear(w, width), act()]
            w = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(w, classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.head(self.body(x))


@dataclass(frozen=True)
class DemoConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    depth: int = 10
    width: int = 32
    pretrain_epochs: int = 10
    pretrain_optimizer: str = "adamw"
    pretrain_lr: float = 0.01
    epochs: int = 15
    lr: float = 0.003
    momentum: float = 0.9
    batch_size: int = 64
    save: str = DEFAULT_SAVE  # what the SUGAR op keeps for the backward (exact by default)
    dead_case: bool = True  # also run case 2, the mostly dead model
    dead_bias: float = -0.75  # every hidden bias of case 2's initialisation
    dead_epochs: int = 20
    dead_lr: float = 0.01
    variants: tuple[str, ...] = ("ReLU", "SUGAR (default)", "SUGAR B-SiLU", "SUGAR NeLU", "LeakyReLU",
                                 "GELU")  # which to run


def _swap(model: nn.Module, act: Callable[[], nn.Module]) -> nn.Module:
    out = copy.deepcopy(model)
    for name, m in list(out.body.named_children()):
        if isinstance(m, nn.ReLU):
            out.body._modules[name] = act()
    return out


def _variants(save: str):
    from ..passes.rewrite import sugarize

    return {
        "ReLU": lambda m: copy.deepcopy(m),
        "SUGAR (default)": lambda m: sugarize(m, save=save),  # B-SiLU at dead units, ReLU's gradient elsewhere
        "SUGAR B-SiLU": lambda m: sugarize(m, "bsilu", save=save),  # the paper's form
        "SUGAR NeLU": lambda m: sugarize(m, "nelu", save=save),
        "LeakyReLU": lambda m: _swap(m, nn.LeakyReLU),
        "GELU": lambda m: _swap(m, nn.GELU),
    }


VARIANTS = ("ReLU", "SUGAR (default)", "SUGAR B-SiLU", "SUGAR NeLU", "LeakyReLU", "GELU")


@dataclass
class Run:
    variant: str
    seed: int
    accuracy: float
    dead: float
    model: nn.Module = field(repr=False)
    dead_curve: list[float] = field(default_factory=list)  # dead units before the fine-tune and after each epoch


@dataclass
class DemoResult:
    config: DemoConfig
    pretrained: list[tuple[float, float]]  # (accuracy, dead) per seed
    runs: list[Run]
    firing: dict[str, list[int]]
    export: dict | None = None
    seconds: float = 0.0
    dead_start: list[tuple[float, float]] = field(default_factory=list)  # case 2: (accuracy, dead) at init
    dead_runs: list[Run] = field(default_factory=list)  # case 2's fine-tuned variants

    def start(self, *, dead_case: bool = False) -> tuple[float, float]:
        """``(mean accuracy, mean dead share)`` over seeds of the model every variant starts from:
        the pretrained one (case 1), or the badly initialised one (case 2)."""
        points = self.dead_start if dead_case else self.pretrained
        return (sum(a for a, _ in points) / len(points), sum(d for _, d in points) / len(points))

    def paired(self, variant: str = "SUGAR (default)", against: str = "ReLU", *, dead_case: bool = False) -> dict:
        """Seed-by-seed differences ``variant - against`` (same starting weights per seed)."""
        by = {(r.variant, r.seed): r for r in (self.dead_runs if dead_case else self.runs)}
        pairs = [(by[(variant, s)], by[(against, s)]) for s in self.config.seeds
                 if (variant, s) in by and (against, s) in by]
        pairs = [(a, b) for a, b in pairs if a.accuracy == a.accuracy and b.accuracy == b.accuracy]
        n = len(pairs)
        return {
            "variant": variant, "against": against, "seeds": n,
            "accuracy": sum(a.accuracy - b.accuracy for a, b in pairs) / n if n else float("nan"),
            "dead": sum(a.dead - b.dead for a, b in pairs) / n if n else float("nan"),
            "accuracy_not_worse": sum(a.accuracy >= b.accuracy for a, b in pairs),
            "fewer_dead": sum(a.dead < b.dead for a, b in pairs),
        }

    def dead_curves(self, *, dead_case: bool = False) -> dict[str, list[float]]:
        """Per variant, dead units before the fine-tune and after each epoch, mean over seeds."""
        out = {}
        for v in VARIANTS:
            curves = [r.dead_curve for r in (self.dead_runs if dead_case else self.runs)
                      if r.variant == v and r.dead_curve and r.accuracy == r.accuracy]
            if curves:
                n = min(len(c) for c in curves)
                out[v] = [statistics.mean(c[i] for c in curves) for i in range(n)]
        return out

    def rows(self, *, dead_case: bool = False):
        """Mean and spread per variant over seeds (case 2's with ``dead_case``)."""
        out = []
        for v in VARIANTS:
            rs = [r for r in (self.dead_runs if dead_case else self.runs) if r.variant == v]
            if not rs:
                continue
            ok = [r for r in rs if r.accuracy == r.accuracy]
            if not ok:
                out.append({"variant": v, "accuracy_mean": float("nan"), "accuracy_std": 0.0,
                            "dead_mean": float("nan"), "dead_std": 0.0, "seeds": 0, "diverged": len(rs)})
                continue
            acc = [r.accuracy for r in ok]
            dead = [r.dead for r in ok]
            out.append({
                "variant": v, "accuracy_mean": statistics.mean(acc),
                "accuracy_std": statistics.pstdev(acc) if len(acc) > 1 else 0.0,
                "dead_mean": statistics.mean(dead), "dead_std": statistics.pstdev(dead) if len(dead) > 1 else 0.0,
                "seeds": len(ok), "diverged": len(rs) - len(ok),
            })
        return out


def _dead_fraction(model, x) -> float:
    from ..training.deadunits import audit

    return audit(model, [x]).dead_fraction


def body_dead_fraction(model: nn.Module, x: torch.Tensor) -> float:
    """The dead units of a ``DeepMLP`` (any variant: converted, swapped) on ``x``: the fraction of
    hidden units whose pre-activation (the output of a hidden ``Linear``, ``body.0``, ``body.2``...)
    is positive on no input. The audit's definition on this architecture, from one forward with
    hooks: the audit itself traces the model anew each call, 46 ms of the demo's 935 per-epoch
    curve points (``tests/app/test_demo.py`` holds the two equal on every variant)."""
    from ..modes import eval_mode

    fired: list[torch.Tensor] = []
    layers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("body.")]
    hooks = [m.register_forward_hook(lambda mod, args, out: fired.append((out > 0).any(0))) for m in layers]
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    units = sum(f.numel() for f in fired)
    return sum(int((~f).sum()) for f in fired) / units if units else 0.0


def _finetune_variant(model, name, seed, data, xt, val, epochs, lr, momentum):
    """(Run, dead-unit report) of one fine-tune; a diverged loss is a NaN row, not hidden. The
    audit runs at the end (the report, its firing counts); the curve in between, epoch by epoch,
    is ``body_dead_fraction``'s."""
    from ..training.deadunits import audit

    curve = [body_dead_fraction(model, xt)]  # before the fine-tune, then after each epoch

    def on_epoch(result):
        curve.append(body_dead_fraction(model, xt))

    try:
        finetune(model, data, epochs=epochs, lr=lr, momentum=momentum, seed=seed, audit_dead=False,
                 on_epoch=on_epoch, stop_on_collapse=False)  # the demo shows what each variant does
    except DivergenceError:  # the loss diverged: report it, do not hide it
        return Run(name, seed, float("nan"), float("nan"), model, curve), None
    report = audit(model, [xt])  # the model as it ends
    return Run(name, seed, evaluate(model, val)[1], report.dead_fraction, model, curve), report


def _seed(config: DemoConfig, seed: int, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Everything of one seed: pretraining, case 1's fine-tunes, case 2's; the unit a worker runs."""
    (xt, yt), (xv, yv) = load_digits_split()
    val = loader(xv, yv, batch_size=512)
    data = DataSpec(lambda: loader(xt, yt, config.batch_size, shuffle=True), lambda: val,
                    torch.nn.functional.cross_entropy)
    variants = _variants(config.save)
    out: dict = {"seed": seed, "runs": [], "firing": {}, "dead_runs": [], "dead_start": None}
    seed_everything(seed)
    base = DeepMLP(config.depth, config.width)
    progress(f"seed {seed}: pretraining ReLU ({config.pretrain_optimizer}, lr {config.pretrain_lr})")
    finetune(base, data, epochs=config.pretrain_epochs, lr=config.pretrain_lr, optimizer=config.pretrain_optimizer,
             momentum=config.momentum, seed=1000 + seed, audit_dead=False, stop_on_collapse=False)
    out["pretrained"] = (evaluate(base, val)[1], _dead_fraction(base, xt))
    for name in config.variants:
        progress(f"seed {seed}: fine-tuning {name}")
        run, report = _finetune_variant(variants[name](base), name, seed, data, xt, val,
                                        config.epochs, config.lr, config.momentum)
        out["runs"].append(run)
        if report is not None:
            out["firing"][name] = [c for s in report.sites for c in s.fire_counts]
    if config.dead_case:
        seed_everything(seed)
        base = DeepMLP(config.depth, config.width)
        with torch.no_grad():
            for layer in base.body:
                if isinstance(layer, nn.Linear):
                    layer.bias.fill_(config.dead_bias)
        out["dead_start"] = (evaluate(base, val)[1], _dead_fraction(base, xt))
        for name in config.variants:
            progress(f"mostly dead model, seed {seed}: fine-tuning {name}")
            run, _ = _finetune_variant(variants[name](base), name, seed, data, xt, val,
                                       config.dead_epochs, config.dead_lr, config.momentum)
            out["dead_runs"].append(run)
    return out


def _seed_in_worker(config: DemoConfig, seed: int) -> dict:
    """``_seed`` in a worker process of its own: one intra-op thread there (the tensors are 64x32;
    two workers on two cores), set in that process only."""
    torch.set_num_threads(1)
    return _seed(config, seed)


def run_demo(config: DemoConfig = DemoConfig(), *, out_dir: str | Path | None = None, export: bool = True,
             progress: Callable[[str], None] = lambda s: None, workers: int | None = None) -> DemoResult:
    """Runs the whole comparison (and the export proof); returns every figure.

    Seeds are independent: with ``workers`` > 1 (default: 2 where there are 2 cores or more and
    more than one seed) they run in that many spawned processes side by side, each with one
    intra-op thread; this process's settings are left as they are. Each seed's figures are what
    one process computes for it (seeded; float32 on a CPU is not bit-reproducible across processes,
    so a figure can move in its last digits between runs, and the README says by how much)."""
    import os

    start = time.perf_counter()
    (xt, _), _ = load_digits_split()
    if workers is None:
        workers = min(2, os.cpu_count() or 1, len(config.seeds))
    per_seed: dict[int, dict] = {}
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from ..method import op  # noqa: F401 - registers the SUGAR op the models sent back call

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_seed_in_worker, config, seed): seed for seed in config.seeds}
            progress(f"training {len(config.seeds)} seeds in {workers} processes...")
            for done, future in enumerate(as_completed(futures), 1):
                per_seed[futures[future]] = future.result()
                progress(f"{done} of {len(config.seeds)} seeds done")
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, min(2, threads)))
        try:
            for seed in config.seeds:
                per_seed[seed] = _seed(config, seed, progress)
        finally:  # the caller's setting back
            torch.set_num_threads(threads)
    seeds = [per_seed[s] for s in config.seeds]
    result = DemoResult(config, [p["pretrained"] for p in seeds], [r for p in seeds for r in p["runs"]],
                        seeds[0]["firing"] if seeds else {})
    if config.dead_case:
        result.dead_start = [p["dead_start"] for p in seeds]
        result.dead_runs = [r for p in seeds for r in p["dead_runs"]]
    if export:
        result.export = _export_best(result, xt, out_dir, progress)
    result.seconds = time.perf_counter() - start
    return result


def _export_best(result: DemoResult, xt, out_dir, progress) -> dict:
    from ..deploy.export import export_onnx
    from ..passes.strip import strip
    from ..deploy.runtimes import ort_latencies
    from ..deploy.parity import verify

    sugar_runs = [r for r in result.runs if r.variant.startswith("SUGAR") and r.accuracy == r.accuracy]
    best = max(sugar_runs, key=lambda r: r.accuracy)
    relu = next(r for r in result.runs if r.variant == "ReLU" and r.seed == best.seed)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sugarize-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    progress(f"exporting the best SUGAR model ({best.variant}, seed {best.seed})")
    example = (xt[:32],)
    plain = strip(best.model)
    original = DeepMLP(result.config.depth, result.config.width)
    original.load_state_dict(best.model.state_dict())
    sugar_res = export_onnx(best.model, out / "sugar_stripped.onnx", example)
    relu_res = export_onnx(relu.model, out / "relu_original.onnx", example)
    parity = verify(sugar_res.path, original, example, stripped=plain, reference_artifact=relu_res.path, batches=3)
    lat = ort_latencies([sugar_res.path, relu_res.path], example[0], repeats=500)
    return {
        "variant": best.variant, "seed": best.seed, "path": str(sugar_res.path),
        "op_types": sugar_res.op_types, "relu_op_types": relu_res.op_types,
        "parity": parity, "latency_stripped_ms": 1e3 * lat[0], "latency_relu_ms": 1e3 * lat[1],
    }

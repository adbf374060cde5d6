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

__all__ = ["DemoConfig", "DeepMLP", "run_demo", "VARIANTS", "DEMO_FILES"]

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
    variants: tuple[str, ...] = ("ReLU", "SUGAR B-SiLU", "SUGAR NeLU", "LeakyReLU", "GELU")  # which to run


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
        "SUGAR B-SiLU": lambda m: sugarize(m, "bsilu", save=save),
        "SUGAR NeLU": lambda m: sugarize(m, "nelu", save=save),
        "LeakyReLU": lambda m: _swap(m, nn.LeakyReLU),
        "GELU": lambda m: _swap(m, nn.GELU),
    }


VARIANTS = ("ReLU", "SUGAR B-SiLU", "SUGAR NeLU", "LeakyReLU", "GELU")


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

    def paired(self, variant: str = "SUGAR B-SiLU", against: str = "ReLU", *, dead_case: bool = False) -> dict:
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


def _finetune_variant(model, name, seed, data, xt, val, epochs, lr, momentum):
    """(Run, dead-unit report) of one fine-tune; a diverged loss is a NaN row, not hidden."""
    from ..training.deadunits import audit

    reports = [audit(model, [xt])]  # before the fine-tune, then after each epoch

    def on_epoch(result):
        reports.append(audit(model, [xt]))

    try:
        finetune(model, data, epochs=epochs, lr=lr, momentum=momentum, seed=seed, audit_dead=False,
                 on_epoch=on_epoch)
    except DivergenceError:  # the loss diverged: report it, do not hide it
        return Run(name, seed, float("nan"), float("nan"), model, [r.dead_fraction for r in reports]), None
    report = reports[-1]  # the last epoch's audit: the model as it ends
    curve = [r.dead_fraction for r in reports]
    return Run(name, seed, evaluate(model, val)[1], report.dead_fraction, model, curve), report


def run_demo(config: DemoConfig = DemoConfig(), *, out_dir: str | Path | None = None, export: bool = True,
             progress: Callable[[str], None] = lambda s: None) -> DemoResult:
    """Runs the whole comparison (and the export proof); returns every figure."""
    start = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    (xt, yt), (xv, yv) = load_digits_split()
    val = loader(xv, yv, batch_size=512)
    data = DataSpec(lambda: loader(xt, yt, config.batch_size, shuffle=True), lambda: val,
                    torch.nn.functional.cross_entropy)
    variants = _variants(config.save)
    runs, pretrained, firing = [], [], {}
    for seed in config.seeds:
        seed_everything(seed)
        base = DeepMLP(config.depth, config.width)
        progress(f"seed {seed}: pretraining ReLU ({config.pretrain_optimizer}, lr {config.pretrain_lr})")
        finetune(base, data, epochs=config.pretrain_epochs, lr=config.pretrain_lr, optimizer=config.pretrain_optimizer,
                 momentum=config.momentum, seed=1000 + seed, audit_dead=False)
        pretrained.append((evaluate(base, val)[1], _dead_fraction(base, xt)))
        for name in config.variants:
            progress(f"seed {seed}: fine-tuning {name}")
            run, report = _finetune_variant(variants[name](base), name, seed, data, xt, val,
                                            config.epochs, config.lr, config.momentum)
            runs.append(run)
            if report is not None and seed == config.seeds[0]:
                firing[name] = [c for s in report.sites for c in s.fire_counts]
    result = DemoResult(config, pretrained, runs, firing)
    if config.dead_case:
        for seed in config.seeds:
            seed_everything(seed)
            base = DeepMLP(config.depth, config.width)
            with torch.no_grad():
                for layer in base.body:
                    if isinstance(layer, nn.Linear):
                        layer.bias.fill_(config.dead_bias)
            result.dead_start.append((evaluate(base, val)[1], _dead_fraction(base, xt)))
            for name in config.variants:
                progress(f"mostly dead model, seed {seed}: fine-tuning {name}")
                run, _ = _finetune_variant(variants[name](base), name, seed, data, xt, val,
                                           config.dead_epochs, config.dead_lr, config.momentum)
                result.dead_runs.append(run)
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
    parity = verify(sugar_res.path, original, example, stripped=plain, reference_onnx=relu_res.path, batches=3)
    lat = ort_latencies([sugar_res.path, relu_res.path], example[0], repeats=500)
    return {
        "variant": best.variant, "seed": best.seed, "path": str(sugar_res.path),
        "op_types": sugar_res.op_types, "relu_op_types": relu_res.op_types,
        "parity": parity, "latency_stripped_ms": 1e3 * lat[0], "latency_relu_ms": 1e3 * lat[1],
    }

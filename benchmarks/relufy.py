"""Relufication on the bundled digits: GELU model -> ReLU model, three ways, over seeds.

    python benchmarks/relufy.py [--seeds 3] [--out benchmarks/results]

A small ConvNeXt-style GELU network is trained to convergence on the digits, then for the
same fine-tuning budget:
  (a) relufied with SUGAR (forward ReLU, backward GELU'), fine-tuned, stripped;
  (b) GELU swapped for ReLU by hand and fine-tuned with ReLU's own gradient;
  (c) left as GELU and fine-tuned the same way.
Writes ``relufy.md`` and ``relufy.json``: validation accuracy, dead units, activation
sparsity (exact zeros after the activation) and onnxruntime latency per variant.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from _common import machine, machine_line, md_table, mean_std, write  # noqa: E402

import sugarize  # noqa: E402
from sugarize.training.deadunits import audit  # noqa: E402
from sugarize.training.digits import load_digits_split, loader  # noqa: E402
from sugarize.deploy.export import export_onnx  # noqa: E402
from sugarize.training.train import DataSpec, evaluate, finetune, seed_everything  # noqa: E402


class ChannelsLayerNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = ChannelsLayerNorm(c)
        self.pw1 = nn.Conv2d(c, 4 * c, 1)
        self.act = act()
        self.pw2 = nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


class TinyConvNeXt(nn.Module):
    def __init__(self, act=nn.GELU, width: int = 32, depth: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(width, act) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x.reshape(-1, 1, 8, 8)))
        return self.head(x.mean((2, 3)))


def swap_gelu_for_relu(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for block in out.blocks:
        block.act = nn.ReLU()
    return out


def ort_ms(path, x) -> float:
    from sugarize.deploy.runtimes import ort_latency

    return 1e3 * ort_latency(path, x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    (xt, yt), (xv, yv) = load_digits_split()
    val = loader(xv, yv, 512)
    data = DataSpec(lambda: loader(xt, yt, 64, shuffle=True), lambda: val, torch.nn.functional.cross_entropy)
    variants = ("(c) GELU, fine-tuned", "(a) relufied with SUGAR (GELU'), stripped", "(b) ReLU swap, ReLU gradient")
    runs = {v: [] for v in variants}
    pre = []
    tmp = Path(tempfile.mkdtemp(prefix="sugarize-relufy-"))
    example = (xv[:32],)
    for seed in range(args.seeds):
        seed_everything(seed)
        gelu = TinyConvNeXt()
        finetune(gelu, data, epochs=args.pretrain_epochs, lr=args.lr, optimizer="adamw", seed=100 + seed,
                 audit_dead=False)
        pre.append(evaluate(gelu, val)[1])
        models = {
            variants[0]: copy.deepcopy(gelu),
            variants[1]: sugarize.sugarize(gelu, relufy=("gelu",)),
            variants[2]: swap_gelu_for_relu(gelu),
        }
        for name, model in models.items():
            before = evaluate(model, val)[1]
            finetune(model, data, epochs=args.epochs, lr=args.lr, optimizer="adamw", seed=seed, audit_dead=False)
            final = sugarize.strip(model) if sugarize.count_sugar(model) else model
            rep = audit(final, [xt])
            path = export_onnx(final, tmp / f"{seed}-{len(runs[name])}-{name[:3]}.onnx", example).path
            import onnx

            ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
            runs[name].append({"seed": seed, "accuracy_before_finetune": before, "accuracy": evaluate(final, val)[1],
                               "dead": rep.dead_fraction, "sparsity": sum(s.zeros for s in rep.sites)
                               / max(1, sum(s.elements for s in rep.sites)), "ort_ms": ort_ms(path, example[0]),
                               "ops": ops})
        print(f"seed {seed}: " + ", ".join(f"{k[:3]} {100 * runs[k][-1]['accuracy']:.1f}%" for k in variants),
              flush=True)
    base_ms = statistics.mean(r["ort_ms"] for r in runs[variants[0]])
    rows = []
    for name in variants:
        rs = runs[name]
        acc, acc_sd = mean_std([r["accuracy"] for r in rs])
        acc0, _ = mean_std([r["accuracy_before_finetune"] for r in rs])
        dead, _ = mean_std([r["dead"] for r in rs])
        sp, _ = mean_std([r["sparsity"] for r in rs])
        ms = statistics.mean(r["ort_ms"] for r in rs)
        act = "Gelu/Erf" if any("Erf" in o or "Gelu" in o for o in rs[0]["ops"]) else "Relu"
        rows.append([name, f"{100 * acc0:.1f}", f"{100 * acc:.1f} ± {100 * acc_sd:.1f}", f"{100 * dead:.1f}",
                     f"{100 * sp:.1f}", f"{ms:.3f} ({ms / base_ms:.2f}x)", act])
    pre_acc, pre_sd = mean_std(pre)
    total = time.perf_counter() - start
    md = ("# Relufication: GELU -> ReLU on the digits\n\n"
          f"`python benchmarks/relufy.py --seeds {args.seeds}` on {machine_line(machine())}; {total:.0f} s.\n\n"
          f"TinyConvNeXt (stem conv, {4} blocks of depthwise conv, LayerNorm, 1x1 expand x4, activation, "
          f"1x1), trained with GELU for {args.pretrain_epochs} epochs (AdamW lr {args.lr}): val accuracy "
          f"{100 * pre_acc:.1f} ± {100 * pre_sd:.1f} %. Then each variant: {args.epochs} epochs, AdamW lr "
          f"{args.lr}, {args.seeds} seeds. 'before' is the accuracy right after the swap, before any "
          "fine-tuning. Sparsity: exact zeros after the activation on the training images. Latency: "
          "onnxruntime, batch 32, 1 thread, median.\n\n"
          + md_table(["variant", "val acc % before", "val acc % after", "dead units %", "activation sparsity %",
                      "ORT ms (vs GELU)", "ONNX activation"], rows) + "\n")
    write("relufy", md, {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "pretrained": pre,
                         "runs": runs, "seconds": total}, args.out)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which surrogate does no harm? Fine-tunes healthy and dead ReLU models with each candidate,
5 seeds each, against each seed's ReLU twin; writes results/study.md and results/study.json.

    python benchmarks/study.py            # the committed table (70 min on 2 cores here)
    python benchmarks/study.py --quick    # 2 seeds, one rate: a smoke run (minutes)

Every candidate keeps relu in the forward pass; only the gradient through the activation
differs. They are written here as one small autograd function (``Candidate.grad``), so the
study does not depend on which candidate the package ships as its default; the package's
op is then held to the chosen candidate's formula by tests/method/test_default_surrogate.py.

Pairs (model, data), each in two states:
- healthy: pretrained with ReLU and AdamW to convergence, then fine-tuned;
- dead: the same architecture born dead (every hidden bias, or BatchNorm shift, negative),
  fine-tuned from there: ReLU cannot leave it, a surrogate should.
Optimizers: SGD (momentum 0.9) and AdamW, each at the rate where ReLU is healthy (1x), 3x
and 10x. Per candidate and case: mean and spread over seeds, the worst seed against its ReLU
twin (same weights, same batches), the units revived (dead units at start minus at the end,
over the validation set), and the backward's gain per layer at the first step (the norm of
the gradient reaching each activation's input, against ReLU's, from the same weights and
batch).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, md_table, write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------- candidates

def _bsilu_d(x, a=1.67):
    s = torch.sigmoid(x)
    return s + (x + a) * s * (1 - s)


def _nelu_d(x, a):
    return torch.where(x > 0, torch.ones_like(x), 2 * a * x / (1 + x * x) ** 2)


def unit_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions a unit is reduced over: all but the channel (dim 1 of a 4-D/5-D conv
    activation) or the feature (the last dim of a Linear-fed one)."""
    keep = 1 if x.dim() in (4, 5) else x.dim() - 1
    return tuple(d for d in range(x.dim()) if d != keep)


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # relu | whole | negative | nelu | dead | anneal | gain
    a: float = 1.67

    def grad(self, g: torch.Tensor, x: torch.Tensor, progress: float) -> torch.Tensor:
        on = (x > 0).to(g.dtype)
        if self.kind == "relu":
            return g * on
        if self.kind == "whole":
            return g * _bsilu_d(x, self.a)
        if self.kind == "negative":
            return g * torch.where(x > 0, torch.ones_like(x), _bsilu_d(x, self.a))
        if self.kind == "nelu":
            return g * _nelu_d(x, self.a)
        if self.kind == "dead":  # B-SiLU's s' at units that fire for no sample of the batch, ReLU's 1/0 elsewhere
            dims = unit_dims(x)
            dead = (x <= 0).all(dim=dims, keepdim=True) if dims else (x <= 0)
            return g * torch.where(dead, _bsilu_d(x, self.a), on)
        if self.kind == "rare":  # the same at units that fire for under 5 % of the batch's elements
            dims = unit_dims(x)
            rare = (x > 0).float().mean(dim=dims, keepdim=True) < 0.05 if dims else (x <= 0)
            return g * torch.where(rare & (x <= 0), _bsilu_d(x, self.a), on)
        if self.kind == "anneal":  # B-SiLU's whole-line s' blended to ReLU's over the first half of fine-tuning
            w = max(0.0, 1.0 - 2.0 * progress)
            return g * (on + w * (_bsilu_d(x, self.a) - on))
        if self.kind == "gain":  # negative-side s', rescaled so the gradient's norm is ReLU's (never above)
            relu_g = g * on
            sur = g * torch.where(x > 0, torch.ones_like(x), _bsilu_d(x, self.a))
            n_relu, n_sur = relu_g.norm(), sur.norm()
            scale = torch.where(n_sur > n_relu, n_relu / n_sur.clamp_min(1e-30), torch.ones_like(n_sur))
            out = sur * scale
            # a layer with no active unit at all: ReLU passes nothing; pass the surrogate unscaled
            return torch.where(n_relu > 0, out, sur)
        raise ValueError(self.kind)


CANDIDATES = [
    Candidate("relu", "relu"),
    Candidate("bsilu (paper)", "whole"),
    Candidate("bsilu negative-only", "negative"),
    Candidate("nelu a=0.01", "nelu", 0.01),
    Candidate("nelu a=0.1", "nelu", 0.1),
    Candidate("nelu a=1", "nelu", 1.0),
    Candidate("dead-unit bsilu", "dead"),
    Candidate("rare-unit bsilu (<5 %)", "rare"),
    Candidate("annealed bsilu", "anneal"),
    Candidate("gain-matched bsilu", "gain"),
]
BY_NAME = {c.name: c for c in CANDIDATES}


class _Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, act):
        ctx.save_for_backward(x)
        ctx.act = act
        return torch.relu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        act = ctx.act
        gin = act.cand.grad(g, x, act.progress[0])
        if act.record is not None:
            act.record.append(float(gin.norm()))
        return gin, None


class Act(nn.Module):
    """relu forward; the candidate's gradient backward. Hidden units' firing is counted in eval."""

    def __init__(self):
        super().__init__()
        self.cand = CANDIDATES[0]
        self.progress = [0.0]
        self.record = None
        self.fired = None

    def forward(self, x):
        if self.fired is not None:
            with torch.no_grad():
                f = (x > 0).sum(dim=unit_dims(x))
                self.fired = f if self.fired is ... else self.fired + f
        if not torch.is_grad_enabled():
            return torch.relu(x)
        return _Fn.apply(x, self)


def acts(model):
    return [m for m in model.modules() if isinstance(m, Act)]


# ------------------------------------------------------------------------------------- models

class MLP(nn.Module):
    def __init__(self, d_in, width, depth, classes=10):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), Act()]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), Act()
        self.c2, self.b2, self.a2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), Act()

    def forward(self, x):
        return self.a2(x + self.b2(self.c2(self.a1(self.b1(self.c1(x))))))


class ResCNN(nn.Module):
    def __init__(self, cin=1, c=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), Act())
        self.blocks = nn.Sequential(ResBlock(c), ResBlock(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class VGG(nn.Module):
    def __init__(self, cin=1, c=16, classes=10, side=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(cin, c, 3, 1, 1), Act(), nn.Conv2d(c, c, 3, 1, 1), Act(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, 1, 1), Act(), nn.Conv2d(2 * c, 2 * c, 3, 1, 1), Act(), nn.MaxPool2d(2))
        s = side // 4
        self.fc = nn.Sequential(nn.Linear(2 * c * s * s, 64), Act(), nn.Linear(64, classes))

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class CharLM(nn.Module):
    """A 2-layer pre-norm transformer with ReLU MLPs (a GPT-style char model)."""

    def __init__(self, vocab, d=64, layers=2, heads=4, ctx=32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d), attn=nn.MultiheadAttention(d, heads, batch_first=True),
                ln2=nn.LayerNorm(d), up=nn.Linear(d, 4 * d), act=Act(), down=nn.Linear(4 * d, d))))
        self.ln, self.out = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), 1), persistent=False)

    def forward(self, idx):
        t = idx.shape[1]
        h = self.emb(idx) + self.pos[:t]
        for b in self.blocks:
            q = b["ln1"](h)
            h = h + b["attn"](q, q, q, attn_mask=self.mask[:t, :t], need_weights=False)[0]
            h = h + b["down"](b["act"](b["up"](b["ln2"](h))))
        return self.out(self.ln(h))


# --------------------------------------------------------------------------------------- data

def _digits():
    sys.path.insert(0, str(ROOT))
    from sugarize.training.digits import load_digits_split

    (xt, yt), (xv, yv) = load_digits_split()
    return (xt, yt), (xv, yv)


def _synthetic_images(n=2000, side=12, seed=0):
    """10 classes of 12x12 images: a class template (random strokes) shifted by up to 2 pixels, plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(10, side, side, generator=g) < 0.25).float()
    templates = F.avg_pool2d(templates[:, None], 3, 1, 1)[:, 0]
    y = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    x = torch.stack([torch.roll(templates[c], (int(s[0]), int(s[1])), (0, 1)) for c, s in zip(y, shifts)])
    x = x + 0.2 * torch.randn(x.shape, generator=g)
    x = ((x - x.mean()) / x.std())[:, None]
    k = int(n * 0.8)
    return (x[:k], y[:k]), (x[k:], y[k:])


def _synthetic_vectors(n=3000, d=32, seed=1):
    """10 classes in 32-d: each a mixture of 3 Gaussian clusters (not linearly separable)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 3, d, generator=g) * 1.2
    y = torch.randint(0, 10, (n,), generator=g)
    which = torch.randint(0, 3, (n,), generator=g)
    x = centers[y, which] + torch.randn(n, d, generator=g)
    k = int(n * 0.8)
    return (x[:k], y[:k]), (x[k:], y[k:])


def _text(ctx=32, n_train=1600, n_val=400, seed=2):
    raw = gzip.open(ROOT / "fixtures" / "tinyshakespeare.txt.gz", "rt").read()
    chars = sorted(set(raw))
    ids = torch.tensor([chars.index(c) for c in raw[:200_000]], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    split = int(len(ids) * 0.9)
    def windows(lo, hi, n):
        starts = torch.randint(lo, hi - ctx - 1, (n,), generator=g)
        w = torch.stack([ids[s:s + ctx + 1] for s in starts.tolist()])
        return w[:, :-1], w[:, 1:]
    return windows(0, split, n_train), windows(split, len(ids), n_val), len(chars)


@dataclass(frozen=True)
class Pair:
    name: str
    lr_sgd: float   # where ReLU fine-tuning is healthy (1x)
    lr_adamw: float
    epochs: int     # fine-tuning epochs from the healthy state
    dead_bias: float
    dead_epochs: int  # from the dead state (the gradient must first climb through dead layers)


PAIRS = [
    Pair("deep MLP / digits", 0.003, 1e-3, 4, -0.5, 12),
    Pair("ResNet-style CNN (BN) / digits", 0.01, 1e-3, 4, -1.0, 12),
    Pair("VGG-style CNN (no norm) / digits", 0.01, 1e-3, 4, -0.5, 12),
    Pair("char transformer / tinyshakespeare", 0.03, 1e-3, 2, -1.5, 4),
    Pair("MLP / synthetic clusters", 0.03, 1e-3, 4, -0.5, 12),
    Pair("VGG-style CNN / synthetic images", 0.01, 1e-3, 4, -0.5, 12),
]
PAIR = {p.name: p for p in PAIRS}

_DATA: dict = {}


def data(pair: str):
    if pair not in _DATA:
        if "digits" in pair:
            (xt, yt), (xv, yv) = _digits()
            if "CNN" in pair:
                xt, xv = xt.reshape(-1, 1, 8, 8), xv.reshape(-1, 1, 8, 8)
            _DATA[pair] = ((xt, yt), (xv, yv), None)
        elif "synthetic images" in pair:
            _DATA[pair] = (*_synthetic_images(), None)
        elif "synthetic clusters" in pair:
            _DATA[pair] = (*_synthetic_vectors(), None)
        else:
            _DATA[pair] = _text()
    return _DATA[pair]


def build(pair: str) -> nn.Module:
    if pair == "deep MLP / digits":
        return MLP(64, 64, 8)
    if pair == "MLP / synthetic clusters":
        return MLP(32, 64, 6)
    if pair == "ResNet-style CNN (BN) / digits":
        return ResCNN(1, 16)
    if pair == "VGG-style CNN (no norm) / digits":
        return VGG(1, 16, side=8)
    if pair == "VGG-style CNN / synthetic images":
        return VGG(1, 16, side=12)
    vocab = data(pair)[2]
    return CharLM(vocab)


def make_dead(model: nn.Module, bias: float) -> None:
    """Every hidden bias (or BatchNorm shift) feeding an activation set to ``bias``."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.BatchNorm2d,)):  # a collapsed BatchNorm: small scale, negative shift
                m.weight.fill_(0.1)
                m.bias.fill_(bias)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                if name.endswith(("head", "out", "down", "fc.2")) or "attn" in name:
                    continue
                m.bias.fill_(bias)


def loss_of(out, y):
    return F.cross_entropy(out.flatten(0, -2) if out.dim() > 2 else out, y.flatten())


def batches(x, y, bs, seed):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + bs]], y[order[i:i + bs]]) for i in range(0, len(x) - bs + 1, bs)]


@torch.no_grad()
def evaluate(model, xv, yv, count_units=False):
    model.eval()
    if count_units:
        for a in acts(model):
            a.fired = ...
    correct, total = 0, 0
    for i in range(0, len(xv), 500):
        out = model(xv[i:i + 500])
        pred = out.argmax(-1)
        correct += (pred == yv[i:i + 500]).sum().item()
        total += yv[i:i + 500].numel()
    dead = None
    if count_units:
        fired = [a.fired for a in acts(model)]
        dead = 100.0 * sum(int((f == 0).sum()) for f in fired) / sum(f.numel() for f in fired)
        for a in acts(model):
            a.fired = None
    model.train()
    return 100.0 * correct / total, dead


def pretrain(pair: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build(pair)
    (xt, yt), (xv, yv), _ = data(pair)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs = 6 if "transformer" in pair else 25
    for ep in range(epochs):
        for xb, yb in batches(xt, yt, 64, seed * 1000 + ep):
            opt.zero_grad(set_to_none=True)
            loss_of(model(xb), yb).backward()
            opt.step()
    return model.state_dict()


def gains(model, cand, xb, yb) -> list[float]:
    """Per activation (input side), the gradient norm under ``cand`` / under ReLU, same weights and batch."""
    out = []
    for c in (cand, CANDIDATES[0]):
        for a in acts(model):
            a.cand, a.record = c, []
        model.zero_grad(set_to_none=True)
        loss_of(model(xb), yb).backward()
        out.append([a.record[0] if a.record else 0.0 for a in acts(model)])
    for a in acts(model):
        a.record = None
    return [s / r if r > 0 else (math.inf if s > 0 else 1.0) for s, r in zip(*out)]  # inf: ReLU passes nothing


def finetune(task: tuple) -> dict:
    pair, state, opt_name, mult, cand_name, seed, init = task
    torch.set_num_threads(1)
    p, cand = PAIR[pair], BY_NAME[cand_name]
    torch.manual_seed(seed)
    model = build(pair)
    if state == "healthy":
        model.load_state_dict(init)
    else:
        make_dead(model, p.dead_bias)
    (xt, yt), (xv, yv), _ = data(pair)
    start_acc, start_dead = evaluate(model, xv, yv, count_units=True)
    epochs = p.epochs if state == "healthy" else p.dead_epochs
    bl = [batches(xt, yt, 64, seed * 7919 + ep) for ep in range(epochs)]
    gain = gains(model, cand, *bl[0][0]) if seed == 0 and mult == 1 else None
    for a in acts(model):
        a.cand = cand
    lr = (p.lr_sgd if opt_name == "sgd" else p.lr_adamw) * mult
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt_name == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
    steps, total = 0, sum(len(b) for b in bl)
    for epoch in bl:
        for xb, yb in epoch:
            for a in acts(model):
                a.progress[0] = steps / total
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model(xb), yb)
            if not torch.isfinite(loss):
                break
            loss.backward()
            opt.step()
            steps += 1
    acc, dead = evaluate(model, xv, yv, count_units=True)
    if not math.isfinite(acc):
        acc = 0.0
    return dict(pair=pair, state=state, opt=opt_name, mult=mult, cand=cand_name, seed=seed,
                start=start_acc, acc=acc, start_dead=start_dead, dead=dead, gain=gain)


def _pretrain_task(args):
    torch.set_num_threads(1)
    return args, pretrain(*args)


def run(seeds: int, mults: tuple, workers: int, pairs: list[str], cands: list[str]) -> list[dict]:
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        inits = dict(pool.map(_pretrain_task, [(p, s) for p in pairs for s in range(seeds)]))
        tasks = []
        for p in pairs:
            for state in ("healthy", "dead"):
                for opt in ("sgd", "adamw"):
                    for mult in (mults if state == "healthy" else mults[:2]):
                        for c in cands:
                            for s in range(seeds):
                                tasks.append((p, state, opt, mult, c, s, inits[(p, s)] if state == "healthy" else None))
        out, t0 = [], time.time()
        for i, r in enumerate(pool.imap_unordered(finetune, tasks, chunksize=4)):
            out.append(r)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{len(tasks)} runs, {time.time() - t0:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------ summary

def _fmt(m, s):
    return f"{m:.1f} ± {s:.1f}"


def summarise(rows: list[dict], mults: tuple) -> tuple[str, dict]:
    key = lambda r: (r["pair"], r["state"], r["opt"], r["mult"])
    relu = {(key(r), r["seed"]): r for r in rows if r["cand"] == "relu"}
    cases: dict = {}
    for r in rows:
        cases.setdefault(key(r), {}).setdefault(r["cand"], []).append(r)
    summary = {}
    for k, by in cases.items():
        for c, rs in by.items():
            accs = [r["acc"] for r in rs]
            deltas = [r["acc"] - relu[(k, r["seed"])]["acc"] for r in rs if (k, r["seed"]) in relu]
            revived = [r["start_dead"] - r["dead"] for r in rs]
            g = next((r["gain"] for r in rs if r["gain"] is not None), None)
            summary[(k, c)] = dict(mean=statistics.mean(accs), std=statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                                   worst_vs_relu=min(deltas) if deltas else float("nan"),
                                   worst_drop_from_start=max(r["start"] - r["acc"] for r in rs),
                                   revived=statistics.mean(revived), dead_end=statistics.mean(r["dead"] for r in rs),
                                   gain=g, n=len(rs))
    cands = [c.name for c in CANDIDATES if any(k[1] == c.name for k in summary)]
    pairs = [p.name for p in PAIRS if any(k[0][0] == p.name for k in summary)]

    # verdicts: no harm = every healthy seed at 1x (both optimizers) within 2 points of its ReLU twin;
    # revives = on every dead case the mean beats ReLU's by 5+ points or units came back
    verdict = {}
    for c in cands:
        harm = [summary[((p, "healthy", o, 1), c)]["worst_vs_relu"] for p in pairs for o in ("sgd", "adamw")
                if ((p, "healthy", o, 1), c) in summary]
        rev, units = [], []  # per dead pair: the best setting's accuracy gain and units-revived gain over ReLU
        for p in pairs:
            gains, more = [], []
            for o in ("sgd", "adamw"):
                for m in mults[:2]:
                    s, r = summary.get(((p, "dead", o, m), c)), summary.get(((p, "dead", o, m), "relu"))
                    if s and r:
                        gains.append(s["mean"] - r["mean"])
                        more.append(s["revived"] - r["revived"])
            if gains:
                rev.append(max(gains))
                units.append(max(more))
        stable = {}
        for o in ("sgd", "adamw"):
            ok = []
            for m in mults:
                worst = max((summary[((p, "healthy", o, m), c)]["worst_drop_from_start"] for p in pairs
                             if ((p, "healthy", o, m), c) in summary), default=math.inf)
                ok.append((m, worst <= 2.0))
            top = 0
            for m, good in ok:
                if not good:
                    break
                top = m
            stable[o] = top
        verdict[c] = dict(worst_healthy_vs_relu=min(harm) if harm else float("nan"),
                          no_harm=bool(harm) and min(harm) >= -2.0,
                          dead_gain_min=min(rev) if rev else float("nan"),
                          dead_gain_mean=statistics.mean(rev) if rev else float("nan"),
                          dead_units_min=min(units) if units else float("nan"),
                          revives=c != "relu" and bool(rev) and all(g >= 5.0 or u >= 10.0 for g, u in zip(rev, units)),
                          stable_up_to=stable)

    md = ["# Which surrogate does no harm: the study", "",
          f"Machine: {machine_line(machine())}. Command: `python benchmarks/study.py`.", "",
          "Val accuracy % (mean ± spread over seeds), **worst** = the worst seed's accuracy minus its ReLU "
          "twin's (same weights, same batches); revived = dead units at start minus at the end "
          "(% of hidden units that fire for no validation sample). A healthy case is fine-tuned from a "
          "converged ReLU model; a dead case from the same architecture born dead.", "",
          "## Verdict", "",
          "no harm: every healthy seed at the 1x rate, SGD and AdamW, within 2 points of its ReLU twin. "
          "revives: on every dead pair, at its best setting (SGD or AdamW, 1x or 3x), the mean beats ReLU's by "
          "5+ points or 10+ more points of the units came back. stable up to: "
          "the largest rate multiple at which no healthy seed of any pair fell more than 2 points below "
          "its start (all smaller multiples too; 0 = not even 1x).", ""]
    vrows = []
    for c in cands:
        v = verdict[c]
        vrows.append([c, f"{v['worst_healthy_vs_relu']:+.1f}", "yes" if v["no_harm"] else "no",
                      f"{v['dead_gain_min']:+.1f} / {v['dead_gain_mean']:+.1f}", f"{v['dead_units_min']:+.1f}",
                      "yes" if v["revives"] else "no",
                      f"{v['stable_up_to']['sgd']}x", f"{v['stable_up_to']['adamw']}x"])
    md.append(md_table(["candidate", "worst healthy seed vs ReLU (1x)", "no harm",
                        "dead pairs: min / mean of the best accuracy gain vs ReLU", "dead pairs: min units-revived gain",
                        "revives", "SGD stable up to", "AdamW stable up to"], vrows))
    # the worst healthy seed against its twin at each rate, and how many seeds fell 2+ points below it
    relu_acc = {(r["pair"], r["opt"], r["mult"], r["seed"]): r["acc"] for r in rows
                if r["cand"] == "relu" and r["state"] == "healthy"}
    wrows = []
    for c in cands:
        cells = [c]
        counts = []
        for m in mults:
            mine = [r for r in rows if r["cand"] == c and r["state"] == "healthy" and r["mult"] == m]
            diffs = [r["acc"] - relu_acc[(r["pair"], r["opt"], m, r["seed"])] for r in mine]
            cells.append(f"{min(diffs):+.1f}" if diffs else "-")
            counts.append(f"{sum(d < -2.0 for d in diffs)} of {len(diffs)}")
        wrows.append(cells + [" / ".join(counts)])
    md += ["", "The worst healthy seed against its ReLU twin at each rate, over every pair and both optimizers, "
           "and how many seeds fell more than 2 points below their twin:", "",
           md_table(["candidate"] + [f"worst at {m}x" for m in mults] +
                    ["seeds > 2 points below (" + " / ".join(f"{m}x" for m in mults) + ")"], wrows)]
    for p in pairs:
        md += ["", f"## {p}", ""]
        for state in ("healthy", "dead"):
            for o in ("sgd", "adamw"):
                ms = mults if state == "healthy" else mults[:2]
                lr = PAIR[p].lr_sgd if o == "sgd" else PAIR[p].lr_adamw
                hdr = ["candidate"] + [f"{m}x ({lr * m:g}) acc" for m in ms] + [f"worst vs ReLU at {m}x" for m in ms] + \
                      ["revived (1x)", "gain per layer (1x, first step)"]
                trs = []
                for c in cands:
                    cells = [c]
                    cells += [_fmt(summary[((p, state, o, m), c)]["mean"], summary[((p, state, o, m), c)]["std"])
                              if ((p, state, o, m), c) in summary else "-" for m in ms]
                    cells += [f"{summary[((p, state, o, m), c)]['worst_vs_relu']:+.1f}"
                              if ((p, state, o, m), c) in summary else "-" for m in ms]
                    s1 = summary.get(((p, state, o, 1), c))
                    cells.append(f"{s1['revived']:+.1f}" if s1 else "-")
                    cells.append(" ".join(f"{x:.2f}" for x in s1["gain"]) if s1 and s1["gain"] else "-")
                    trs.append(cells)
                s0 = summary.get(((p, state, o, 1), "relu"))
                start = statistics.mean(r["start"] for r in rows if key(r) == (p, state, o, 1))
                md += [f"### {state}, {'SGD momentum 0.9' if o == 'sgd' else 'AdamW'} "
                       f"(start {start:.1f} %, dead at start "
                       f"{statistics.mean(r['start_dead'] for r in rows if key(r) == (p, state, o, 1)):.1f} %)", "",
                       md_table(hdr, trs), ""]
    data = dict(machine=machine(), verdict=verdict,
                summary={" | ".join(map(str, k[0])) + " | " + k[1]: v for k, v in summary.items()}, runs=rows)
    return "\n".join(md) + "\n", data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, 1x only: a smoke run")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--pairs", nargs="*", default=None, help="a subset of the pairs (by name)")
    ap.add_argument("--candidates", nargs="*", default=None, help="a subset of the candidates (relu always runs)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--render", default=None, metavar="STUDY_JSON",
                    help="write study.md again from a study.json's runs (no training)")
    args = ap.parse_args(argv)
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        md, data = summarise(payload["runs"], tuple(payload["mults"]))
        data.update(wall_s=payload["wall_s"], seeds=payload["seeds"], mults=payload["mults"])
        paths = write("study", md + f"\nWall time {payload['wall_s']:.0f} s (2 worker processes, one thread each).\n",
                      data, Path(args.out) if args.out else None)
        print("wrote", *paths)
        return
    seeds, mults = (2, (1,)) if args.quick else (args.seeds, (1, 3, 10))
    pairs = args.pairs or [p.name for p in PAIRS]
    cands = ["relu"] + [c for c in (args.candidates or [c.name for c in CANDIDATES]) if c != "relu"]
    t0 = time.time()
    rows = run(seeds, mults, args.workers, pairs, cands)
    md, payload = summarise(rows, mults)
    payload["wall_s"] = round(time.time() - t0, 1)
    payload["seeds"], payload["mults"] = seeds, list(mults)
    name = "study_quick" if args.quick else "study"
    paths = write(name, md + f"\nWall time {payload['wall_s']:.0f} s ({args.workers} worker processes, one thread each).\n",
                  payload, Path(args.out) if args.out else None)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()

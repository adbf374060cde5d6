"""A small, correct fine-tuning loop and the data files it reads.

A data file is a Python file with ``train_loader()`` and, optionally, ``val_loader()`` and
``loss_fn`` (default: cross-entropy). Loaders yield ``(x, y)`` batches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CollapseError, DataFileError, DivergenceError, ParameterError, first_line
from ..modes import eval_mode

OPTIM_PREFIX = "__optim__."

__all__ = ["DataSpec", "load_data", "finetune", "evaluate", "EpochResult", "seed_everything", "COLLAPSE_POINTS",
           "COLLAPSE_LOSS_RATIO"]

# A collapse: validation accuracy this many points below the start, or (without accuracy) the
# validation loss this many times the start's. Healthy fine-tuning moves by a point or two; the
# collapses the no-harm study records fall by 30 to 90 points.
COLLAPSE_POINTS = 10.0
COLLAPSE_LOSS_RATIO = 1.5


@dataclass
class DataSpec:
    train_loader: Callable[[], Iterable]
    val_loader: Callable[[], Iterable] | None
    loss_fn: Callable
    path: Path | None = None

    def batches(self, split: str = "train"):
        """The ``(x, y)`` batches of ``train_loader()`` or ``val_loader()``, checked as they come
        (the file's folder importable while its loader runs)."""
        make = self.train_loader if split == "train" else self.val_loader
        if make is None:
            raise DataFileError(f"{self.path.name if self.path else 'the data file'} has no val_loader(); "
                                "use --split train")
        return checked_batches(call_loader(make, f"{split}_loader", self.path), f"{split}_loader()")


def load_data(path) -> DataSpec:
    """Loads a data file (``train_loader()``, optional ``val_loader()`` and ``loss_fn``).

    Raises:
        DataFileError: the file is missing, fails to import, or lacks ``train_loader``.
    """
    from ..errors import ModelFileError
    from ..files.modelfile import import_file

    path = Path(path)
    if not path.exists():
        from ..files.fsutil import check_loop

        check_loop(path, "data file", DataFileError)
        raise DataFileError(f"data file {path} not found; give a .py file with a train_loader() function")
    if path.suffix != ".py":
        raise DataFileError(f"data file {path} is not a Python file; give a .py file with train_loader()")
    try:
        module, _ = import_file(path)
    except ModelFileError as exc:
        raise DataFileError(str(exc)) from exc
    train = getattr(module, "train_loader", None)
    if not callable(train):
        raise DataFileError(f"{path.name} has no train_loader() function; define one that returns (x, y) batches")
    val = getattr(module, "val_loader", None)
    loss = getattr(module, "loss_fn", None) or F.cross_entropy
    return DataSpec(train, val if callable(val) else None, loss, path)


def call_loader(make: Callable[[], Iterable], what: str, path) -> Iterable:
    import contextlib

    from ..files.modelfile import user_folders

    try:
        with user_folders(path) if path else contextlib.nullcontext():  # its folder, for the imports it makes
            return make()
    except (Exception, SystemExit) as exc:  # the data file's code: its failure is the user's (exit 2)
        name = Path(path).name if path else "data file"
        raise DataFileError(f"{name}:{what}() raised {type(exc).__name__}: {exc}") from exc


def _iterate(loader: Iterable, what: str):
    """The loader's items; an exception (or sys.exit) raised while iterating it is the data file's."""
    try:
        iterator = iter(loader)
    except (Exception, SystemExit) as exc:
        raise DataFileError(f"{what} returned a {type(loader).__name__}, which cannot be iterated "
                            f"({type(exc).__name__}: {first_line(exc)}); return a list or a DataLoader") from None
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except (Exception, SystemExit) as exc:
            raise DataFileError(f"{what} raised {type(exc).__name__} while it was iterated: {first_line(exc)}; "
                                "fix the data file") from None
        yield item


def checked_batches(loader: Iterable, what: str):
    """``(x, y)`` pairs of tensors from a data file's loader, checked; an empty loader is an error."""
    empty = True
    it = _iterate(loader, what)
    for batch in it:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise DataFileError(f"{what} must yield (x, y) batches, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                fix = "; wrap it with torch.from_numpy" if type(t).__module__.startswith("numpy") else ""
                raise DataFileError(f"{what} yielded {name} of type {type(t).__name__}: batches must be torch "
                                    f"tensors{fix}")
        if len(x) != len(y):
            raise DataFileError(f"{what} yielded x with {len(x)} rows and y with {len(y)}: one label per row")
        empty = False
        yield x, y
    if empty:
        raise DataFileError(f"{what} yielded no batches; it must yield (x, y) batches")


def _forward_loss(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, what: str) -> tuple:
    """``(output, loss)``; a batch the model or the loss rejects is the data file's problem,
    named with its shapes (the model already ran on its example inputs)."""
    try:
        out = model(x)
    except Exception as exc:
        raise DataFileError(f"the model rejected a batch from {what} (x {tuple(x.shape)} {x.dtype}): "
                            f"{type(exc).__name__}: {first_line(exc)}; make the batches fit the model") from exc
    if not isinstance(out, torch.Tensor) and loss_fn is F.cross_entropy:
        raise DataFileError(f"the model returns a {type(out).__name__}, not a tensor of outputs: define "
                            "loss_fn(output, y) in the data file to compute the loss from it")
    if loss_fn is F.cross_entropy and not y.is_floating_point() and out.dim() >= 2 and y.numel():  # out: a tensor
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= out.shape[1]:
            raise DataFileError(f"{what} yielded labels {lo}..{hi}, but the model has {out.shape[1]} outputs "
                                f"(classes 0..{out.shape[1] - 1}); fix the labels or the model's output size")
    try:
        loss = loss_fn(out, y)
    except (Exception, SystemExit) as exc:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataFileError(f"the loss rejected a batch from {what} (output {shape}, y {tuple(y.shape)} "
                            f"{y.dtype}): {type(exc).__name__}: {first_line(exc)}; class labels are int64 "
                            "indices, or define loss_fn in the data file") from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise DataFileError(f"the data file's loss_fn must return a scalar tensor, not {type(loss).__name__}")
    return out, loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


@dataclass
class EpochResult:
    epoch: int
    loss: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    dead_fraction: float | None = None


def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable = F.cross_entropy) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode over ``loader``."""
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad(), eval_mode(model):
        for x, y in checked_batches(loader, "val_loader()"):
            out, loss = _forward_loss(model, loss_fn, x, y, "val_loader()")
            loss_sum += float(loss) * len(y)
            if isinstance(out, torch.Tensor) and out.dim() == 2 and y.dim() == 1:
                correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return loss_sum / max(total, 1), correct / max(total, 1)


class _Watch:
    """The start's validation figures and the best weights seen, for collapse detection."""

    def __init__(self, model: nn.Module, data: DataSpec):
        self.model = model
        self.start_loss, self.start_acc = evaluate(model, call_loader(data.val_loader, "val_loader", data.path),
                                                   data.loss_fn)
        self.best = (self.start_acc, -self.start_loss)
        self.best_epoch = 0
        self.best_state = _snapshot(model)

    @property
    def best_name(self) -> str:
        return "the start's" if self.best_epoch == 0 else f"epoch {self.best_epoch}'s"

    def restore(self) -> None:
        self.model.load_state_dict(self.best_state)

    def after(self, result: EpochResult, history: list, lr: float, optimizer: str) -> None:
        acc, loss = result.val_accuracy or 0.0, result.val_loss
        score = (acc, -loss if loss is not None and math.isfinite(loss) else -math.inf)
        if score > self.best:
            self.best, self.best_epoch, self.best_state = score, result.epoch, _snapshot(self.model)
        has_acc = self.start_acc > 0 or acc > 0
        fell = (100 * (self.start_acc - acc) >= COLLAPSE_POINTS if has_acc else
                loss is None or not math.isfinite(loss) or loss > COLLAPSE_LOSS_RATIO * self.start_loss)
        if not fell:
            return
        self.restore()
        what = (f"validation accuracy fell from {100 * self.start_acc:.1f} % at the start to {100 * acc:.1f} % in "
                f"epoch {result.epoch}" if has_acc else
                f"validation loss rose from {self.start_loss:.4g} at the start to {loss:.4g} in epoch {result.epoch}")
        raise CollapseError(f"{what}: fine-tuning stopped and the model holds {self.best_name} weights. "
                            f"{_cause(self.model)} "
                            f"Fix: lower the learning rate ({optimizer} at {lr:g}; try {lr / 3:g}), or convert with "
                            "the default surrogate, which keeps ReLU's gradient at every unit that fires",
                            history=history, best_epoch=self.best_epoch)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cause(model: nn.Module) -> str:
    """The likely cause, from what the model runs."""
    from ..passes.report import report_of

    report = report_of(model)
    surrogates = sorted({s.surrogate for s in (report.sites if report else []) if s.surrogate})
    if not surrogates:
        return "The likely cause: a learning rate too high for this model."
    return (f"The likely cause: the surrogate gradient ({', '.join(surrogates)}) passes gradient through units "
            "that do not fire, which raises the backward's gain layer by layer at a rate tuned for ReLU.")


def check_lr(lr: float, params) -> None:
    """ParameterError unless ``lr`` is a positive finite number that fits the parameters' dtype
    (the optimizer's update multiplies in it: 1e308 overflows float32)."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ParameterError(f"learning rate {lr} must be a positive number")
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    for dtype in sorted(dtypes, key=lambda d: torch.finfo(d).max):
        top = torch.finfo(dtype).max
        if lr > top:
            raise ParameterError(f"learning rate {lr:g} does not fit the model's {str(dtype).removeprefix('torch.')} "
                                 f"parameters (at most {top:.3g}); pass a learning rate such as 1e-3")


def finetune(
    model: nn.Module,
    data: DataSpec,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    audit_dead: bool = True,
    start_epoch: int = 0,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    stop_on_collapse: bool = True,
) -> list[EpochResult]:
    """Trains ``model`` in place; the same seed gives the same weights.

    With a validation loader, the start is measured first, and an epoch whose validation accuracy
    falls ``COLLAPSE_POINTS`` (10) points below the start's (or, for a model without accuracy, whose
    validation loss exceeds ``COLLAPSE_LOSS_RATIO`` (1.5) times the start's) stops training: the model
    gets back the best weights seen (the start's included) and ``CollapseError`` names the likely cause
    and the fix (``stop_on_collapse=False`` trains on).

    Each epoch reseeds with ``seed + epoch`` and rebuilds the loaders, so a run resumed at
    ``start_epoch`` from saved weights continues exactly as an uninterrupted one would.

    ``optimizer_state`` (tensors keyed ``__optim__.<param>.<slot>``) is loaded before training
    and replaced by the final state after it, so weights plus this state resume exactly.

    ``max_steps`` stops training after that many optimizer steps in all (the epoch it stops in
    is measured and recorded, as a whole one is).

    Raises:
        DataFileError: a loader fails or yields something that is not ``(x, y)``.
        ParameterError: an unknown optimizer or a learning rate that is not a positive number.
        DivergenceError: the loss is not finite (lower the learning rate).
        CollapseError: validation collapsed against the start (a DivergenceError; exit 1).
    """
    if optimizer not in ("sgd", "adamw"):
        raise ParameterError(f"optimizer {optimizer!r} is not one of sgd, adamw")
    params = [p for p in model.parameters() if p.requires_grad]
    check_lr(lr, params)
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    if optimizer_state:
        for p, n in names.items():
            for key, value in optimizer_state.items():
                prefix = f"{OPTIM_PREFIX}{n}."
                if key.startswith(prefix):
                    slot = key[len(prefix):]
                    opt.state[p][slot] = value.clone() if slot != "step" else value.clone().reshape(())
    history = []
    taken = 0
    watch = _Watch(model, data) if stop_on_collapse and data.val_loader is not None else None
    for epoch in range(start_epoch, start_epoch + epochs):
        if max_steps is not None and taken >= max_steps:
            break
        seed_everything(seed + epoch)
        model.train()
        loss_sum, n = 0.0, 0
        loader = call_loader(data.train_loader, "train_loader", data.path)
        for step, (x, y) in enumerate(checked_batches(loader, "train_loader()")):
            opt.zero_grad(set_to_none=True)
            _, loss = _forward_loss(model, data.loss_fn, x, y, "train_loader()")
            if not torch.isfinite(loss):
                kept = ""
                if watch is not None:  # the best weights seen, not the broken ones
                    watch.restore()
                    kept = f"; the model holds {watch.best_name} weights"
                raise DivergenceError(f"loss became {float(loss.detach())} in epoch {epoch + 1}{kept}; lower --lr")
            if not loss.requires_grad:  # a constant: backward would fail inside torch
                raise DataFileError("the data file's loss_fn returned a value that does not depend on the model's "
                                    "output (it has no gradient); compute the loss from loss_fn's first argument")
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            n += len(y)
            taken += 1
            if on_step:
                on_step(epoch, step)
            if max_steps is not None and taken >= max_steps:
                break
        result = EpochResult(epoch + 1, loss_sum / max(n, 1))
        if data.val_loader is not None:
            result.val_loss, result.val_accuracy = evaluate(model, call_loader(data.val_loader, "val_loader", data.path),
                                                            data.loss_fn)
        if audit_dead:
            from .deadunits import audit

            result.dead_fraction = audit(model, call_loader(data.train_loader, "train_loader", data.path)).dead_fraction
        history.append(result)
        if on_epoch:
            on_epoch(result)
        if watch is not None:
            watch.after(result, history, lr, optimizer)
    if optimizer_state is not None:
        optimizer_state.clear()
        for p, n in names.items():
            for slot, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    optimizer_state[f"{OPTIM_PREFIX}{n}.{slot}"] = value.detach().clone().reshape(value.shape or (1,))
    return history

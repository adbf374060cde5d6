"""File-level workflows behind the CLI commands, one function each (usable from Python too)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from ..errors import InputError
from ..files.checkpoint import is_checkpoint, open_checkpoint, save_checkpoint
from ..files.inputs import make_inputs, parse_input_spec, run_model
from ..files.modelfile import LoadedModel, load_model
from ..files.weights import load_state_into, load_weights
from ..passes.config import SugarConfig
from ..passes.report import Report

__all__ = ["resolve_inputs", "inspect_file", "convert_file", "export_file", "verify_file", "open_source", "sweep_file",
           "read_config_file"]


def resolve_inputs(example: tuple | None, input_shapes: Sequence[str] | None, where: str) -> tuple:
    """--input-shape wins; else the file's example_inputs(); else a clear error."""
    if input_shapes:
        return make_inputs([parse_input_spec(s) for s in input_shapes])
    if example is not None:
        return example
    raise InputError(
        f"no example inputs for {where}: add an example_inputs() function to the model file "
        "or pass --input-shape (e.g. --input-shape 1,3,224,224)"
    )


def check_not_model_code(outs, loaded: LoadedModel) -> None:
    """Refuses an output that is the model file or a file of its closure (a module it imports, a
    file it reads), even with --force: the artifact would replace the code the checkpoint's hash
    vouches for.

    Raises:
        OutputPathError: naming the output and the file of the model's code it is.
    """
    from ..errors import OutputPathError
    from ..files.fsutil import same_file

    code = [(loaded.path.name, loaded.path)] + [(rel, loaded.path.parent / rel) for rel in sorted(loaded.closure)]
    for out in outs:
        for rel, file in code:
            if out is not None and same_file(str(out), file):
                raise OutputPathError(f"{out} is {rel}, a file of the model's own code ({loaded.path.name} "
                                      f"{'is the model file' if file == loaded.path else 'imports or reads it'}): "
                                      "sugarize never writes over it, --force or not; give another -o")


@dataclass
class Source:
    """A model file or a SUGAR checkpoint, opened: the original model with its weights."""

    original: nn.Module
    sugar: nn.Module | None
    inputs: tuple | None
    label: str
    loaded: LoadedModel
    notes: list[str] = field(default_factory=list)


def open_source(source: str, *, weights: str | None = None, model: str | None = None,
                trust_recipe: bool = False) -> Source:
    """Opens MODEL (``file.py[:NAME]``) or CHECKPOINT (``.safetensors``), then --weights if given.

    A checkpoint's model file runs only if ``model`` names it or ``trust_recipe`` is set,
    and only if its hash matches the recipe (``files.checkpoint.model_file_of``)."""
    if is_checkpoint(source):
        ck = open_checkpoint(source, model=model, trust_recipe=trust_recipe)
        # ck.notes (which function ran) reached the user as a SugarizeNote warning already
        src = Source(ck.original, ck.sugar, ck.inputs, Path(source).name, ck.loaded)
    else:
        loaded = load_model(source)
        src = Source(loaded.model, None, loaded.example_inputs, loaded.path.name, loaded)
    if weights:
        state = load_weights(weights)
        load_state_into(src.original, state, f"weights {Path(weights).name}")
        if src.sugar is not None:
            load_state_into(src.sugar, state, f"weights {Path(weights).name}")
    return src


def inspect_file(model: str, *, config: SugarConfig | None = None, model_file: str | None = None,
                 trust_recipe: bool = False) -> Report:
    """The activation sites of a model file or checkpoint (``sugarize inspect``).

    A checkpoint with neither ``model_file`` nor ``trust_recipe`` shows the report its recipe
    recorded, and runs no code."""
    from ..files.checkpoint import read_recipe
    from ..passes.rewrite import inspect

    if is_checkpoint(model) and model_file is None and not trust_recipe:
        recipe = read_recipe(model)
        report = Report.from_dict(recipe["report"])
        report.notes.append(f"recorded in {Path(model).name}'s recipe at `sugarize convert` time; no code was "
                            "run (pass --model to rebuild and inspect the model itself)")
        return report
    src = open_source(model, model=model_file, trust_recipe=trust_recipe)
    return inspect(src.sugar if src.sugar is not None else src.original, config=config, example_args=src.inputs)


@dataclass
class ConvertOutcome:
    path: Path
    report: Report
    config: SugarConfig
    inputs: list[dict[str, Any]] | None


def convert_file(model: str, out: str, *, config: SugarConfig, input_shapes: Sequence[str] | None = None,
                 force: bool = False, config_file: str | None = None) -> ConvertOutcome:
    """Converts a model file and writes a SUGAR checkpoint (``sugarize convert``); ``config_file``
    (the JSON ``config`` was read from) is an input, never the output."""
    from ..files.fsutil import check_output
    from ..files.inputs import input_specs
    from ..passes.rewrite import sugarize

    check_output(out, model, config_file, force=force)
    loaded = load_model(model)
    check_not_model_code([out], loaded)
    inputs = None
    if input_shapes or loaded.example_inputs is not None:
        inputs = resolve_inputs(loaded.example_inputs, input_shapes, loaded.path.name)
        run_model(loaded.model, inputs)
    # The loaded model is ours alone: convert it without a copy of its weights (half the memory).
    sm = sugarize(loaded.model, config=config, example_args=inputs, copy=False)
    path = save_checkpoint(sm, out, loaded=loaded, inputs=inputs, force=force)
    return ConvertOutcome(path, sm.meta["sugarize"]["report"], config, input_specs(inputs) if inputs else None)


@dataclass
class ExportOutcome:
    export: Any
    parity: Any
    notes: list[str]
    int8: Any = None  # an Int8Report with --int8
    written: bool = True  # False: a check failed, and the output was not written (an old one is untouched)


def _rechunk(batches, size: int | None, limit: int | None = None):
    """``(x, y)`` batches cut to a static batch size (an export without --dynamic-batch)."""
    import numpy as np

    n = 0
    for x, y in batches:
        x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
        step = size or len(x)
        for i in range(0, len(x) - step + 1, step):
            if limit is not None and n >= limit:
                return
            n += 1
            yield x[i:i + step], y[i:i + step]


def export_file(source: str, out: str, *, weights: str | None = None, model: str | None = None,
                input_shapes: Sequence[str] | None = None, force: bool = False, atol: float = 1e-5,
                rtol: float = 1e-5, batches: int = 3, seed: int = 0, int8: bool = False, data: str | None = None,
                calibration_batches: int = 32, allow_nonfinite: bool = False, trust_recipe: bool = False,
                format: str | None = None, **options: Any) -> ExportOutcome:
    """Strips, exports to a deploy target, checks the file and runs the parity check (``sugarize export``).

    ``format`` names the target (``deploy.targets.TARGETS``; default ONNX); ``options`` are the export options
    the target declares (``opset=17``, ``dynamic_batch=True``, ``backend="portable"``: see each
    target's ``options``), refused by name where the target does not take them. The original
    model is exported the same way, once, and the artifact must be structurally identical to
    it; nothing is written unless every check passes. The shared part of every export is here:
    eval mode, the KV cache off, strip, the count of sites. With ``int8`` (targets with an int8
    path) it also writes the target's ``int8_path``, compared with the quantised original and
    on ``data``'s val_loader.
    """
    from ..deploy.parity import verify
    from ..deploy.targets import DEFAULT_FORMAT, TARGETS, ExportOptions, get_target
    from ..files.fsutil import atomic_folder, check_outputs, scratch_beside
    from ..modes import eval_mode, without_kv_cache
    from ..passes.strip import strip_

    target = get_target(format or DEFAULT_FORMAT)
    opts = target.check_options(ExportOptions(**options))
    if int8 and target.int8 is None:
        takes = ", ".join(t.name for t in TARGETS.values() if t.int8)
        raise InputError(f"--int8 applies to --format {takes}, not {target.name}")
    if int8 and not data:
        raise InputError("--int8 needs calibration data: pass --data DATA.py (a file with train_loader())")
    companions = target.companions(Path(out), opts)
    q_path = target.int8_path(Path(out)) if int8 else None
    check_outputs([out, *companions, q_path], source, weights, model, data, force=force)
    target.check_available()
    spec = None
    if int8:
        from ..training.train import load_data

        spec = load_data(data)
    src = open_source(source, weights=weights, model=model, trust_recipe=trust_recipe)
    inputs = resolve_inputs(src.inputs, input_shapes, src.label)
    run_model(src.original, inputs)
    # nothing is written before this: the closure includes what the forward imported or read
    check_not_model_code([out, *companions, q_path], src.loaded)
    reference = _reference(src)
    # Once, in place (the checkpoint's model is not used again): exported below and compared
    # in the parity check; its report counts the sites.
    plain = src.sugar if src.sugar is not None else src.original
    sites = len(strip_(plain).sites)
    notes = src.notes
    # Every check runs on a temporary file beside the output; it becomes the output only if
    # they all pass, so a failed check (or a kill) leaves a previous output as it was.
    with eval_mode(plain, reference), without_kv_cache(plain, reference) as no_cache, \
            scratch_beside(out) as refdir:
        if no_cache:
            notes.append("exported without the KV cache (use_cache=False for the export, as optimum's no-past "
                         "export): the graph takes the tokens and returns the logits")
        ref = target.export(reference, Path(refdir) / f"original{target.suffix}", inputs, opts)
        try:
            # the int8 file is a companion too: written in the folder, placed with the rest (both or neither)
            placed = tuple(c.name for c in companions) + ((q_path.name,) if q_path else ())
            with atomic_folder(out, force=force, companion_files=placed) as folder:
                tmp = folder / Path(out).name
                result = target.export(plain, tmp, inputs, opts)
                moved = Path(out).with_name
                result = replace(result, path=Path(out), stripped_sites=sites,
                                 external_data=moved(result.external_data.name) if result.external_data else None,
                                 companions=[moved(c.name) for c in result.companions])
                parity = verify(tmp, reference, inputs, stripped=plain, reference_artifact=ref.path, atol=atol,
                                rtol=rtol, batches=batches, seed=seed, target=target,
                                batch_sizes=(1, 8) if opts.dynamic_batch else None, allow_nonfinite=allow_nonfinite,
                                sequence_lengths=_lengths(inputs) if opts.dynamic_sequence else None)
                if not parity.passed:
                    raise _ChecksFailed()
                q = None
                if int8:
                    static = None if opts.dynamic_batch else int(inputs[0].shape[0])
                    calib = [(x,) for x, _ in _rechunk(spec.batches("train"), static, calibration_batches)]
                    validation = None
                    if spec.val_loader is not None:
                        def validation():
                            return _rechunk(spec.batches("val"), static)
                    q = target.quantize(plain, reference, inputs, tmp, Path(ref.path), folder / q_path.name, calib,
                                        validation, True)
                    q.path = str(q_path)
        except _ChecksFailed:
            return ExportOutcome(result, parity, notes, None, written=False)
    return ExportOutcome(result, parity, notes, q)


def format_of_output(out, format: str | None) -> str:
    """``--format`` if given, else the target whose suffix ``out`` has, else the default (onnx).

    Raises:
        InputError: ``out`` has the suffix of another target's files than ``--format`` writes.
    """
    from ..deploy.targets import DEFAULT_FORMAT, TARGETS, get_target

    suffix = Path(str(out)).suffix.lower()
    by_suffix = next((t for t in TARGETS.values() if t.suffix == suffix), None)
    if format is None:
        return (by_suffix or get_target(DEFAULT_FORMAT)).name
    target = get_target(format)
    if by_suffix is not None and by_suffix is not target:
        raise InputError(f"-o {Path(str(out)).name} is named as {by_suffix.title} ({suffix}) but --format "
                         f"{target.name} writes {target.title}; name it {Path(str(out)).stem}{target.suffix}, or "
                         "drop --format")
    return target.name


def _lengths(inputs: tuple) -> tuple[int, ...]:
    """Sequence lengths parity checks a dynamic-sequence export at: the example's and half of it."""
    from ..deploy.export import is_token_input

    n = next((t.shape[1] for t in inputs if is_token_input(t)), None)
    return tuple(sorted({max(1, n // 2), n})) if n else ()


def _reference(src: Source) -> nn.Module:
    """The model an export of ``src`` must compute: the original, or where the SUGAR model
    relufied sites (their forward changed on purpose), the original with those sites ReLU
    (``strip(sugarize(original))`` with the checkpoint's config: the same weights, no training)."""
    from ..passes.rewrite import sugarize
    from ..passes.strip import strip

    info = (getattr(src.sugar, "meta", None) or {}).get("sugarize", {}) if src.sugar is not None else {}
    config = info.get("config")
    if not config or not config.get("relufy"):
        return src.original
    src.notes.append("relufied sites: parity and structure are checked against the original with those sites "
                     "ReLU, its forward as converted")
    return strip(sugarize(src.original, config=SugarConfig.from_dict(config)), copy=False)


class _ChecksFailed(Exception):
    """A check failed on the temporary export: it is not renamed to the output."""


def verify_file(path: str, against: str, *, weights: str | None = None, model: str | None = None,
                input_shapes: Sequence[str] | None = None, atol: float = 1e-5, rtol: float = 1e-5,
                batches: int = 3, seed: int = 0, runtime: str | None = None, allow_nonfinite: bool = False,
                trust_recipe: bool = False):
    """Parity and structure of an artifact (any registered target's, told by its bytes)
    against a model file or checkpoint (``sugarize verify``): the original is exported the way
    the file was (opset, dynamic dimensions, backend) and compared with it."""
    from ..deploy.parity import verify
    from ..deploy.targets import target_of_file
    from ..passes.strip import strip

    target = target_of_file(path)
    target.check_available()
    if runtime is not None and runtime not in target.runtimes:
        raise InputError(f"--runtime {runtime} does not run {target.title} files; use "
                         f"{' or '.join(target.runtimes)}")
    target.check_file(path)
    options = target.export_options_of(path)
    src = open_source(against, weights=weights, model=model, trust_recipe=trust_recipe)
    inputs = resolve_inputs(src.inputs, input_shapes, src.label)
    run_model(src.original, inputs)
    reference = _reference(src)
    stripped = strip(src.sugar, copy=False) if src.sugar is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        ref = target.export(reference, Path(tmp) / f"original{target.suffix}", inputs, options)
        return verify(path, reference, inputs, stripped=stripped, reference_artifact=ref.path, atol=atol,
                      rtol=rtol, batches=batches, seed=seed, batch_sizes=(1, 8) if options.dynamic_batch else None,
                      runtime=runtime, allow_nonfinite=allow_nonfinite, target=target,
                      sequence_lengths=_lengths(inputs) if options.dynamic_sequence else None)


def audit_file(model: str, data: str, *, weights: str | None = None, split: str = "train",
               plot: str | None = None, force: bool = True, model_file: str | None = None,
               trust_recipe: bool = False):
    """Dead units and sparsity of a model file or checkpoint on a data file (``sugarize audit``)."""
    from ..training.deadunits import audit
    from ..training.train import load_data

    if plot:  # before the audit runs: an existing plot is replaced only with --force, never an input
        _check_plot(plot, model, data, weights, model_file, force=force)
    src = open_source(model, weights=weights, model=model_file, trust_recipe=trust_recipe)
    check_not_model_code([plot], src.loaded)
    spec = load_data(data)
    report = audit(src.sugar if src.sugar is not None else src.original, spec.batches(split))
    if plot:
        from .plots import plot_audit

        plot_audit(report, plot, force=force)
    return report


def _check_plot(plot: str, *inputs, force: bool) -> None:
    """A plot output, checked before any work: an output (``check_output``), and matplotlib there."""
    from ..files.fsutil import check_output
    from .plots import check_plotting

    check_output(plot, *inputs, force=force)
    check_plotting()


def finetune_file(checkpoint: str, data: str, out: str, *, epochs: int, lr: float, optimizer: str = "sgd",
                  seed: int = 0, resume: str | None = None, model: str | None = None, force: bool = False,
                  on_step=None, on_epoch=None, trust_recipe: bool = False, plot: str | None = None):
    """Fine-tunes a SUGAR checkpoint on a data file and writes the weights (``sugarize finetune``)."""
    import json

    from ..files.fsutil import check_output
    from ..files.weights import load_weights, save_weights
    from ..files.checkpoint import read_recipe
    from ..training.train import finetune, load_data

    check_output(out, checkpoint, data, model, force=force)  # --resume may be the output: it continues that file
    if plot:
        _check_plot(plot, checkpoint, data, model, resume, out, force=force)
    spec = load_data(data)
    src = open_source(checkpoint, model=model, trust_recipe=trust_recipe)
    check_not_model_code([out, plot], src.loaded)
    if src.sugar is None:
        from ..errors import CheckpointError

        raise CheckpointError(f"{checkpoint} is not a SUGAR checkpoint; create one with `sugarize convert`")
    start, optim_state = 0, {}
    if resume:
        load_state_into(src.sugar, load_weights(resume), f"weights {Path(resume).name}")
        optim_state = load_weights(resume, optimizer_state=True)
        start = _resume_epoch(resume)
    from ..errors import CollapseError

    def write(epoch: int, state: dict) -> None:
        meta = {"sugarize_finetune": json.dumps({"epoch": epoch, "seed": seed, "lr": lr,
                                                 "optimizer": optimizer, "checkpoint": Path(checkpoint).name,
                                                 "surrogate": read_recipe(checkpoint)["config"]["surrogate"]})}
        save_weights({**src.sugar.state_dict(), **state}, out, metadata=meta, force=force)

    try:
        history = finetune(src.sugar, spec, epochs=epochs, lr=lr, optimizer=optimizer, seed=seed, start_epoch=start,
                           optimizer_state=optim_state, on_step=on_step, on_epoch=on_epoch)
    except CollapseError as exc:  # the model holds the best weights seen: they are what is written
        write(exc.best_epoch or start, {})
        raise CollapseError(f"{exc} (the best weights, without optimizer state, are in {Path(out).name})",
                            history=exc.history, best_epoch=exc.best_epoch) from None
    write(start + epochs, optim_state)
    if plot:
        from .plots import plot_history

        plot_history(history, plot, force=force)
    return history


def _resume_epoch(path: str) -> int:
    import json

    from safetensors import safe_open

    meta = None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("sugarize_finetune")
        if meta:
            return int(json.loads(meta)["epoch"])
    except Exception:  # a torch file, or metadata written by something else
        pass
    import warnings

    from ..errors import SugarizeWarning

    warnings.warn(f"{Path(path).name} records no finished epoch (it was not written by `sugarize finetune`): "
                  "epochs count from 1 again, so the data order differs from an uninterrupted run", SugarizeWarning,
                  stacklevel=2)
    return 0


MAX_CONFIG_BYTES = 1 << 20  # a conversion config is a few hundred bytes


def read_config_file(path: str) -> SugarConfig:
    """A conversion config written by ``sugarize sweep`` (or ``SugarConfig.to_json``): JSON only, no
    code runs; every field is checked (``SugarConfig.from_dict``).

    Raises:
        InputError: the file is missing, too large, not JSON, or not a valid config.
    """
    import json

    from ..errors import SugarizeError, first_line

    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file {p} not found; give the JSON file `sugarize sweep` wrote")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"config file {p.name} is {p.stat().st_size:,} bytes, more than a config holds "
                         f"({MAX_CONFIG_BYTES:,}); give the JSON file `sugarize sweep` wrote")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"config file {p.name} is not JSON ({first_line(exc)}); give the file `sugarize sweep` "
                         "wrote") from None
    try:
        return SugarConfig.from_dict(data)
    except (TypeError, ValueError, SugarizeError) as exc:
        raise InputError(f"config file {p.name}: {first_line(exc)}") from None


def sweep_file(model: str, data: str, *, candidates: str | None = None, seeds: int = 3, epochs: int = 1,
               steps: int | None = None, lr: float = 1e-3, optimizer: str = "sgd", config: SugarConfig | None = None,
               capture: str = "auto", output: str | None = None, plot: str | None = None, force: bool = False,
               model_file: str | None = None, trust_recipe: bool = False, on_step=None, on_run=None):
    """Sweeps the candidate surrogates on a model file or checkpoint (``sugarize sweep``); writes the
    winner's config to ``output`` (JSON, for ``sugarize convert --config``) if one beats ReLU.

    Every output is checked before any training: an existing file is replaced only with ``force``,
    an input never. A checkpoint's own conversion options (sites, relufy) are the base config
    unless ``config`` is given.
    """
    from ..files.checkpoint import read_recipe
    from ..files.fsutil import atomic_path, check_outputs
    from ..training.sweep import parse_candidates, sweep
    from ..training.train import load_data

    check_outputs([output, plot], model, data, model_file, force=force)  # pairwise distinct, none an input
    if plot:
        _check_plot(plot, model, data, model_file, force=force)
    cands = parse_candidates(candidates) if candidates else None  # a bad spec fails before anything runs
    spec = load_data(data)
    src = open_source(model, model=model_file, trust_recipe=trust_recipe)
    check_not_model_code([output, plot], src.loaded)
    if config is None and src.sugar is not None:
        config = SugarConfig.from_dict(read_recipe(model)["config"])
    result = sweep(src.original, spec, candidates=cands, seeds=seeds, epochs=epochs, steps=steps, lr=lr,
                   optimizer=optimizer, config=config, capture=capture, on_step=on_step, on_run=on_run)
    winner = result.winner_config()
    if output and winner is not None:
        with atomic_path(output, force=force) as tmp:
            tmp.write_text(winner.to_json() + "\n")
            read_config_file(str(tmp))  # what convert --config will read back
    if plot:
        from .plots import plot_sweep

        plot_sweep(result, plot, force=force)
    return result

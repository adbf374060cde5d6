"""The sugarize command line: a thin typer layer, one library call per command."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import __version__
from ..errors import ParityError, SugarizeError
from ..options import DEFAULT_SAVE, DEFAULT_SURROGATE

class _OneLineErrors(TyperGroup):
    """Usage mistakes (an unknown option, a bad value, a missing argument) as one line on stderr
    and exit 2, like every other mistake: click would print the usage and a boxed message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:  # typer >= 0.24 carries its own copy of click
            from typer._click import exceptions as click
        except ImportError:  # pragma: no cover - older typer: click itself
            from click import exceptions as click

        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except getattr(click, "NoArgsIsHelpError", ()) as exc:  # bare `sugarize`: the help, as asked for
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f"`{exc.ctx.command_path} --help`" if exc.ctx is not None else "`sugarize --help`"
            msg = " ".join(exc.format_message().split())
            err.print(f"[bold red]error:[/] {escape(msg)} (see {escape(where)})", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            err.print(f"[bold red]error:[/] {escape(' '.join(exc.format_message().split()))}", highlight=False,
                      soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("interrupted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="sugarize",
    cls=_OneLineErrors,
    help="Fine-tune ReLU networks with SUGAR surrogate gradients and ship the same ReLU graph.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False, "verbose": False}


def _version(value: bool):
    if value:
        typer.echo(f"sugarize {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show what third-party tools print (flatc, ExecuTorch's "
                                 "cpuinfo), kept off the terminal otherwise."),
):
    _state["debug"] = debug
    _state["verbose"] = verbose


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that temporary files are removed on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _traceback() -> None:
    """--debug: the traceback on stderr, before the one line; the exit code stays the error's."""
    import traceback

    traceback.print_exc(file=sys.stderr)


def _ours(w) -> bool:
    from ..errors import SugarizeWarning

    return issubclass(w.category, SugarizeWarning) or str(w.message).startswith("sugarize")


def _show_warnings(caught, failed: bool) -> None:
    """sugarize's own warnings (what the user must act on) and notes after a command that
    succeeded; dependencies' warnings (internal paths, deprecations) only under --debug, and
    after an error only under --debug: the error stays the first and only line."""
    from ..errors import SugarizeNote

    seen = set()
    for w in caught:
        text = " ".join(str(w.message).split())
        if text in seen:
            continue
        seen.add(text)
        label = "note" if issubclass(w.category, SugarizeNote) else "warning"
        if _state["debug"]:
            where = "" if _ours(w) else f" ({w.category.__name__}, {w.filename}:{w.lineno})"
            err.print(f"[yellow]{label}:[/] {escape(text + where)}", highlight=False, soft_wrap=True)
        elif _ours(w) and not failed:
            err.print(f"[yellow]{label}:[/] {escape(text.removeprefix('sugarize: '))}", highlight=False, soft_wrap=True)


def command(fn: Callable) -> Callable:
    """Maps library errors to one line on stderr and their exit code; never a traceback.

    Warnings raised while the command runs are captured (this process is the CLI's own; the
    filters come back after it) and shown by ``_show_warnings``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        failed = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out_ = _run_command(fn, args, kwargs)
                failed = False
                return out_
            except typer.Exit as exc:
                failed = bool(exc.exit_code)
                raise
            finally:
                _show_warnings(caught, failed)

    return wrapper


def _run_command(fn: Callable, args, kwargs):
    """The command, its errors mapped to one line on stderr and an exit code."""
    import signal
    import threading

    from ..files.closure import session

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from ..modes import tool_output

        # the model's closure stays in force while its code is in use: the whole command
        with session(), tool_output(_state["verbose"]):
            return fn(*args, **kwargs)
    except Terminated:
        err.print("terminated")
        raise typer.Exit(143) from None
    except SugarizeError as exc:
        msg = " ".join(str(exc).split())
        label = {1: "check failed", 3: "internal error"}.get(exc.exit_code, "error")
        hint = " (a bug of sugarize: rerun with --debug and report it)" if exc.exit_code == 3 else ""
        err.print(f"[bold red]{label}:[/] {escape(msg)}{hint}", highlight=False, soft_wrap=True)
        if _state["debug"]:  # after the error's line: it stays the first
            _traceback()
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except BaseException as exc:  # the user's code (anything it raises, SystemExit too), else a bug of ours
        from ..files.usercode import blame

        failure = blame(exc)
        if failure is None and not isinstance(exc, Exception):
            raise
        if failure is not None:
            err.print(f"[bold red]error:[/] {escape(' '.join(failure.message().split()))}", highlight=False,
                      soft_wrap=True)
            if _state["debug"]:
                _traceback()
            raise typer.Exit(2) from None
        if isinstance(exc, ValueError) and "null byte" in str(exc):  # os.* on a path with a NUL in it
            err.print("[bold red]error:[/] a path holds a NUL byte, which no file name can (from a recipe, a config "
                      "or an argument): check where it came from", highlight=False, soft_wrap=True)
            if _state["debug"]:
                _traceback()
            raise typer.Exit(2) from None
        msg = " ".join(str(exc).split())
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(msg)} (rerun with --debug and report it)",
                  highlight=False, soft_wrap=True)
        if _state["debug"]:
            _traceback()
        raise typer.Exit(3) from None


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _flags(surrogate, param, negative_only, include, exclude, save, relufy, relufy_surrogate=None) -> dict:
    """The conversion flags as the library's keywords (``sugarize()``'s, ``SugarConfig``'s fields)."""
    from ..errors import ParameterError

    params = {}
    for p in param or []:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--param {p!r}: write it as NAME=VALUE, e.g. --param alpha=1.67")
        params[key.strip()] = value.strip()
    return dict(surrogate=surrogate, params=params, negative_only=negative_only, save=save,
                include=tuple(include or ()), exclude=tuple(exclude or ()), relufy=relufy or (),
                relufy_surrogate=relufy_surrogate)


# the conversion flags by the keyword (SugarConfig field) each one sets
FLAG_OF = {"surrogate": "--surrogate", "params": "--param", "negative_only": "--negative-only",
           "save": "--save-precision", "include": "--include", "exclude": "--exclude", "relufy": "--relufy",
           "relufy_surrogate": "--relufy-surrogate"}


def _config(surrogate, param, negative_only, include, exclude, save, relufy, relufy_surrogate=None):
    from ..passes.config import SugarConfig

    return SugarConfig(**_flags(surrogate, param, negative_only, include, exclude, save, relufy, relufy_surrogate))


def _table(title: str, *columns: str) -> Table:
    """A left-titled rich table with these column headers."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    return table


def _narrow_table(title: str, first: str, *columns: str) -> Table:
    """A table that fits an 80-column terminal: no vertical rules, headers that wrap, and the first
    column (the names a user copies, e.g. ``nelu:alpha=0.1:neg``) never cut or wrapped."""
    from rich import box

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=0)
    for col in (first, *columns):
        table.add_column(col, no_wrap=True)
    return table


def _sites_table(report) -> Table:
    table = _table(f"activation sites (capture: {report.capture})",
                   "#", "module path", "spelling", "status", "surrogate", "note")
    colors = {"converted": "green", "sugar": "green", "convertible": "cyan", "skipped": "yellow", "stripped": "blue"}
    for i, s in enumerate(report.sites):
        c = colors.get(s.status, "white")
        table.add_row(str(i), escape(s.path or "<model>"), escape(s.spelling), f"[{c}]{s.status}[/]",
                      escape(s.surrogate or ""), escape(s.reason or ""))
    return table


def _parity_table(report) -> Table:
    table = _table(f"parity: {report.runtime}, {report.providers[0]}, {report.optimization}",
                   "output", "vs", "shape", "dtype", "max abs", "max rel", "mismatched", "ok")
    for o in report.outputs:
        ok = "[green]yes[/]" if o.passed else "[red]NO[/]"
        table.add_row(escape(o.name), o.reference, "x".join(map(str, o.shape)), o.dtype, f"{o.max_abs:.2e}",
                      f"{o.max_rel:.2e}", str(o.mismatched), ok)
    return table


COMMON_SURROGATE = typer.Option(DEFAULT_SURROGATE, "--surrogate", "-s", help="Surrogate name (see `sugarize surrogates`).")
ALLOW_NONFINITE = typer.Option(False, "--allow-nonfinite",
                               help="Pass outputs that are NaN/inf on both sides (a failure by default).")
MODEL_FILE = typer.Option(None, "--model", help="The model file a checkpoint was made from (model.py[:NAME]): "
                                                 "its code runs only if you name it here.")
TRUST_RECIPE = typer.Option(False, "--trust-recipe",
                            help="Run the model file a checkpoint's recipe names (after the sha256 check).")
def _tolerance(value: float) -> float:
    import math

    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"{value} is not a tolerance: give a finite number >= 0, such as 1e-5")
    return value


def _plot_path(value: Optional[Path]) -> Optional[Path]:
    if value is not None and value.suffix.lower() not in PLOT_SUFFIXES:
        raise typer.BadParameter(f"{value.name}: a plot is written as {', '.join(PLOT_SUFFIXES)}; name the file so")
    return value


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
SEED_MAX = 2**63 - 1  # what torch.manual_seed and every generator take
# Sane upper bounds for counts (2**64 epochs is a typo, not a plan): far above any real run.
MAX_EPOCHS, MAX_STEPS, MAX_BATCHES = 100_000, 10**9, 100_000


def _choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
    return value


def _tol_option(name: str):
    return typer.Option(1e-5, name, callback=_tolerance, help="Tolerance, finite and >= 0.")


def _seed_option():
    return typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed, 0 to 2**63 - 1.")


DATA_FILE = typer.Option(..., "--data", help="Data file with train_loader() (and val_loader(), loss_fn).")
OPTIMIZER = typer.Option("sgd", "--optimizer", callback=lambda v: _choice(v, "--optimizer", ("sgd", "adamw")),
                         help="sgd (momentum 0.9) or adamw.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="Example input shape, repeatable: 1,3,224,224 or 1,16:int64.")


@app.command("inspect")
@command
def inspect_cmd(
    model: str = typer.Argument(..., help="MODEL (model.py[:NAME]) or a SUGAR checkpoint."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Module-path glob to convert (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Module-path glob to leave alone (repeatable)."),
    relufy: Optional[str] = typer.Option(None, "--relufy", help="Also list GELU/SiLU sites as convertible: gelu,silu."),
    model_file: Optional[str] = MODEL_FILE,
    trust_recipe: bool = TRUST_RECIPE,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """List every ReLU site: module path, spelling, and converted or skipped with the reason.

    On a checkpoint without --model, the report its recipe recorded (no code runs)."""
    from .workflows import inspect_file

    report = inspect_file(model, config=_config(DEFAULT_SURROGATE, None, False, include, exclude, DEFAULT_SAVE, relufy),
                          model_file=model_file, trust_recipe=trust_recipe)
    if as_json:
        return _emit_json(report.to_dict())
    out.print(_sites_table(report))
    out.print(report.summary())


@app.command("convert")
@command
def convert_cmd(
    model: str = typer.Argument(..., help="MODEL: model.py or model.py:NAME."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint to write (.safetensors)."),
    surrogate: str = COMMON_SURROGATE,
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="Surrogate parameter NAME=VALUE (repeatable)."),
    negative_only: bool = typer.Option(False, "--negative-only", help="Keep gradient 1 for x > 0; s' only for x <= 0."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Module-path glob to convert (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Module-path glob to leave alone (repeatable)."),
    save: str = typer.Option(DEFAULT_SAVE, "--save-precision",
                             help="What the backward keeps: full (exact, default); bfloat16 or uint8 "
                                  "(opt-in, smaller, error stated by `sugarize surrogates`)."),
    relufy: Optional[str] = typer.Option(None, "--relufy", help="Also turn these into ReLU + SUGAR: gelu,silu."),
    relufy_surrogate: Optional[str] = typer.Option(
        None, "--relufy-surrogate", help="Surrogate for relufied sites (default: the replaced activation's own)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A conversion config (JSON) such as `sugarize "
                                                                 "sweep` writes, instead of the options above."),
    input_shape: Optional[List[str]] = INPUT_SHAPE,
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Convert every ReLU of MODEL to SUGAR and write a checkpoint (weights + JSON recipe)."""
    from .workflows import convert_file, read_config_file

    from ..passes.config import resolve_options

    # the library's one rule (sugarize(..., config=)): a flag equal to the file's value is fine
    cfg = resolve_options(read_config_file(str(config)) if config is not None else None, keywords_are="flags",
                          config_is=f"--config {config.name}" if config is not None else "", spelled=FLAG_OF,
                          **_flags(surrogate, param, negative_only, include, exclude, save, relufy, relufy_surrogate))
    res = convert_file(model, str(output), config=cfg, input_shapes=input_shape, force=force,
                       config_file=str(config) if config is not None else None)
    if as_json:
        return _emit_json({"checkpoint": str(res.path), "config": cfg.to_dict(), "report": res.report.to_dict()})
    out.print(_sites_table(res.report))
    out.print(res.report.summary())
    if any(s.forward_changed for s in res.report.converted):
        out.print("[yellow]note:[/] relufied sites compute ReLU instead of their activation: fine-tune before use")
    out.print(escape(f"wrote {res.path} (surrogate {cfg.surrogate} {dict(cfg.params)})"))


def _export(
    source: str = typer.Argument(..., help="MODEL (model.py[:NAME]) or a SUGAR checkpoint (.safetensors)."),
    output: Path = typer.Option(..., "--output", "-o", help="The artifact to write (its suffix names the format "
                                "unless --format does)."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="The deploy target (see `sugarize targets`); "
                                         "default: from OUTPUT's suffix, else onnx."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="Fine-tuned state dict (safetensors or torch)."),
    model: Optional[str] = MODEL_FILE,
    trust_recipe: bool = TRUST_RECIPE,
    input_shape: Optional[List[str]] = INPUT_SHAPE,
    atol: float = _tol_option("--atol"),
    rtol: float = _tol_option("--rtol"),
    batches: int = typer.Option(3, "--batches", min=1, max=MAX_BATCHES, help=f"Seeded parity batches, 1 to {MAX_BATCHES}."),
    seed: int = _seed_option(),
    allow_nonfinite: bool = ALLOW_NONFINITE,
    int8: bool = typer.Option(False, "--int8", help="Also write an int8 artifact beside OUTPUT (targets with an int8 "
                              "path: see `sugarize targets`), checked against the quantised original."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data file for --int8 calibration and accuracy."),
    calibration_batches: int = typer.Option(32, "--calibration-batches", min=1, max=MAX_BATCHES),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    **target_options,
):
    """Strip SUGAR, export to a deploy target, then check parity and structure against the original."""
    from ..deploy.targets import get_target
    from .workflows import export_file, format_of_output

    fmt = format_of_output(output, format)
    with err.status("exporting and checking parity..."):
        res = export_file(source, str(output), format=fmt, weights=str(weights) if weights else None, model=model,
                          input_shapes=input_shape, force=force, atol=atol, rtol=rtol, batches=batches, seed=seed,
                          int8=int8, data=str(data) if data else None, calibration_batches=calibration_batches,
                          allow_nonfinite=allow_nonfinite, trust_recipe=trust_recipe, **target_options)
    e = res.export
    target = get_target(fmt)
    if as_json:
        _emit_json({"format": e.format, "path": str(e.path), "companions": [str(c) for c in e.companions],
                    "backend": e.backend, "written": res.written, "opset": e.opset, "op_types": e.op_types,
                    "external_data": str(e.external_data) if e.external_data else None,
                    "stripped_sites": e.stripped_sites, "notes": res.notes + e.notes, "parity": res.parity.to_dict(),
                    "int8": res.int8.to_dict() if res.int8 else None})
    else:
        for note in res.notes + e.notes:
            out.print(f"[yellow]note:[/] {escape(note)}")
        did = "wrote" if res.written else "checked, NOT written (a check failed; any previous file is untouched):"
        also = f" and {', '.join(c.name for c in e.companions)}" if e.companions and res.written else ""
        out.print(escape(f"{did} {e.path}{also} ({target.summary(e)}, {e.stripped_sites} SUGAR sites stripped)"))
        out.print(_parity_table(res.parity))
        out.print(escape(res.parity.summary()))
        if res.int8:
            out.print(escape(res.int8.summary()))
    if not res.parity.passed:
        raise ParityError(f"parity or structure check failed: {res.export.path} was not written "
                          "(any previous file is untouched)")
    if res.int8 and not res.int8.passed:
        raise ParityError(f"the int8 check failed: {res.int8.path} differs from the quantised original")


class _ExportCommand:
    """``sugarize export``: ``_export``'s parameters, then one flag per option a registered
    target declares (``Target.options``), read from the table each time the CLI is built, so a
    target registered from outside (``register_target``, the ``sugarize.targets`` entry points)
    has its flags on the stock command."""

    __name__ = __qualname__ = "export"
    __doc__ = _export.__doc__
    __module__ = __name__

    run = staticmethod(command(_export))

    def __call__(self, **kwargs):
        return self.run(**kwargs)

    def _options(self):
        import inspect

        from ..deploy.targets import TARGETS
        from ..deploy.target import DECLARED

        base = inspect.signature(_export)
        taken = set(base.parameters)
        params, hints = [], {}
        for o in DECLARED.values():
            if o.name in taken:  # pragma: no cover - register_target refuses these names
                continue
            users = ", ".join(t.name for t in TARGETS.values() if o in t.options)
            kind = o.type if not (o.type is bool and o.default is False) else bool
            annotation = Optional[kind] if o.default is None else kind
            params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=typer.Option(o.default, *o.flag.split(" "),
                                                                 help=f"{o.help} (--format {users})")))
            hints[o.name] = annotation
        return base, params, hints

    @property
    def __signature__(self):
        import inspect

        base, params, _ = self._options()
        fixed = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fixed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed]
        return base.replace(parameters=fixed + params)

    @property
    def __annotations__(self):
        import typing

        hints = typing.get_type_hints(_export)
        hints.pop("target_options", None)
        return {**hints, **self._options()[2]}


app.command("export")(_ExportCommand())


@app.command("verify")
@command
def verify_cmd(
    onnx_file: Path = typer.Argument(..., help="The artifact to check, of any registered target (`sugarize targets`): "
                                     "told by its bytes, whatever its name."),
    against: str = typer.Option(..., "--against", help="MODEL (model.py[:NAME]) or a SUGAR checkpoint."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="Fine-tuned state dict (safetensors or torch)."),
    model: Optional[str] = MODEL_FILE,
    trust_recipe: bool = TRUST_RECIPE,
    input_shape: Optional[List[str]] = INPUT_SHAPE,
    atol: float = _tol_option("--atol"),
    rtol: float = _tol_option("--rtol"),
    batches: int = typer.Option(3, "--batches", min=1, max=MAX_BATCHES, help=f"Seeded parity batches, 1 to {MAX_BATCHES}."),
    seed: int = _seed_option(),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="ONNX files: onnxruntime (default) or openvino "
                                          "(the openvino extra); .ort: onnxruntime; .pte: executorch; OpenVINO IR: "
                                          "openvino (`sugarize targets` lists each target's)."),
    allow_nonfinite: bool = ALLOW_NONFINITE,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Parity and structural identity: an artifact (ONNX, ORT, ExecuTorch, OpenVINO IR, ...) vs the model in PyTorch and the original's."""
    from .workflows import verify_file

    report = verify_file(str(onnx_file), against, weights=str(weights) if weights else None, model=model,
                         input_shapes=input_shape, atol=atol, rtol=rtol, batches=batches, seed=seed,
                         runtime=runtime, allow_nonfinite=allow_nonfinite, trust_recipe=trust_recipe)
    if as_json:
        _emit_json(report.to_dict())
    else:
        out.print(_parity_table(report))
        if report.graph is not None and not report.graph.standard_domain_only:
            out.print(f"[red]non-standard ops:[/] {', '.join(report.graph.nonstandard)}")
        for note in report.notes:
            out.print(escape(f"note: {note}"))
        out.print(escape(report.summary()))
    if not report.passed:
        raise ParityError(f"{onnx_file.name} failed the parity or structure check (table above)")


@app.command("targets")
@command
def targets_cmd(as_json: bool = typer.Option(False, "--json", help="Print the table as JSON.")):
    """The deploy targets (built in, registered, or installed as plug-ins): --format, suffix, options, runtimes."""
    from ..deploy.targets import TARGETS
    from ..errors import InputError

    rows = []
    for t in TARGETS.values():
        try:
            t.check_available()
            ready = "yes"
        except InputError:
            ready = f"no: pip install 'sugarize[{t.extra}]'" if t.extra else "no"
        rows.append({"format": t.name, "title": t.title, "suffix": t.suffix + ("/" if t.folder else ""),
                     "options": [o.flag for o in t.options], "int8": t.int8, "runtimes": list(t.runtimes),
                     "installed": ready, "module": type(t).__module__})
    if as_json:
        return _emit_json(rows)
    table = Table("format", "artifact", "options", "--int8", "runtimes", "installed")
    for r in rows:
        table.add_row(r["format"], f"{r['title']} ({r['suffix']})", " ".join(r["options"]) or "-",
                      r["int8"] or "-", ", ".join(r["runtimes"]), r["installed"])
    out.print(table)


@app.command("surrogates")
@command
def surrogates_cmd(
    plot: Optional[Path] = typer.Option(None, "--plot", callback=_plot_path,
                                        help="Write a PNG of each s(x) and s'(x) next to ReLU's."),
    force: bool = typer.Option(False, "--force", help="Replace an existing plot."),
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON."),
):
    """The surrogate registry: formulas, defaults, sources, and the opt-in compressed modes' error."""
    from ..method.saved import save_error
    from ..method.surrogates import get_surrogate, list_surrogates

    rows = [get_surrogate(n) for n in list_surrogates()]

    def error(name: str, save: str) -> dict | None:
        try:
            return save_error(name, save)
        except SugarizeError:
            return None  # the mode cannot carry this surrogate: refused

    errors = {e.name: {s: error(e.name, s) for s in ("bfloat16", "uint8")} for e in rows}
    if plot is not None:
        from .plots import plot_surrogates

        plot_surrogates(plot, force=force)
    if as_json:
        return _emit_json([{"name": e.name, "params": e.defaults(), "formula": e.summary(), "source": e.source,
                            "save_error": errors[e.name]} for e in rows])
    table = _table(f"surrogates (default: {DEFAULT_SURROGATE})", "name", "defaults", "formula", "source",
                   "bfloat16 error", "uint8 error")

    def cell(err: dict | None) -> str:
        return "refused" if err is None else f"{err['abs']:.2g} ({err['rel_negative']:.1%})"

    for e in rows:
        table.add_row(e.name, ", ".join(f"{k}={v:g}" for k, v in e.defaults().items()) or "-", e.summary(), e.source,
                      cell(errors[e.name]["bfloat16"]), cell(errors[e.name]["uint8"]))
    out.print(table)
    out.print("The default (--save-precision full) is exact. Compressed modes: worst absolute gradient error per "
              "unit upstream gradient, and (in brackets) on x <= 0 as a share of the largest |s'(x)| there.")
    if plot is not None:
        out.print(escape(f"wrote {plot}"))


@app.command("audit")
@command
def audit_cmd(
    model: str = typer.Argument(..., help="MODEL (model.py[:NAME]) or a SUGAR checkpoint."),
    data: Path = typer.Option(..., "--data", help="Data file with train_loader() (and val_loader())."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="State dict to load first."),
    split: str = typer.Option("train", "--split", callback=lambda v: _choice(v, "--split", ("train", "val")),
                              help="Which loader to audit: train or val."),
    plot: Optional[Path] = typer.Option(None, "--plot", callback=_plot_path,
                                        help="Write per-site bars and a firing histogram (PNG)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing plot."),
    model_file: Optional[str] = MODEL_FILE,
    trust_recipe: bool = TRUST_RECIPE,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Dead units and activation sparsity per ReLU/SUGAR site, with totals."""
    from .workflows import audit_file

    report = audit_file(model, str(data), weights=str(weights) if weights else None, split=split,
                        plot=str(plot) if plot else None, model_file=model_file, trust_recipe=trust_recipe,
                        force=force)
    if as_json:
        return _emit_json(report.to_dict())
    table = _table(f"audit over {report.samples} inputs",
                   "module path", "spelling", "units", "dead", "dead %", "zeros %")
    for s in report.sites:
        table.add_row(s.path or "<model>", s.spelling, str(s.units), str(s.dead), f"{100 * s.dead_fraction:.1f}",
                      f"{100 * s.sparsity:.1f}")
    table.add_row("[bold]total[/]", "", str(report.units), str(report.dead), f"{100 * report.dead_fraction:.1f}",
                  f"{100 * report.sparsity:.1f}")
    out.print(table)
    if plot:
        out.print(escape(f"wrote {plot}"))


@app.command("finetune")
@command
def finetune_cmd(
    checkpoint: Path = typer.Argument(..., help="A SUGAR checkpoint from `sugarize convert`."),
    data: Path = DATA_FILE,
    output: Path = typer.Option(..., "--output", "-o", help="Weights to write (.safetensors)."),
    epochs: int = typer.Option(1, "--epochs", min=1, max=MAX_EPOCHS),
    lr: float = typer.Option(1e-3, "--lr"),
    optimizer: str = OPTIMIZER,
    seed: int = _seed_option(),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from weights written by finetune."),
    model: Optional[str] = MODEL_FILE,
    trust_recipe: bool = TRUST_RECIPE,
    plot: Optional[Path] = typer.Option(None, "--plot", callback=_plot_path,
                                        help="Draw loss, validation accuracy and dead units per epoch (PNG)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the history as JSON."),
):
    """Fine-tune a SUGAR checkpoint with a plain, seeded training loop (the data order and
    initial state are seeded; float32 results on a CPU still vary slightly between processes)."""
    from dataclasses import asdict

    from rich.progress import Progress

    from .workflows import finetune_file

    def line(r):
        if as_json:
            return
        parts = [f"epoch {r.epoch}", f"loss {r.loss:.4f}"]
        if r.val_accuracy is not None:
            parts.append(f"val acc {100 * r.val_accuracy:.2f}%")
        if r.dead_fraction is not None:
            parts.append(f"dead {100 * r.dead_fraction:.1f}%")
        out.print("  ".join(parts))

    with Progress(console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("fine-tuning", total=None)
        history = finetune_file(str(checkpoint), str(data), str(output), epochs=epochs, lr=lr, optimizer=optimizer,
                                seed=seed, resume=str(resume) if resume else None, model=model, force=force,
                                on_step=lambda e, s: bar.advance(task), on_epoch=line, trust_recipe=trust_recipe,
                                plot=str(plot) if plot else None)
    if as_json:
        return _emit_json({"weights": str(output), "history": [asdict(h) for h in history],
                           "plot": str(plot) if plot else None})
    out.print(escape(f"wrote {output}"))
    if plot:
        out.print(escape(f"wrote {plot}"))


@app.command("sweep")
@command
def sweep_cmd(
    model: str = typer.Argument(..., help="MODEL (model.py[:NAME]) or a SUGAR checkpoint: its weights are the start."),
    data: Path = DATA_FILE,
    candidates: Optional[str] = typer.Option(
        None, "--candidates", "-c",
        help="Comma-separated: surrogate names with :NAME=VALUE and :neg (bsilu,nelu:alpha=0.1,bsilu:neg), or "
             "all, registry, grid, negative. Default: all (the registry, B-SiLU and NeLU alpha grids, "
             "negative-only). ReLU, the baseline, always runs."),
    seeds: int = typer.Option(3, "--seeds", min=1, max=100, help="Fine-tunes per candidate (3 or more for a verdict)."),
    epochs: int = typer.Option(1, "--epochs", min=1, max=MAX_EPOCHS, help="Epochs per fine-tune."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=MAX_STEPS,
                                        help="Optimizer steps per fine-tune (instead of --epochs)."),
    lr: float = typer.Option(1e-3, "--lr"),
    optimizer: str = OPTIMIZER,
    relufy: Optional[str] = typer.Option(None, "--relufy", help="Also sweep these as ReLU + SUGAR: gelu,silu "
                                                                "(the baseline: them as plain ReLU)."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Module-path glob to convert (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Module-path glob to leave alone (repeatable)."),
    output: Path = typer.Option(Path("sugarize-sweep.json"), "--output", "-o",
                                help="Where the winner's config goes (for `sugarize convert --config`)."),
    plot: Optional[Path] = typer.Option(None, "--plot", callback=_plot_path, help="Draw the comparison (PNG)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output or plot."),
    model_file: Optional[str] = MODEL_FILE,
    trust_recipe: bool = TRUST_RECIPE,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Which surrogate for this model? Short fine-tunes of ReLU and each candidate from the same weights."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .workflows import sweep_file

    config = None
    if relufy or include or exclude:
        config = _config(DEFAULT_SURROGATE, None, False, include, exclude, DEFAULT_SAVE, relufy)
    started = time.perf_counter()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("sweeping (steps)", total=None)

        def on_step(done, total):
            bar.update(task, completed=done, total=total)

        def on_run(run):
            state = "diverged" if run.diverged else f"{run.metric:.4f}"
            bar.console.print(f"  {run.candidate} seed {run.seed}: {state} ({run.seconds:.1f} s)",
                              highlight=False) if not as_json else None

        result = sweep_file(model, str(data), candidates=candidates, seeds=seeds, epochs=epochs, steps=steps,
                            lr=lr, optimizer=optimizer, config=config, output=str(output),
                            plot=str(plot) if plot else None, force=force, model_file=model_file,
                            trust_recipe=trust_recipe, on_step=on_step, on_run=on_run)
    wrote = result.winner is not None
    if as_json:
        return _emit_json({**result.to_dict(), "config_file": str(output) if wrote else None,
                           "plot": str(plot) if plot else None})
    pct = result.higher_is_better
    fmt = (lambda v: f"{100 * v:.2f}") if pct else (lambda v: f"{v:.4f}")
    table = _narrow_table(f"{result.metric} after the fine-tune, mean±std over {seeds} seed(s); paired with "
                          "ReLU per seed", "candidate", result.metric.replace(" ", "\n") + (" %" if pct else ""),
                          "vs ReLU\nper seed", "better\nseeds", "dead at\nend %", "revived\nunits", "verdict")
    for s in result.summaries:
        if s.verdict == "diverged":
            table.add_row(s.name, "diverged", "-", "-", "-", "-", "diverged")
            continue
        diff = "" if s.verdict == "baseline" else (
            f"{100 * s.diff_mean:+.2f}±{100 * s.diff_std:.2f}" if pct else f"{-s.diff_mean:+.4f}±{s.diff_std:.4f}")
        table.add_row(s.name, f"{fmt(s.metric_mean)}±{fmt(s.metric_std)}", diff,
                      "" if s.verdict == "baseline" else f"{s.better_seeds}/{s.seeds}",
                      f"{100 * s.dead_end_mean:.1f}", f"{s.revived_mean:.1f}" if s.revived_mean is not None else "n/a", s.verdict)
    out.print(f"start: {result.metric} {fmt(result.start_metric)}, dead units {100 * result.dead_start:.1f}% "
              f"({result.dead_units_start} of {result.units})")
    out.print(table)
    for note in result.notes:
        out.print(escape(f"note: {note}"))
    out.print(result.advice)
    if wrote:
        out.print(escape(f"wrote {output}: convert with\n  sugarize convert {model} --config {output} -o model.sugar.safetensors"))
    else:
        out.print("no config written")
    if plot:
        out.print(escape(f"wrote {plot}"))
    out.print(f"done in {time.perf_counter() - started:.0f} s")


@app.command("demo")
@command
def demo_cmd(
    out_dir: Path = typer.Option(Path("sugarize-demo"), "--out", help="Folder for the plot and ONNX files."),
    seeds: int = typer.Option(5, "--seeds", min=1, max=100, help="Seeds per variant."),
    epochs: int = typer.Option(15, "--epochs", min=1, max=MAX_EPOCHS, help="Fine-tuning epochs per variant (case 1)."),
    dead_case: bool = typer.Option(True, "--dead-case/--no-dead-case", help="Also run case 2, a mostly dead model."),
    quick: bool = typer.Option(False, "--quick", help="One seed, a few epochs: the whole pipeline in seconds "
                                                      "(its figures are not the demo's)."),
    force: bool = typer.Option(False, "--force", help="Replace the files of an earlier demo in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """ReLU vs SUGAR (B-SiLU, NeLU) vs LeakyReLU and GELU on the bundled digits, then the export proof."""
    import dataclasses

    from .demo import DemoConfig, run_demo

    cfg = dataclasses.replace(DemoConfig(), seeds=tuple(range(seeds)), epochs=epochs, dead_case=dead_case)
    if quick:
        cfg = dataclasses.replace(cfg, seeds=(0,), pretrain_epochs=2, epochs=2, dead_epochs=2)
    _demo_folder(out_dir, force=force)
    with err.status("training...") as status:
        result = run_demo(cfg, out_dir=out_dir, progress=lambda s: status.update(s))
    plot = None
    try:
        from .plots import plot_demo

        plot = plot_demo(result, out_dir / "demo.png")
    except SugarizeError:
        pass
    rows = result.rows()
    ex = result.export
    if as_json:
        return _emit_json({"config": dataclasses.asdict(cfg), "rows": rows, "pretrained": result.pretrained,
                           "paired": result.paired(), "paired_paper": result.paired("SUGAR B-SiLU"), "dead_case": {
                               "start": result.dead_start, "rows": result.rows(dead_case=True),
                               "paired": result.paired(dead_case=True),
                               "paired_paper": result.paired("SUGAR B-SiLU", dead_case=True)}
                           if result.dead_runs else None,
                           "export": {k: (v.to_dict() if k == "parity" else v) for k, v in (ex or {}).items()},
                           "seconds": result.seconds})
    acc0, dead0 = result.start()
    out.print(f"[bold]case 1, a trained model[/] (realistic): a ReLU MLP ({cfg.depth}x{cfg.width}) pretrained with "
              f"{cfg.pretrain_optimizer} at lr {cfg.pretrain_lr}: val acc {100 * acc0:.1f}%, dead units {100 * dead0:.1f}%; "
              f"each variant fine-tuned {cfg.epochs} epochs at lr {cfg.lr} from those weights, {len(cfg.seeds)} seeds")
    out.print(_demo_table(rows, len(cfg.seeds)))
    _print_paired(result.paired())
    _print_paired(result.paired("SUGAR B-SiLU"))
    if result.dead_runs:
        acc1, dead1 = result.start(dead_case=True)
        out.print(f"[bold]case 2, a mostly dead model[/] (what SUGAR is for): the same MLP initialised with every "
                  f"hidden bias at {cfg.dead_bias:g}: val acc {100 * acc1:.1f}% (one class), dead units "
                  f"{100 * dead1:.1f}%; each variant fine-tuned {cfg.dead_epochs} epochs at lr {cfg.dead_lr}, "
                  f"{len(cfg.seeds)} seeds")
        out.print(_demo_table(result.rows(dead_case=True), len(cfg.seeds)))
        _print_paired(result.paired(dead_case=True))
        _print_paired(result.paired("SUGAR B-SiLU", dead_case=True))
        out.print("what it shows: a dead unit gets no gradient from ReLU, so a model that is mostly dead stays "
                  "dead under ReLU; SUGAR's surrogate derivative reaches below zero and can bring it back. The "
                  "default gives B-SiLU's gradient only to units dead over the batch, so a model that trained "
                  "normally fine-tunes as with ReLU; the paper's B-SiLU everywhere revives faster and can harm it.")
    if ex:
        out.print(escape(f"best SUGAR model: {ex['variant']} (seed {ex['seed']}) -> strip -> {ex['path']}"))
        out.print(f"ONNX op types: {' '.join(ex['op_types'])}")
        same = "identical to" if ex["op_types"] == ex["relu_op_types"] else "DIFFERENT from"
        out.print(f"  {same} the ReLU model's export")
        out.print(ex["parity"].summary())
        out.print(f"onnxruntime latency (batch 32, 1 thread, median): stripped SUGAR {ex['latency_stripped_ms']:.3f} ms, "
                  f"ReLU model {ex['latency_relu_ms']:.3f} ms")
    if plot:
        out.print(escape(f"wrote {plot}"))
    out.print(f"done in {result.seconds:.0f} s")


def _demo_folder(out_dir: Path, *, force: bool) -> None:
    """The demo's --out folder, made if needed, checked writable before any training; files of an
    earlier demo there are replaced only with --force."""
    import os

    from ..errors import OutputPathError
    from ..files.fsutil import check_outputs
    from .demo import DEMO_FILES

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"--out {out_dir} is a file; the demo writes a folder of files: give a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot make the folder {out_dir} ({exc.strerror or type(exc).__name__}); "
                              "give --out a folder you can write") from None
    if not os.access(out_dir, os.W_OK):
        raise OutputPathError(f"folder {out_dir} is not writable; give --out a folder you can write")
    check_outputs([out_dir / name for name in DEMO_FILES], force=force)


def _demo_table(rows, seeds: int) -> Table:
    table = _table("digits validation (mean ± std over seeds)", "variant", "val accuracy %", "dead units %", "note")
    for r in rows:
        if r["seeds"] == 0:
            table.add_row(r["variant"], "diverged", "-", f"{r['diverged']} of {seeds} seeds diverged")
            continue
        note = f"{r['diverged']} seed(s) diverged" if r["diverged"] else ""
        table.add_row(r["variant"], f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}",
                      f"{100 * r['dead_mean']:.1f} ± {100 * r['dead_std']:.1f}", note)
    return table


def _print_paired(p: dict) -> None:
    if p["seeds"]:
        out.print(f"seed by seed, {p['variant']} vs ReLU: accuracy {100 * p['accuracy']:+.1f} points "
                  f"(not worse in {p['accuracy_not_worse']}/{p['seeds']} seeds), dead units {100 * p['dead']:+.1f} "
                  f"points (fewer in {p['fewer_dead']}/{p['seeds']} seeds)")


def main() -> None:  # console-script entry point
    """The ``sugarize`` command: the deploy targets installed distributions declare (entry-point
    group ``sugarize.targets``) are registered first, so their ``--format`` and flags are there."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from ..deploy.targets import load_entry_points

        load_entry_points()
    for w in caught:  # a broken plug-in: one warning line, and the command goes on
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exits with ``code`` when the command is done: a thread the user's code started and left
    running (not a daemon) would otherwise keep the process alive after its work ended, and
    Python waits for such threads at exit. They are named on stderr and not waited for."""
    import os
    import threading

    # an idle ThreadPoolExecutor's workers (a library's) end at exit on their own: not waited on here
    left = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
            and t.is_alive() and not t.name.startswith("ThreadPoolExecutor-")]
    if not left:
        sys.exit(code)
    names = ", ".join(t.name for t in left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
    err.print(f"[yellow]note:[/] {len(left)} thread(s) were still running when the command ended ({escape(names)}: "
              "the model's code, or a library it called, started them); sugarize exits without waiting for them",
              highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # python -m sugarize.app.cli
    main()

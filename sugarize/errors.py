"""One small exception family. The library raises these; the CLI maps them to one line."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 2000) -> str:
    """The first line of an exception's message (its type's name if it has none), whole: cut only
    past ``limit`` characters (a tensor printed into a message), never mid-sentence otherwise."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class SugarizeError(Exception):
    """Base class of every error sugarize raises. The CLI prints one line and exits with
    ``exit_code``: 2 for a problem with the input (the default), 1 for a failed check, 3 for
    a bug of ours.

    The family, by whom it is for:

    - ``InputError``: the user's input (files, options, inputs, data): fix the input.
      ``ModelFileError``, ``CheckpointError``, ``DataFileError``, ``ParameterError``
      (``UnknownSurrogateError``), ``OutputPathError`` and ``StripRefusedError`` are kinds of it.
    - ``CaptureError``: the model cannot be captured as asked (a graph is needed).
    - ``ExportError``: the exporter or a runtime cannot do it (an op, a dtype, an opset).
    - ``ParityError`` (exit 1): a check ran and failed (parity, structure).
    - ``DivergenceError`` (exit 1): training ran and the loss stopped being finite;
      ``CollapseError``: it collapsed against its start (the best weights are kept).
    - ``InternalError`` (exit 3): a bug of sugarize; please report it.
    """

    exit_code = 2


class SugarizeWarning(UserWarning):
    """What a user must know that is not an error: a result that needs an action of theirs."""


class SugarizeNote(SugarizeWarning):
    """What was decided on the user's behalf and must be said (which function of a model file
    ran): needs no action. The CLI prints it as a note; filter it like any warning."""


class InputError(SugarizeError):
    """Input that is missing, malformed, or rejected by the model: example inputs, files, options."""


class ParameterError(InputError, ValueError):
    """A surrogate parameter or an option with a bad value."""


class UnknownSurrogateError(ParameterError, KeyError):
    """A surrogate name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelFileError(InputError):
    """A model file could not be loaded, or holds no usable model."""


class CheckpointError(InputError):
    """A checkpoint or weights file is missing, corrupt, untrusted, or for another model."""


class DataFileError(InputError):
    """A data file could not be loaded or does not provide what is needed."""


class OutputPathError(InputError):
    """An output path that exists (without --force) or cannot be written."""


class StripRefusedError(InputError):
    """Strip cannot give back the ReLU model without dropping something the model holds (a
    tensor added to a fused graph after conversion): nothing was changed; the message names it."""


class CaptureError(SugarizeError):
    """The model's graph could not be captured (or a capture path does not apply to it).

    ``reason`` says why in a few words, as data: the dispatcher that tries the next capture path
    and the notes it writes read this field, never the message text."""

    def __init__(self, message: str = "", *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


class ExportError(SugarizeError):
    """ONNX export or a runtime failed on the model (an unsupported op, dtype or opset)."""


class ParityError(SugarizeError):
    """A check ran and failed: ONNX and PyTorch outputs disagree, or the graphs differ."""

    exit_code = 1


class DivergenceError(SugarizeError):
    """The training loss stopped being finite."""

    exit_code = 1


class CollapseError(DivergenceError):
    """Fine-tuning fell off a cliff against its start (validation accuracy or loss): it stopped, and the
    model holds the best weights seen (``best_epoch``, 0 = the start). ``history`` is what ran."""

    def __init__(self, message: str = "", *, history=None, best_epoch: int = 0):
        super().__init__(message)
        self.history = list(history or [])
        self.best_epoch = best_epoch


class InternalError(SugarizeError):
    """A postcondition of ours does not hold: a bug of sugarize (please report it)."""

    exit_code = 3


class StripError(InternalError):
    """The strip postcondition failed: a SUGAR node is left."""

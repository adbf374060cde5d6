"""One small exception family. The library raises these; the CLI maps them to one line."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name if it has none), cut at ``limit``."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class SugarizeError(Exception):
    """Base class: every error sugarize raises on bad input or a failed check."""

    exit_code = 2


class UnknownSurrogateError(SugarizeError, KeyError):
    """A surrogate name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ParameterError(SugarizeError, ValueError):
    """A surrogate parameter or option with a bad value."""


class CaptureError(SugarizeError):
    """The model's graph could not be captured."""


class ModelFileError(SugarizeError):
    """A model file could not be loaded, or holds no usable model."""


class CheckpointError(SugarizeError):
    """A checkpoint or weights file is missing, corrupt, or for another model."""


class InputError(SugarizeError):
    """Example inputs that are missing, malformed, or rejected by the model."""


class DataFileError(SugarizeError):
    """A data file could not be loaded or does not provide what is needed."""


class ExportError(SugarizeError):
    """ONNX export failed or its precondition does not hold."""


class StripError(SugarizeError):
    """The strip postcondition failed: a SUGAR node is left."""


class OutputPathError(SugarizeError):
    """An output path that exists (without --force) or cannot be written."""


class ParityError(SugarizeError):
    """ONNX and PyTorch outputs disagree beyond the tolerances."""

    exit_code = 1

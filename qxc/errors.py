"""Errors qxc raises on purpose, each mapped to a documented CLI exit code.

Every message is one line that names the file, pass, option, node or tensor at fault and says what to do.
"""

from __future__ import annotations


class QxcError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(QxcError):
    """Bad command line, unknown pass or option, unusable pipeline text or recipe, output exists."""

    exit_code = 2


class ModelError(QxcError):
    """The input model cannot be read or is not a valid ONNX model."""

    exit_code = 3


class PassError(QxcError):
    """A pass failed, or the model it produced failed verification."""

    exit_code = 4


class DataError(QxcError):
    """Calibration/evaluation data does not fit the model (names, shapes, dtypes, rows)."""

    exit_code = 5


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with --debug output)",
    2: "usage error: bad arguments, unknown pass/option, bad pipeline or recipe, output exists",
    3: "invalid input model",
    4: "a pass failed or its result failed verification",
    5: "bad data file",
    6: "fidelity below the threshold given with --fail-below (qxc compare)",
    130: "interrupted (SIGINT); no output written",
    141: "the output pipe closed early (e.g. piped into head)",
}

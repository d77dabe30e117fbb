"""The one exception family statelens raises.

The library never prints or exits. It raises a subclass of :class:`StatelensError`; the CLI catches it
at the edge and turns it into a one-line message and an exit code (2 for bad input, 1 otherwise).
"""


class StatelensError(Exception):
    """Base of every error statelens raises on purpose."""

    exit_code = 1


class BadInput(StatelensError):
    """The user's input (a path, a file's content, an option) is wrong. Exit code 2.

    The message names the file or option and says what is wrong, in one line.
    """

    exit_code = 2


class CheckpointError(BadInput):
    """A checkpoint directory, its config or its weights cannot be used."""


class DataError(BadInput):
    """A data file or directory cannot be read as tokens."""


class ParameterError(BadInput, ValueError):
    """A parameter a library caller gave that an analysis cannot use (out of range, or it leaves nothing
    to compare); ``parameter`` names it, so a command can name the option that set it. Also a
    ValueError, as library callers catch it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter

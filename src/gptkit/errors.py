"""The one base class of gptkit's user-facing errors: the CLI prints these (and file errors) in one line; anything
else is a bug and shows its traceback."""


class GptkitError(ValueError):
    """Bad input, a file that is not what it should be, a setting that cannot be honoured: the user can act on it."""

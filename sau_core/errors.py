"""The engine's error types. Every expected failure (bad file, bad trigger, unsupported model) is a
SauError; the CLI turns it into one line `error: ...` and a non-zero exit, never a traceback."""


class SauError(Exception):
    """An expected, user-facing failure. The message is shown as is."""

    exit_code = 2


class UnsafeFileError(SauError):
    """A file failed structural validation, or is a pickle that we refuse to load."""


class UnsupportedModelError(SauError):
    """The model's architecture or format is not one SAU understands."""

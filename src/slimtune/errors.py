"""User-facing errors: one clear line naming the file, the place and the fix.

The CLI turns a `SlimtuneError` into that line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""


class SlimtuneError(Exception):
    """Bad input from the user (a file, a config, an argument). Its message is the whole story, on one line."""


class CheckpointError(SlimtuneError):
    """A checkpoint folder or file is missing, truncated or of an unsupported architecture."""


class PrecisionError(SlimtuneError):
    """A cast into a narrower format would overflow to inf or flush a whole tensor to zero."""


class ConfigError(SlimtuneError):
    """An unknown key, a wrong type or an out-of-range value in a config."""


class DataError(SlimtuneError):
    """A malformed data file or record."""

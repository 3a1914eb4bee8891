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


class StorageError(SlimtuneError):
    """The operating system refused a read or a write (disk full, permission denied, read-only file system)."""

    @classmethod
    def from_os(cls, e: OSError, path: object = None) -> "StorageError":
        """One line naming the path (the error's own file name, else `path`), the system's reason and the fix."""
        import errno

        fixes = {errno.ENOSPC: "free disk space or write to another disk",
                 errno.EDQUOT: "free space within your quota or write to another disk",
                 errno.EFBIG: "the file is larger than this file system or process allows; write to another disk",
                 errno.EACCES: "choose a folder you may write to, or change its permissions",
                 errno.EPERM: "choose a folder you may write to, or change its permissions",
                 errno.EROFS: "the file system is read-only; write to another folder"}
        where = e.filename if e.filename is not None else path
        reason = e.strerror or str(e) or type(e).__name__
        fix = fixes.get(e.errno, "check the path and the disk")
        return cls(f"{where}: {reason} (errno {e.errno}); fix: {fix}" if where is not None else
                   f"{reason} (errno {e.errno}); fix: {fix}")

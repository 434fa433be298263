"""The failures a build reports: what went wrong, where, and the exit code the command line uses.

Example:
    >>> BuildError("the spec names no findings", 2).exit_code
    2
"""

from __future__ import annotations

import errno
from pathlib import Path

class BuildError(RuntimeError):
    """An expected failure of a build, with the exit code the CLI should use (1 failure, 2 usage)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class BuildArgumentError(BuildError, ValueError):
    """An argument of :func:`generate` has a value it cannot take (exit code 2 on the command line)."""

    def __init__(self, message: str):
        super().__init__(message, 2)


class WriteFailed(Exception):
    def __init__(self, rel: str, error: OSError):
        super().__init__(rel)
        self.rel, self.error = rel, error


def _remedy(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full", "free space and rerun with --resume to finish"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return err.strerror or "permission denied", "make the folder writable and rerun with --resume to finish"
    if err.errno in (errno.EISDIR, errno.ENOTDIR):  # a folder (or a file) of the user's stands in the way
        return err.strerror or str(err), ("a folder or file that is not synthmed's stands where it writes; move it "
                                          "away and rerun with --resume to finish")
    return err.strerror or str(err), "rerun with --resume to finish"


def write_failed_message(out: Path, e: "WriteFailed") -> str:
    reason, remedy = _remedy(e.error)
    return f"could not write {out / e.rel}: {reason}. No partial file was kept; {remedy}"


def os_error_message(out: Path, e: OSError) -> str:
    reason, remedy = _remedy(e)
    where = f"{e.filename}" if e.filename else str(out)
    return f"could not write {where}: {reason}. {remedy[0].upper()}{remedy[1:]}"

"""Write files so that a final name never holds a partial file.

Each file is written to a hidden temp name in the same folder (``.<name>.<pid>-<random>.tmp``, created new and never
through a link), flushed and fsynced, then
``os.replace``d onto its final name; on any error the temp file is removed.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write_bytes(p, b"hello")
    >>> p.read_bytes()
    b'hello'
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable


_TOKEN: str | None = None
TOKEN_PATTERN = r"([0-9]+)-[0-9a-f]{8}"  # writer_token(): the pid, then the random part


def writer_token() -> str:
    """This process's mark in its temp file names: its pid and a random part, recorded by the ledger before any
    write, so that a leftover is known as synthmed's by its exact name and a user's file never takes that name."""
    global _TOKEN
    if _TOKEN is None or not _TOKEN.startswith(f"{os.getpid()}-"):  # a forked child gets its own
        _TOKEN = f"{os.getpid()}-{os.urandom(4).hex()}"
    return _TOKEN


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{writer_token()}.tmp")


def leftover_temps(path: Path) -> list[Path]:
    """Temp files of ``path`` that a killed process left (its name's pattern, a pid no longer running). Where no
    ledger recorded them (``synthmed plan -o``), they are named to the user, never removed.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / ".cases.jsonl.999999999-0a1b2c3d.tmp").write_bytes(b"{")
        >>> [p.name for p in leftover_temps(folder / "cases.jsonl")]
        ['.cases.jsonl.999999999-0a1b2c3d.tmp']
    """
    import re

    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{TOKEN_PATTERN}\.tmp")
    found = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not _running(int(match.group(1))):
            found.append(Path(entry.path))
    return sorted(found)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def open_temp(path: Path, *, text: bool = False):
    """Create ``path``'s temp file, new and never through a link; returns (temp path, open file).

    A file (or link) already at the temp name is not synthmed's (its own leftovers are removed before a run, by
    the ledger): it is left alone and FileExistsError names it.
    """
    tmp = _temp_name(Path(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{tmp.name} is in the way of synthmed's temp file (synthmed did not "
                              "write it; move it away)", str(tmp)) from None
    fh = os.fdopen(fd, "w", encoding="utf-8", newline="\n") if text else os.fdopen(fd, "wb")
    return tmp, fh


def commit_temp(tmp: Path, path: Path, fh) -> None:
    """Flush, fsync and close ``fh`` (the temp file ``tmp`` from :func:`open_temp`), then rename it onto ``path``."""
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    tmp, fh = open_temp(path)
    try:
        with fh:
            fh.write(data)
            commit_temp(tmp, path, fh)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # ours: open_temp made it
        if isinstance(e, OSError) and e.filename is None:  # a full disk names the file it stopped, not nothing
            e.filename = str(path)
        raise


def atomic_write_text_lines(path: Path, lines: Iterable[str]) -> None:
    """Write UTF-8 lines (each gets a trailing newline) to ``path`` atomically, streaming."""
    path = Path(path)
    tmp, fh = open_temp(path, text=True)
    try:
        with fh:
            for line in lines:
                fh.write(line)
                fh.write("\n")
            commit_temp(tmp, path, fh)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # ours: open_temp made it
        if isinstance(e, OSError) and e.filename is None:  # a full disk names the file it stopped, not nothing
            e.filename = str(path)
        raise


"""Write files so that a final name never holds a partial file.

Each file is written to a hidden temp name in the same folder, flushed and fsynced, then
``os.replace``d onto its final name; on any error the temp file is removed.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write_bytes(p, b"hello")
    >>> p.read_bytes()
    b'hello'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _commit(tmp: Path, path: Path, fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            _commit(tmp, path, fh)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text_lines(path: Path, lines: Iterable[str]) -> None:
    """Write UTF-8 lines (each gets a trailing newline) to ``path`` atomically, streaming."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(line)
                fh.write("\n")
            _commit(tmp, path, fh)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


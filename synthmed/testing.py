"""Helpers for testing pipelines built on synthmed.

- :class:`~synthmed.backends.pattern.PatternBackend` (re-exported here): the ``pattern`` backend, a fast
  deterministic test pattern with exact masks, to build a dataset in milliseconds in a test;
- :func:`output_digests`: the sha256 of every file a build wrote, to compare two builds byte for byte.

Example:
    >>> PatternBackend(64, 64).info.name
    'pattern'
"""

from __future__ import annotations

from .backends.pattern import PatternBackend

__all__ = ["PatternBackend", "output_digests"]


def output_digests(out) -> dict[str, str]:
    """Relative path -> sha256 of every file a build wrote under ``out``, run state (``.synthmed/``) left out:
    what "byte-identical" compares between two builds.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.txt").write_text("x")
        >>> output_digests(folder)["a.txt"][:12]
        '2d711642b726'
    """
    import os
    from pathlib import Path

    from .ledger import file_sha256

    out = Path(out)
    found = {}
    for root, dirs, files in os.walk(out):
        rel_root = Path(root).relative_to(out)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d != ".synthmed"]
        for name in files:
            found[(rel_root / name).as_posix()] = file_sha256(Path(root) / name)
    return found

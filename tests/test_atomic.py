"""Atomic writes: a write that fails partway leaves the old file as it was and no temp file behind."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from synthmed.atomic import atomic_write_bytes, atomic_write_text_lines

OLD = b"the old contents\n"


def _only(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_a_write_cut_off_by_the_file_size_limit_keeps_the_old_file(tmp_path):
    """#17: bytes that stop partway (EFBIG, as a full disk would) never reach the final name."""
    import resource

    path = tmp_path / "report.json"
    path.write_bytes(OLD)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
    try:
        with pytest.raises(OSError):
            atomic_write_bytes(path, b"x" * 1_000_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == OLD
    assert _only(tmp_path) == ["report.json"]


def test_a_failed_commit_keeps_the_old_file(tmp_path, monkeypatch):
    """#17: an error between writing and renaming (fsync: the disk) leaves the old file and no temp file."""
    path = tmp_path / "manifest.csv"
    path.write_bytes(OLD)

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(path, b"new contents")
    with pytest.raises(OSError, match="No space"):
        atomic_write_text_lines(path, ["new", "lines"])
    assert path.read_bytes() == OLD
    assert _only(tmp_path) == ["manifest.csv"]


def test_lines_that_fail_partway_keep_the_old_file(tmp_path):
    """#17: a generator that raises after some lines were written leaves the old file and no temp file."""
    path = tmp_path / "cases.jsonl"
    path.write_bytes(OLD)

    def lines():
        yield "first"
        yield "second"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_text_lines(path, lines())
    assert path.read_bytes() == OLD
    assert _only(tmp_path) == ["cases.jsonl"]


def test_a_successful_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(OLD)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    atomic_write_text_lines(path, ["one", "two"])
    assert path.read_bytes() == b"one\ntwo\n"
    assert _only(tmp_path) == ["a.txt"]

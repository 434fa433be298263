"""What qc writes: qc_report.json, report.html, the manifest's qc columns and the split metadata.csv files.

Where, decided before the checks run (:class:`Outputs`): the output folder, under its run lock and only files
synthmed's record (:mod:`synthmed.ledger`) says are synthmed's, or where no file is; a report folder
(``report_dir``); or nowhere, in a folder this process cannot write (the result still holds the report).

Example:
    >>> outputs = Outputs(Path("out/pneumonia"), None, write=True, lock=True)  # doctest: +SKIP
    >>> report_path, html_path = outputs.write(report, thumbs, grid, rows, statuses, flagged)  # doctest: +SKIP
    >>> outputs.release()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from .inputs import STATE_DIR, QCError

REPORT_JSON = "qc_report.json"
REPORT_HTML = "report.html"
LEDGER_KEY = "qc"            # qc's claim in synthmed's record of its files


def _writable(folder: Path) -> bool:
    """Whether this process may create files in ``folder`` (and in its run state, where there is one)."""
    state = folder / STATE_DIR
    return os.access(folder, os.W_OK | os.X_OK) and (not state.is_dir() or os.access(state, os.W_OK | os.X_OK))


def _lock(out: Path):
    """Hold the folder's run lock while the manifest is rewritten, so qc never races a generate.

    A copied dataset without the run state (``.synthmed/``) has no generate to race; it gets no lock file.
    Returns the open lock, None without run state, or False when the folder cannot be written (a read-only
    build, another user's folder): then qc writes nothing there, and no generate can write it either.
    """
    import errno
    import fcntl

    state = out / STATE_DIR
    if not state.is_dir():
        return None
    try:
        fh = open(state / "lock", "a+")
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return False
        raise QCError(f"cannot open the run lock {state / 'lock'}: {e.strerror or e}") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise QCError(f"another synthmed run is writing to {out}; wait for it to finish", 1) from None
    return fh


class Outputs:
    """Where qc writes, decided before the checks run: ``out`` (under its run lock and synthmed's record of
    its own files), ``report_dir``, or nowhere (a folder this process cannot write)."""

    def __init__(self, out: Path, report_dir: Path | None, *, write: bool, lock: bool):
        from ..ledger import ForeignFileError, Ledger

        self.out, self.dest, self.fill, self.handle = out, None, False, None
        self.ledger = None
        self.not_written: list[str] = []
        if not write:
            return
        if report_dir is not None and report_dir.resolve() != out.resolve():
            other = Ledger(report_dir, report_dir / STATE_DIR).other_kind("report") if report_dir.is_dir() else None
            if other:  # another dataset's own report, or a model: not replaced by this folder's
                raise QCError(f"--report-dir {report_dir} holds {other}; qc writes a report of {out} and does not "
                              "replace or write into it. Choose another --report-dir")
            try:
                report_dir.mkdir(parents=True, exist_ok=True)
                self.ledger = Ledger(report_dir, report_dir / STATE_DIR)
                self.ledger.claim(LEDGER_KEY, [REPORT_JSON, REPORT_HTML])
            except ForeignFileError as e:
                raise QCError(f"{e} in {report_dir}; synthmed overwrites only files it wrote: choose another "
                              "--report-dir") from None
            except OSError as e:
                raise QCError(f"cannot write to the report folder {report_dir}: {e.strerror or e}") from None
            self.dest = report_dir
            return
        writable = _writable(out)
        if writable and lock:
            self.handle = _lock(out)
            writable = self.handle is not False
        if not writable:
            self._cannot_write()
            return
        self.ledger = Ledger(out, out / STATE_DIR)
        if not self.ledger.is_safe():  # a linked state folder: its claims are not ours, and nothing is written there
            self.release()
            self.dest, self.fill = None, False
            self.not_written.append(f"{out / STATE_DIR} (or its claims folder) is a symbolic link or leads outside "
                                    f"{out}: qc wrote nothing there; --report-dir DIR writes the reports elsewhere")
            return
        self.dest, self.fill = out, True
        if self.handle:  # ours alone now: a killed qc's (or generate's) temp files, by the pids its claims name
            try:
                self.ledger.remove_temp_files()
            except OSError:
                pass

    def _cannot_write(self) -> None:
        self.dest, self.fill = None, False
        self.not_written.append(f"{self.out} is not writable: qc wrote nothing there; --report-dir DIR (report_dir= "
                                "in Python) writes qc_report.json and report.html elsewhere")

    def release(self) -> None:
        """Let go of the run lock (when held)."""
        if self.handle:
            self.handle.close()
        self.handle = None

    def _claim(self, rels: Sequence[str]) -> list[str]:
        """Claim each file; those that exist and are not synthmed's are left out, with a message."""
        from ..ledger import ForeignFileError

        claimed = []
        for rel in rels:
            try:
                self.ledger.claim(LEDGER_KEY, [rel])
            except ForeignFileError as e:
                what = ("its qc_status / qc_flags columns are not filled" if rel == "manifest.csv"
                        else "--report-dir DIR writes the report elsewhere")
                why = (f"{rel} changed since synthmed wrote it" if "changed" in e.why else
                       f"{rel} exists and synthmed's record does not name it (a copied dataset, or a file of yours)")
                self.not_written.append(f"{why}: left as it is; {what}")
                continue
            claimed.append(rel)
        return claimed

    def _record(self, rels: Sequence[str]) -> None:
        """Record the sha256 of files qc wrote, in its claim and in any other claim naming them (none goes stale)."""
        from ..ledger import file_sha256

        digests = {rel: sha for rel in rels if (sha := file_sha256(self.ledger.root / rel))}
        if not digests:
            return
        self.ledger.record(LEDGER_KEY, digests)
        for key in self.ledger.keys():
            if key != LEDGER_KEY:
                named = {rel: sha for rel, sha in digests.items() if rel in self.ledger.read(key)["files"]}
                if named:
                    self.ledger.record(key, named)

    def write(self, report: dict, thumbs, grid, rows, statuses, flagged) -> tuple[Path | None, Path | None]:
        """Write what may be written; returns (qc_report.json, report.html) where written.

        The files left alone are named in ``report["notes"]`` and ``self.not_written``.
        """
        import errno

        from ..atomic import atomic_write_bytes
        from .report import render_html

        if self.dest is None:
            report["notes"].extend(self.not_written)
            return None, None
        try:
            reports = self._claim([REPORT_JSON, REPORT_HTML])
            if self.fill and self._claim(["manifest.csv"]):
                written, left = _fill_manifest(self.out, rows, statuses, flagged, self.ledger)
                self.not_written.extend(left)
                self._record(["manifest.csv", *written])
            report["notes"].extend(self.not_written)
            if REPORT_JSON in reports:
                atomic_write_bytes(self.dest / REPORT_JSON, (json.dumps(report, indent=2, sort_keys=True,
                                                                        ensure_ascii=False) + "\n").encode("utf-8"))
            if REPORT_HTML in reports:
                html = render_html(report, thumbs=thumbs, grid=grid)
                atomic_write_bytes(self.dest / REPORT_HTML, html.encode("utf-8"))
            self._record(reports)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise QCError(f"cannot write qc's files in {self.dest}: {e.strerror or e}"
                              + (f" ({e.filename})" if e.filename else ""), 1) from None
            self._cannot_write()
            report["notes"].append(self.not_written[-1])
            return None, None
        return (self.dest / REPORT_JSON if REPORT_JSON in reports else None,
                self.dest / REPORT_HTML if REPORT_HTML in reports else None)


def _fill_manifest(out: Path, rows: list[dict], statuses: dict[str, str], flagged: dict[str, tuple],
                   ledger) -> tuple[list[str], list[str]]:
    """Rewrite manifest.csv (atomically) with qc_status and qc_flags, and the split metadata.csv copies that are
    synthmed's (claimed in ``ledger`` first). Returns (metadata files written, messages naming those left alone)."""
    from ..atomic import atomic_write_text_lines
    from ..writers.manifest import csv_lines, write_split_metadata_claimed

    def updated() -> Iterable[dict]:
        for row in rows:
            yield {**row, "qc_status": statuses.get(row["case_id"], ""),
                   "qc_flags": "|".join(flagged.get(row["case_id"], ()))}

    atomic_write_text_lines(out / "manifest.csv", csv_lines(updated(), header=True))
    try:
        written, left = write_split_metadata_claimed(out / "manifest.csv", out, ledger, LEDGER_KEY)
    except ValueError as e:  # checked before the run; a folder swapped for a link since
        raise QCError(str(e)) from None
    return [p.relative_to(out).as_posix() for p in written], left

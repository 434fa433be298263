"""The output folder of a build: the foreign-file check, the run record, the lock, the manifest parts,
and the ledger of what synthmed wrote there (only the run folder deletes, and only what the ledger names).

Example:
    >>> part_path(Path("OUT/.synthmed/parts"), 3).name
    'part-000003.csv'
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import BuildError

STATE_DIR = ".synthmed"
WORKERS_LOCK = "workers.lock"  # STATE_DIR/workers.lock: held shared by each Ray worker while it lives
WORKERS_TIMEOUT_S = 60.0  # how long a run waits for a killed run's workers to be reaped


# 2: DX by default, a DICOM SR (and SEG) beside every DICOM image, their manifest columns. 3: 8-bit PNG by default,
# written by Pillow, the png_bit_depth column. A folder of another format is refused on --resume (never mixed);
# --overwrite starts it again.
RUN_FORMAT = 5


FORMAT_CHANGES = {2: "DX images by default, a DICOM SR and SEG beside each, their manifest columns, 0/1 masks",
                  3: "8-bit PNGs by default (image.png_bit_depth), written by Pillow, the png_bit_depth column",
                  4: "DICOM UIDs derived from the image's pixels too, masks and SEG segments in the findings' order, "
                     "the phantom's smallest findings drawn larger",
                  5: "DICOM Patient ID of the case id and the spec hash (two sets' patients never share one)"}


OUR_NAMES = ("images", "dicom", "masks", "manifest.csv", "cases.jsonl", "dataset_card.json",
             "README.md", "qc_report.json", "report.html", STATE_DIR)


def _lock_holders(path: Path) -> list[int]:
    """The ids of the processes on this machine that hold a flock on ``path`` (Linux's /proc/locks); [] elsewhere.

    Example:
        >>> _lock_holders(Path("/nonexistent"))
        []
    """
    try:
        st = os.stat(path)
        wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii") as fh:
            rows = [line.split() for line in fh]
    except (OSError, ValueError):
        return []
    return sorted({int(r[4]) for r in rows if len(r) > 5 and r[1] == "FLOCK" and r[5] == wanted and r[4].isdigit()})


class RunFolder:
    """The output folder: foreign-file check, run state, lock, and the ledger of what synthmed wrote in it.

    synthmed deletes or overwrites only files the ledger (:mod:`synthmed.ledger`) names; see docs/safety.md.
    """

    def __init__(self, out: Path):
        from ..ledger import Ledger

        self.out = out
        self.state = out / STATE_DIR
        self.parts = self.state / "parts"
        self.ledger = Ledger(out, self.state)
        self._lock_fh = None
        self.created = False
        self.left_alone: list[str] = []   # files --overwrite found that synthmed did not write
        self.notes: list[str] = []         # what the user should know (printed by the CLI)
        self.rerun = "--resume"            # what a refused claim's message asks to rerun with (prepare sets it)

    def prepare(self, run: dict, *, resume: bool, overwrite: bool, planned=None, folders=()) -> None:
        """Lock the folder and check it against an earlier run; ``planned(rel)`` says whether this run will
        write ``rel`` (so that --overwrite stops before deleting anything when a file in the way would stay), and
        ``folders`` are the folders it writes into (``images/train``): a file at one stops it before anything."""
        self.planned = planned or (lambda rel: False)
        self.rerun = "--overwrite" if overwrite else "--resume"
        out = self.out
        if out.exists() and not out.is_dir():
            raise BuildError(f"{out} exists and is not a folder", 2)
        other = self.ledger.other_kind("dataset") if out.is_dir() and self.ledger.is_safe() else None
        if other:  # a mistyped -o: not even --overwrite replaces it
            raise BuildError(f"{out} holds {other}; synthmed generate writes a dataset and does not replace or write "
                             "into it. Choose another output folder", 2)
        run_file = self.state / "run.json"
        if out.exists():
            try:
                entries = [p.name for p in out.iterdir()]
            except OSError as e:
                raise BuildError(f"cannot read the output folder {out}: {e.strerror or e}", 2) from None
            # a run killed before it wrote run.json leaves only our own names, with .synthmed among them
            ours = STATE_DIR in entries and (set(entries) <= set(OUR_NAMES) or not self.ledger.is_empty())
            if entries and not run_file.exists() and not ours and STATE_DIR not in entries and \
                    {"manifest.csv", "dataset_card.json"} <= set(entries):
                raise BuildError(f"{out} looks like a synthmed dataset whose record ({STATE_DIR}/) is gone: without it "
                                 "synthmed cannot tell its files from anyone's, so it neither resumes nor overwrites "
                                 "them. Build into a new folder (or delete this one yourself)", 2)
            if entries and not run_file.exists() and not ours:
                foreign = sorted(e for e in entries if e not in OUR_NAMES)[:3]
                raise BuildError(f"{out} already holds files synthmed did not write ({', '.join(foreign or entries[:3])}"
                                 f"{', ...' if len(entries) > 3 else ''}); choose an empty or new folder", 2)
        self.created = not out.exists()
        self._refuse_links()  # before the lock file or anything else is written into them
        self._refuse_files_at_folders(folders)
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.state.mkdir(exist_ok=True)
        except OSError as e:
            what = "write to the output folder" if out.is_dir() else "create the output folder"
            raise BuildError(f"cannot {what} {out}: {e.strerror or e}", 2) from None
        self._lock()
        try:
            self._check_previous_run(run, run_file, resume=resume, overwrite=overwrite)
        except BaseException:
            self.release()  # a refused run must not keep the folder locked
            raise

    def _check_previous_run(self, run: dict, run_file: Path, *, resume: bool, overwrite: bool) -> None:
        out = self.out
        if run_file.exists():
            previous = _read_run_record(run_file)
            if self.ledger.is_empty():
                self._adopt_legacy_run()
            if overwrite:
                self.clear(self.planned)
            elif not resume:
                name = previous.get("name", "?") if previous else "?"
                raise BuildError(f"{out} already holds a synthmed run ('{name}'); "
                                 "rerun with --resume to finish it, or --overwrite to start again", 2)
            elif previous is None:
                # every kept image is still checked against the plan (case, labels, spec hash) before it is kept
                self.notes.append(f"{run_file} could not be read (damaged); every kept image is checked against "
                                  "the spec before it is kept")
            else:
                if previous.get("format") != run["format"]:
                    old = previous.get("format")
                    since = [FORMAT_CHANGES[k] for k in sorted(FORMAT_CHANGES)
                             if isinstance(old, int) and old < k <= run["format"]]
                    what = "; ".join(since or [FORMAT_CHANGES.get(run["format"], "")])
                    raise BuildError(f"{out} was built by an earlier synthmed (output format {previous.get('format')!r}; "
                                     f"this one writes format {run['format']}{': ' + what if what else ''}); its files "
                                     "cannot be finished by this version. Rerun with --overwrite to build it again "
                                     "(it removes only the files synthmed wrote), or use a new folder", 2)
                previous = _same_model_path(previous, run)
                changed = []
                for key in run:
                    old, new = previous.get(key), run[key]
                    if isinstance(old, dict) and isinstance(new, dict):  # a key only the old one has counts too
                        keys = list(new) + [k for k in old if k not in new]  # (generator.decoder: tiny, then none)
                        changed += [f"{key}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys
                                    if old.get(k) != new.get(k)]
                    elif old != new:
                        changed.append(key if key == "spec_hash" else f"{key} {old!r} -> {new!r}")
                if changed:
                    what = "; ".join(changed)
                    hint = (" (the hash covers every value of the spec: to lower generator.batch_size for a resume, "
                            "keep the spec as it was and pass --batch-size, batch_size= in Python)"
                            if "spec_hash" in changed else "")
                    raise BuildError(f"{out} was built from a different spec or settings (changed: {what}){hint}; "
                                     f"rerun with --overwrite to start again{_as_it_began(previous, run)}", 2)
        elif overwrite and not self.ledger.is_empty():
            self.clear(self.planned)  # a run killed before it wrote run.json
        self.ledger.remove_temp_files()  # a killed run's, by the pids its claims recorded
        self.parts.mkdir(parents=True, exist_ok=True)
        self.ledger.claim("run", [f"{STATE_DIR}/run.json"])
        _atomic_json(run_file, run)
        self.ledger.record_files("run", [f"{STATE_DIR}/run.json"])

    def _adopt_legacy_run(self) -> None:
        """A run written before the ledger existed: its parts are its record (each file with its sha256)."""
        import csv

        parts = sorted(self.parts.glob("part-[0-9][0-9][0-9][0-9][0-9][0-9].csv")) if self.parts.is_dir() else []
        for part in parts:
            try:  # any synthmed version's columns: only the file names and their sha256 are read
                with open(part, newline="", encoding="utf-8") as fh:
                    rows = list(csv.DictReader(fh))
            except (OSError, ValueError, csv.Error):
                continue
            digests = {}
            for row in rows:
                for rel, sha in row_files(row):
                    if rel and inside_folder(self.out, rel) and file_sha256(self.out / rel) == sha:
                        digests[rel] = sha
            digests[f"{STATE_DIR}/parts/{part.name}"] = file_sha256(part)
            self.ledger.record(f"chunk-{part.stem[5:]}", digests)
        top = [n for n in ("manifest.csv", "cases.jsonl", "dataset_card.json", "README.md", "qc_report.json",
                           "report.html", f"{STATE_DIR}/run.json") if (self.out / n).is_file()]
        top += [f"images/{p.name}/metadata.csv" for p in (self.out / "images").glob("*")
                if (p / "metadata.csv").is_file()] if (self.out / "images").is_dir() else []
        self.ledger.record_files("run", top)

    def clear(self, planned) -> None:
        """--overwrite: remove exactly what the ledger says synthmed wrote; name what it leaves.

        Nothing is removed when a file that would stay is where this run will write: the run could not finish.
        """
        _, changed = self.ledger.removal_plan()
        tops = sorted(p.name for p in self.out.iterdir() if p.name != STATE_DIR)
        foreign = self.ledger.foreign_files(tops)
        blocking = sorted(r for r in [*foreign, *changed, *self._not_files(tops)] if planned(r))
        if blocking:
            shown = ", ".join(blocking[:3]) + (f" and {len(blocking) - 3} more" if len(blocking) > 3 else "")
            raise BuildError(f"{self.out} holds {shown}, where this run would write, and synthmed did not write "
                             f"{'it' if len(blocking) == 1 else 'them'} (or {'it' if len(blocking) == 1 else 'they'} "
                             "changed since); nothing was removed. Move them away and rerun with --overwrite", 2)
        removal = self.ledger.remove_owned()
        left = foreign + [f"{r} (changed since synthmed wrote it)" for r in removal.changed]
        if left:
            self.left_alone = left
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            self.notes.append(f"--overwrite left {len(left)} file(s) synthmed did not write in {self.out}: {shown}")

    def _not_files(self, tops) -> list[str]:
        """Folders and links under ``tops``: where one stands at a path this run writes a file to, no run can
        finish, and --overwrite must stop before it removes anything."""
        found = []
        for top in tops:
            base = self.out / top
            if base.is_symlink() or not base.is_dir():
                continue
            for dirpath, dirs, names in os.walk(base, followlinks=False):
                for name in [*dirs, *names]:
                    path = Path(dirpath) / name
                    if path.is_symlink() or path.is_dir():
                        found.append(path.relative_to(self.out).as_posix())
        return found

    def _refuse_links(self) -> None:
        """Refuse a folder of ours (or a split folder in it) that leads outside OUT: writes must not follow it."""
        base = self.out.resolve()
        for top in ("images", "dicom", "masks", STATE_DIR):
            path = self.out / top
            try:
                inside = [p for p in path.iterdir() if p.is_dir() or p.is_symlink()] if path.is_dir() and \
                    not path.is_symlink() else []
            except OSError as e:
                raise BuildError(f"cannot read {path}: {e.strerror or e}", 2) from None
            for p in [path, *inside]:
                if p.is_symlink() or (p.exists() and not p.resolve().is_relative_to(base)):
                    raise BuildError(f"{p} is a symbolic link (or leads outside {self.out}); synthmed writes only "
                                     "inside the output folder and does not follow links there. Remove it and rerun", 2)

    def _refuse_files_at_folders(self, folders) -> None:
        """A file where this run writes a folder (``images/val`` made a file): no run could finish, so nothing is
        removed and the user is told to move it (exit 2), whatever --resume or --overwrite say."""
        for rel in folders:
            for path in [self.out / Path(rel).parts[0], self.out / rel]:
                if path.exists() and not path.is_dir():
                    raise BuildError(f"{path} is a file where synthmed writes the folder {path.name}/ (synthmed did "
                                     f"not write it); nothing was removed. Move it away and rerun with {self.rerun}", 2)

    def has_output(self) -> bool:
        """Whether any image or manifest part has been written into the folder."""
        owned = self.ledger.owned()
        return any(rel.split("/")[0] in ("images", "dicom", "masks") or rel.startswith(f"{STATE_DIR}/parts/")
                   for rel in owned if (self.out / rel).exists())

    def forget(self) -> None:
        """Remove a run that made nothing (the backend could not load): a corrected rerun starts afresh."""
        self.ledger.remove_owned()
        self.release()
        if self.created:  # a folder this call made: remove what this call put there, and the folders if empty
            (self.state / "lock").unlink(missing_ok=True)
            (self.state / WORKERS_LOCK).unlink(missing_ok=True)
            for folder in (self.ledger.dir, self.parts, self.state, self.out):
                try:
                    folder.rmdir()
                except OSError:
                    pass

    def _lock(self) -> None:
        import fcntl

        try:
            fh = open(self.state / "lock", "a+")
        except OSError as e:  # e.g. a folder made at that name: named, left as it is
            hint = (f"; {self.out} is not writable by you, and a build writes into its output folder (read a "
                    "shared set with the loaders or `synthmed qc --report-dir`; build into a folder of your own)"
                    if isinstance(e, PermissionError) or e.errno == 30 else "")  # EROFS: a read-only file system
            raise BuildError(f"cannot open the run lock {self.state / 'lock'}: {e.strerror or e}{hint}", 2) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise BuildError(f"another synthmed run is writing to {self.out}; wait for it to finish", 1) from None
        self._lock_fh = fh
        try:
            self._wait_for_workers()
        except BuildError:
            self.release()  # a caller that retries in this process must find the lock free
            raise

    def _wait_for_workers(self, timeout: float | None = None) -> None:
        """Wait until no Ray worker of an earlier run holds the workers' lock: a killed driver's workers go on
        writing for a few seconds (until Ray reaps them), and their files would land in this run's folder."""
        import fcntl
        import time

        try:
            fh = open(self.state / WORKERS_LOCK, "r")  # only where Ray workers ran: they make it
        except OSError:
            return
        timeout = WORKERS_TIMEOUT_S if timeout is None else timeout  # read now: a test may set it
        deadline, said = time.monotonic() + timeout, False
        with fh:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return  # closing the file releases it at once: this run's workers take it shared
                except BlockingIOError:
                    if not said:
                        print(f"waiting for the Ray workers of an earlier run on {self.out} to stop (up to "
                              f"{timeout:.0f} s)", file=sys.stderr, flush=True)
                        said = True
                    if time.monotonic() > deadline:
                        holders = _lock_holders(self.state / WORKERS_LOCK)
                        which = (f"processes {', '.join(map(str, holders))} on this machine hold "
                                 f"{self.state / WORKERS_LOCK}; stop them (kill {' '.join(map(str, holders))}) or "
                                 "cancel the earlier Ray job" if holders else
                                 "cancel the earlier Ray job (or stop its workers)")
                        raise BuildError(f"Ray workers of an earlier run on {self.out} are still writing there "
                                         f"after {timeout:.0f} s: {which}, then rerun. `ray stop` would also "
                                         "end every other Ray job of that cluster", 1) from None
                    time.sleep(0.2)
                except OSError:  # a file system without flock: nothing to wait on
                    return

    def release(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def claim(self, key: str, rels, *, keep_recorded: bool = False) -> None:
        """Claim files before writing them; a file there that synthmed did not write stops the run (exit 2).
        ``keep_recorded``: see :meth:`synthmed.ledger.Ledger.claim` (a chunk's files)."""
        from ..ledger import ForeignFileError

        try:
            self.ledger.claim(key, rels, keep_recorded=keep_recorded)
        except ForeignFileError as e:
            raise BuildError(f"{e} (in {self.out}); synthmed overwrites only files it wrote. Move "
                             f"{'it' if len(e.rels) == 1 else 'them'} out of the folder and rerun with "
                             f"{self.rerun}", 2) \
                from None


def _read_run_record(path: Path) -> dict | None:
    """run.json as a dict, or None when it cannot be read (damaged)."""
    try:
        data = json.loads(path.read_bytes()[:1_000_000])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def inside_folder(out: Path, rel: str) -> bool:
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


def row_files(row: dict) -> list[tuple[str, str]]:
    """(path, sha256) of every file a manifest row names."""
    pairs = [(row.get(f"{kind}_path", ""), row.get(f"{kind}_sha256", "")) for kind in ("png", "dicom", "sr", "seg")]
    if row.get("mask_paths"):
        pairs += zip(row["mask_paths"].split("|"), row.get("mask_sha256", "").split("|"))
    return [(rel, sha) for rel, sha in pairs if rel]


def _atomic_json(path: Path, data: Any) -> None:
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def _same_model_path(previous: dict, run: dict) -> dict:
    """A run recorded before a spec's model path was taken relative to the spec, with the same folder relative to
    the current one: the same model (its files' hash is checked against the parts), so not a change."""
    old, new = previous.get("model"), run.get("model")
    if not (isinstance(old, str) and isinstance(new, str)) or old == new or Path(old).is_absolute() \
            or str(Path(old).resolve()) != new:
        return previous
    generator = previous.get("generator")
    if isinstance(generator, dict) and generator.get("model") == old:
        generator = {**generator, "model": new}
    return {**previous, "model": new, "generator": generator}


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file in the output folder; None when there is none, or it is a link (not ours, not followed)."""
    from ..ledger import file_sha256 as sha256

    return sha256(path, follow_links=False)


def part_path(parts: Path, k: int) -> Path:
    return parts / f"part-{k:06d}.csv"


def _as_it_began(previous: dict, run: dict) -> str:
    """How to finish a run whose only sampling change is the model folder's new late-guidance recommendation."""
    from ..spec import late_guidance_flag

    old = (previous.get("generator") or {}).get("late_guidance")
    if old == (run.get("generator") or {}).get("late_guidance"):
        return ""
    try:
        flag = late_guidance_flag(old)
    except (KeyError, TypeError):  # a record this synthmed did not write
        return ""
    return f", or finish it with the guidance it began with: --late-guidance {flag} (generator.late_guidance)"

"""What synthmed wrote in a folder: the one record that decides which files it may delete or overwrite.

The rule (docs/safety.md): synthmed deletes or overwrites a file only if this record names it. It never
decides by a glob or a folder name, so a user's file in an output folder is left alone, whatever its name.

The record is a set of *claims*, one JSON file per writer of a part of the folder (a chunk of cases, the
run's own files, qc's files)::

    <state>/claims/<key>.json   {"pids": ["1234-9f0c2a1b"], "files": {"images/train/c-0.png": "<sha256>" | null}}

A claim is written (atomically) *before* the files it names, with the id of the process that writes them,
so a run killed at any moment has named every file and temp file (``.<name>.<pid>-<random>.tmp``, see
:mod:`synthmed.atomic`) it could have left. A sha256 is added once a file is written; ``null`` means
"claimed, maybe written". A path that exists and that no claim names is not ours: claiming it is refused
with :class:`ForeignFileError`, before anything is written over it.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> ledger = Ledger(root, root / ".state")
    >>> ledger.claim("run", ["a.txt"])
    []
    >>> _ = (root / "a.txt").write_text("ours"), (root / "b.txt").write_text("theirs")
    >>> ledger.claim("run", ["b.txt"])
    Traceback (most recent call last):
    ...
    synthmed.ledger.ForeignFileError: b.txt exists and synthmed did not write it
    >>> ledger.remove_owned().removed, sorted(p.name for p in root.iterdir() if p.name != ".state")
    (1, ['b.txt'])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

CLAIMS = "claims"
_TOKEN = re.compile(r"[0-9]+-[0-9a-f]{8}")  # synthmed.atomic.writer_token()
_CLAIM_TEMP = re.compile(r"\.[A-Za-z0-9_-][A-Za-z0-9_.-]*\.json\.[0-9]+-[0-9a-f]{8}\.tmp")
MAX_CLAIM_BYTES = 64 * 1024 * 1024  # a claim of a 64-case chunk is a few kB


# What a folder holds, told by the keys of its claims: each command writes one kind of folder and refuses another's,
# so that a mistyped -o never lets one command replace (or mix into) what another wrote.
FOLDER_KINDS = {
    "model": "a model that synthmed finetune or distill wrote",
    "dataset": "a dataset that synthmed generate wrote",
    "report": "the quality report of synthmed qc",
    "work": "the work folder of a synthmed finetune or distill run",
}


def claim_kind(key: str) -> str:
    """The kind of folder a claim key belongs to (see FOLDER_KINDS).

    Example:
        >>> claim_kind("chunk-000003"), claim_kind("model"), claim_kind("checkpoint-unet-0000200")
        ('dataset', 'model', 'work')
    """
    if key in ("model", "staged"):
        return "model"
    if key == "run" or key.startswith("chunk-"):
        return "dataset"
    if key == "qc":
        return "report"
    return "work"


class ForeignFileError(ValueError):
    """Files exist where synthmed would write, and no claim says synthmed wrote them."""

    def __init__(self, root: Path, rels: list[str], why: str = ""):
        shown = ", ".join(rels[:3]) + (f" and {len(rels) - 3} more" if len(rels) > 3 else "")
        one = len(rels) == 1
        if why:
            message = f"{shown} {why if one else why.replace('leads', 'lead').replace(' it', ' them')}"
        else:
            message = f"{shown} {'exists' if one else 'exist'} and synthmed did not write {'it' if one else 'them'}"
        super().__init__(message)
        self.root, self.rels, self.why = root, rels, why


@dataclass
class Removal:
    """What :meth:`Ledger.remove_owned` did: files removed, and ours that changed since (left in place)."""

    removed: int = 0
    changed: list[str] = field(default_factory=list)


def file_sha256(path: Path, *, follow_links: bool = True) -> str | None:
    """The sha256 of a file's bytes, or None if there is no such file (or, with ``follow_links=False``, it is a
    symbolic link: never a file synthmed wrote, and never read through)."""
    if not follow_links and Path(path).is_symlink():
        return None
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _own_sha256(path: Path) -> str | None:
    return file_sha256(path, follow_links=False)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _check_rel(rel: str) -> str:
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"a claimed path must be relative and stay inside the folder, got {rel!r}")
    return Path(rel).as_posix()


class Ledger:
    """The claims of one folder (``root``), kept in ``state``/claims."""

    def __init__(self, root: Path, state: Path):
        self.root = Path(root)
        self.dir = Path(state) / CLAIMS

    def _inside(self, rel: str) -> Path | None:
        """``root/rel`` when its folder lies inside the root after links are followed, else None (never touched)."""
        path = self.root / rel
        try:
            if path.parent.resolve().is_relative_to(self.root.resolve()):
                return path
        except (OSError, RuntimeError):  # a link loop
            pass
        return None

    def _in_state(self, rel: str) -> bool:
        """Whether ``rel`` lies in the state folder (run state is synthmed's own, whatever became of it)."""
        try:
            return (self.root / rel).is_relative_to(self.dir.parent)
        except ValueError:
            return False

    # ------------------------------------------------------------------ reading
    def _claim_path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"a claim key is a plain name, got {key!r}")
        return self.dir / f"{key}.json"

    def _journal_path(self, key: str) -> Path:
        return self._claim_path(key).with_suffix(".written")

    def read(self, key: str) -> dict:
        """One claim as ``{"pids": [...], "files": {rel: sha256 | None}}`` (empty if there is none), with the
        sha256 of each file :meth:`note_written` noted since the claim was last written."""
        claim = self._read_file(self._claim_path(key))
        if claim["files"] and self.is_safe():
            # the journal is newer than the claim (writing the claim empties it); a file written twice: its last line
            noted = dict(self._read_journal(self._journal_path(key)))
            for rel, sha in noted.items():
                if rel in claim["files"]:
                    claim["files"][rel] = sha
        return claim

    @staticmethod
    def _read_journal(path: Path) -> list[tuple[str, str]]:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return []
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_CLAIM_BYTES)
        entries = []
        for line in raw.splitlines():  # a line cut short by a kill is skipped: its file is then "maybe written"
            try:
                rel, sha = json.loads(line)
            except (ValueError, TypeError):
                continue
            if isinstance(rel, str) and isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha):
                entries.append((rel, sha))
        return entries

    def note_written(self, key: str, rel: str, sha: str) -> None:
        """Note the sha256 of one file of claim ``key`` just written: an append to the claim's journal, cheap enough
        for every file. Until the claim records its files (:meth:`record`, at the end of a chunk), a file the
        journal names is known by its bytes: one a user changes after a killed run is theirs, not ours to overwrite
        or remove. (Only a file written in the instant before a kill, not yet noted, is taken as ours unseen.)"""
        if not self.is_safe():
            return
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        path = self._journal_path(key)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:  # a link or folder put at its name is not written through; the message names it
            raise OSError(e.errno, e.strerror, str(path)) from None
        with os.fdopen(fd, "ab") as fh:
            fh.write((json.dumps([_check_rel(rel), sha]) + "\n").encode("utf-8"))

    @staticmethod
    def _read_file(path: Path) -> dict:
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_CLAIM_BYTES + 1)
            data = json.loads(raw) if len(raw) <= MAX_CLAIM_BYTES else None
        except (OSError, ValueError):
            data = None  # a damaged claim names nothing: its files are then not ours, and stay
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            return {"pids": [], "files": {}}
        # writer tokens "<pid>-<random hex>" only: a bare pid is guessable, so a user's file could carry it
        pids = [p for p in data.get("pids", []) if isinstance(p, str) and _TOKEN.fullmatch(p)]
        files = {str(k): (v if isinstance(v, str) else None) for k, v in data["files"].items()
                 if isinstance(k, str) and k and not Path(k).is_absolute() and ".." not in Path(k).parts}
        return {"pids": pids, "files": files}

    def is_safe(self) -> bool:
        """Whether the state folder and its claims folder are real folders inside the root (not links)."""
        root = self.root.resolve()
        for folder in (self.dir.parent, self.dir):
            if folder.is_symlink() or (folder.exists() and not folder.resolve().is_relative_to(root)):
                return False
        return True

    def keys(self) -> list[str]:
        """The keys of every claim, sorted (none where the claims folder is a link: such claims are not ours)."""
        if not self.dir.is_dir() or not self.is_safe():
            return []
        return sorted(p.name[:-5] for p in self.dir.iterdir() if p.name.endswith(".json") and not p.name.startswith("."))

    def known_digests(self) -> dict[str, set]:
        """Every path any claim names, with every sha256 recorded for it (None: claimed, maybe written)."""
        known: dict[str, set] = {}
        for key in self.keys():
            for rel, sha in self.read(key)["files"].items():
                known.setdefault(rel, set()).add(sha)
        return known

    def owned(self) -> dict[str, str | None]:
        """Every path any claim names, with its recorded sha256 (None: not recorded yet)."""
        files: dict[str, str | None] = {}
        for key in self.keys():
            for rel, sha in self.read(key)["files"].items():
                if files.get(rel) is None:
                    files[rel] = sha
        return files

    def is_empty(self) -> bool:
        return not self.keys()

    def kinds(self) -> set[str]:
        """The kinds of folder its claims belong to (see FOLDER_KINDS); empty when it has none."""
        return {claim_kind(k) for k in self.keys()}

    def other_kind(self, *allowed: str) -> str | None:
        """What the folder holds, in words, when its claims are of a kind not in ``allowed``; else None.

        Example:
            >>> import tempfile, pathlib
            >>> root = pathlib.Path(tempfile.mkdtemp())
            >>> ledger = Ledger(root, root / ".state")
            >>> _ = ledger.claim("run", ["manifest.csv"])
            >>> ledger.other_kind("model")
            'a dataset that synthmed generate wrote'
        """
        kinds = self.kinds()
        if "dataset" in kinds:  # a generated dataset's own qc report is part of it
            kinds.discard("report")
        other = sorted(kinds - set(allowed))
        return FOLDER_KINDS[other[0]] if other else None

    # ------------------------------------------------------------------ writing
    def _write(self, key: str, claim: dict) -> None:
        from .atomic import atomic_write_bytes

        if not self.is_safe():
            raise ForeignFileError(self.root, [self.dir.relative_to(self.root).as_posix()],
                                   "is a symbolic link (or leads outside the folder); synthmed does not write through it")
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"pids": claim["pids"], "files": dict(sorted(claim["files"].items()))}
        atomic_write_bytes(self._claim_path(key), (json.dumps(data, indent=0) + "\n").encode("utf-8"))
        self._journal_path(key).unlink(missing_ok=True)  # what it noted is in the claim now (read() merged it)

    def claim(self, key: str, rels: Iterable[str], *, repair: bool = False,
              keep_recorded: bool = False) -> list[tuple[str, str]]:
        """Record that this process is about to write ``rels`` (paths relative to the folder).

        ``repair``: a recorded file whose bytes changed (a damaged cache or checkpoint of synthmed's own) is moved
        aside to ``<name>.changed-<token>`` and made again; by default such a file is someone's edit and is refused.
        ``keep_recorded``: a file of ours still as recorded keeps its sha256 until it is rewritten (and noted,
        :meth:`note_written`), so that a run killed again before rewriting it still knows it. For writers that
        note each file and write the same bytes again (a dataset's chunks); others mark every file "maybe
        written", as a rewrite with other bytes, killed before it is recorded, must not read as a user's edit.
        Returns the (path, kept as) pairs a repair moved aside.

        Raises:
            ForeignFileError: one of them exists and no claim names it (it is not ours to overwrite).
        """
        rels = [_check_rel(r) for r in rels]
        outside = [r for r in rels if self._inside(r) is None]
        if outside:
            raise ForeignFileError(self.root, outside, "leads outside the folder through a link")
        claim = self.read(key)
        files = claim["files"]
        present = [r for r in rels if _exists(self.root / r)]
        # a file there is ours only if a claim names it and it is still the file that claim recorded
        suspect = [r for r in present if r not in files or (files[r] is not None and _own_sha256(self.root / r)
                                                            != files[r])]
        if suspect:
            everything = self.known_digests()
            foreign = [r for r in suspect if r not in everything]
            if foreign:
                raise ForeignFileError(self.root, foreign)
            changed = [r for r in suspect if not self._in_state(r) and None not in everything[r] and
                       ((self.root / r).is_symlink() or _own_sha256(self.root / r) not in everything[r])]
            if changed and not repair:
                raise ForeignFileError(self.root, changed, "changed since synthmed wrote it")
        else:
            changed = []
        from .atomic import writer_token

        moved = []
        for rel in changed:  # repair: nothing is lost, the changed bytes stay beside under a new name
            aside = (self.root / rel).with_name(f"{Path(rel).name}.changed-{writer_token()}")
            os.rename(self.root / rel, aside)
            moved.append((rel, aside.relative_to(self.root).as_posix()))
        for rel in rels:  # about to be (re)written
            if not (keep_recorded and files.get(rel) and rel in present and rel not in suspect):
                files[rel] = None
        if writer_token() not in claim["pids"]:
            claim["pids"].append(writer_token())
        self._write(key, claim)
        return moved

    def record(self, key: str, digests: Mapping[str, str]) -> None:
        """Add the sha256 of files this claim wrote."""
        claim = self.read(key)
        for rel, sha in digests.items():
            claim["files"][_check_rel(rel)] = sha
        self._write(key, claim)

    def record_files(self, key: str, rels: Iterable[str]) -> None:
        """Add the sha256 of written files, read from disk."""
        self.record(key, {r: _own_sha256(self.root / r) for r in rels if _own_sha256(self.root / r)})

    def forget(self, key: str) -> None:
        """Drop a claim (its files are no longer ours: only for files that are gone)."""
        self._claim_path(key).unlink(missing_ok=True)
        self._journal_path(key).unlink(missing_ok=True)

    # ------------------------------------------------------------------ removing
    def temp_files(self) -> list[Path]:
        """Temp files that claimed writes of recorded processes left behind (a killed run's)."""
        found = []
        for key in self.keys():
            claim = self.read(key)
            for rel in claim["files"]:
                path = self._inside(rel)
                if path is None:
                    continue
                for pid in claim["pids"]:
                    tmp = path.with_name(f".{path.name}.{pid}.tmp")
                    if tmp.is_file() and not tmp.is_symlink():
                        found.append(tmp)
        return found

    def remove_temp_files(self) -> int:
        found = self.temp_files()
        if self.dir.is_dir() and self.is_safe():  # a claim's own temp file, from a writer killed while writing it
            found += [p for p in self.dir.iterdir()
                      if _CLAIM_TEMP.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
        for tmp in found:
            tmp.unlink(missing_ok=True)
        return len(found)

    def remove(self, key: str, rels: Iterable[str]) -> Removal:
        """Delete files of one claim that are no longer wanted (a re-planned chunk's old files), then un-claim them.

        As :meth:`remove_owned`: a file changed since synthmed wrote it is left and reported in ``changed``.
        """
        claim = self.read(key)
        result = Removal()
        for rel in rels:
            if rel not in claim["files"]:
                continue
            sha = claim["files"].pop(rel)
            path = self._inside(rel)
            if path is not None and path.is_file() and not path.is_symlink():
                if sha is not None and _own_sha256(path) != sha:
                    result.changed.append(rel)
                    continue
                path.unlink()
                result.removed += 1
                self._remove_empty_folders([path])
        self._write(key, claim)
        return result

    def removal_plan(self) -> tuple[list[str], list[str]]:
        """What :meth:`remove_owned` would do, doing nothing: (files it would remove, ours changed since)."""
        remove, changed = [], []
        for rel, known in sorted(self.known_digests().items()):
            path = self._inside(rel)
            if path is None or path.is_symlink() or not path.is_file():
                continue
            (remove if None in known or _own_sha256(path) in known else changed).append(rel)
        return remove, changed

    def remove_owned(self) -> Removal:
        """Delete the files the claims name, their temp files, and then the claims.

        A file is removed when its sha256 is one a claim recorded for it (or a claim holds it as being written).
        Otherwise someone changed it since synthmed wrote it: it is left in place and returned in ``changed``.
        Folders are removed only when this leaves them empty.
        """
        result = Removal()
        shas = self.known_digests()
        self.remove_temp_files()
        removed: list[Path] = []
        for rel, known in sorted(shas.items()):
            path = self._inside(rel)
            if path is None or path.is_symlink() or not path.is_file():
                continue
            if None not in known and _own_sha256(path) not in known:
                result.changed.append(rel)
                continue
            path.unlink()
            result.removed += 1
            removed.append(path)
        for key in self.keys():
            self.forget(key)
        self._remove_empty_folders(removed)
        return result

    def _remove_empty_folders(self, removed: list[Path]) -> None:
        folders = {p for path in removed for p in path.parents if p != self.root and self.root in p.parents}
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()  # only an empty folder: anything a user put there stays
            except OSError:
                pass

    def foreign_files(self, tops: Iterable[str]) -> list[str]:
        """Files under the folders ``tops`` (relative) that no claim names: what a removal leaves."""
        owned = self.owned()
        found = []
        for top in tops:
            base = self.root / top
            if base.is_file() or base.is_symlink():
                if top not in owned:
                    found.append(top)
                continue
            if not base.is_dir():
                continue
            for dirpath, _dirs, names in os.walk(base, followlinks=False):
                for name in names:
                    rel = Path(os.path.relpath(Path(dirpath) / name, self.root)).as_posix()
                    if rel not in owned:
                        found.append(rel)
        return sorted(found)

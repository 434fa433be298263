"""generate(): plan -> batches -> backend -> writers -> manifest, resumable and deterministic.

The case list is cut into fixed chunks of ``CHUNK_SIZE`` cases (independent of the batch
size). A chunk is done when its manifest part exists and every file it lists still has
the sha256 the part recorded; ``--resume`` redoes every chunk that is not done. Every file
is written under a temp name and renamed, so a final name never holds a partial file.

Output folder:

    OUT/images/<split>/<case_id>.png        OUT/dicom/<split>/<case_id>.dcm
    OUT/dicom/<split>/<case_id>_sr.dcm     the image's findings, a DICOM SR (TID 1500)
    OUT/dicom/<split>/<case_id>_seg.dcm    its masks, a DICOM SEG (where the backend gives masks)
    OUT/masks/<split>/<case_id>_mask_<finding>.png
    OUT/images/<split>/metadata.csv        the split's manifest rows, for Hugging Face imagefolder
    OUT/manifest.csv
    OUT/cases.jsonl   OUT/dataset_card.json   OUT/README.md
    OUT/qc_report.json   OUT/report.html       the quality checks (the spec's ``qc:``; see synthmed.qc)
    OUT/.synthmed/    run state: run.json, lock, parts/

Quality checks: when the spec's ``qc.enabled`` (the default), the cheap checks run at the end (per
image, spec fidelity, duplicates) and fill the manifest's ``qc_status`` / ``qc_flags``. With
``qc.reject.max_tries`` > 0, an image failing a gating pixel check (size, nan, blank, saturated) is
made again from :func:`derive_retry_seed` before it is written; ``qc_tries`` and ``qc_seed`` say how.

Example:
    >>> import tempfile
    >>> from synthmed.spec import load_spec
    >>> spec = load_spec("spec_version: 1\\nname: d\\ncount: 3\\nimage: {size: 64}\\nfindings: [{finding: cardiomegaly, weight: 1}]")
    >>> result = generate(spec, tempfile.mkdtemp() + "/out", backend="pattern", progress=False)
    >>> result.written, result.manifest.name
    (3, 'manifest.csv')
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .spec import DatasetSpec, load_spec

if TYPE_CHECKING:  # pragma: no cover
    from .backends import Backend, GeneratedImage
    from .sampler import Case

CHUNK_SIZE = 64
STATE_DIR = ".synthmed"
# 2: DX by default, a DICOM SR (and SEG) beside every DICOM image, their manifest columns. 3: 8-bit PNG by default,
# written by Pillow, the png_bit_depth column. A folder of another format is refused on --resume (never mixed);
# --overwrite starts it again.
RUN_FORMAT = 3
FORMAT_CHANGES = {2: "DX images by default, a DICOM SR and SEG beside each, their manifest columns, 0/1 masks",
                  3: "8-bit PNGs by default (image.png_bit_depth), written by Pillow, the png_bit_depth column"}
INTENDED_USE = "synthetic data for research and development; not for diagnostic use"
OUR_NAMES = ("images", "dicom", "masks", "manifest.csv", "cases.jsonl", "dataset_card.json",
             "README.md", "qc_report.json", "report.html", STATE_DIR)


class BuildError(RuntimeError):
    """An expected failure of a build, with the exit code the CLI should use (1 failure, 2 usage)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class BuildResult:
    """What a call to :func:`generate` did."""

    out: Path
    total: int          # cases in the planned range
    written: int        # images written by this call
    reused: int         # images kept from an earlier run (verified by sha256)
    interrupted: bool
    seconds: float
    qc: Any = field(default=None, repr=False)  # the QCResult of the checks run at the end (None when qc is off)
    notes: tuple[str, ...] = ()  # what the user should know: files --overwrite left alone, a damaged run record

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.csv"

    @property
    def qc_passed(self) -> bool:
        """False when a gating quality check failed; True when none did or none ran."""
        return self.qc is None or self.qc.passed


def derive_retry_seed(seed: int | None, try_number: int, case_id: str = "") -> int:
    """The seed of a case's ``try_number``-th regeneration: 63 bits of sha256 over (seed, try number).

    A pure function of the case, so a rerun, a resume or another executor regenerates the same image.

    Example:
        >>> derive_retry_seed(12345, 1) == derive_retry_seed(12345, 1) != derive_retry_seed(12345, 2)
        True
    """
    key = f"synthmed-qc-retry\x00{case_id if seed is None else int(seed)}\x00{int(try_number)}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & (2 ** 63 - 1)


# ----------------------------------------------------------------------------- the output folder

class _RunFolder:
    """The output folder: foreign-file check, run state, lock, and the ledger of what synthmed wrote in it.

    synthmed deletes or overwrites only files the ledger (:mod:`synthmed.ledger`) names; see docs/safety.md.
    """

    def __init__(self, out: Path):
        from .ledger import Ledger

        self.out = out
        self.state = out / STATE_DIR
        self.parts = self.state / "parts"
        self.ledger = Ledger(out, self.state)
        self._lock_fh = None
        self.created = False
        self.left_alone: list[str] = []   # files --overwrite found that synthmed did not write
        self.notes: list[str] = []         # what the user should know (printed by the CLI)

    def prepare(self, run: dict, *, resume: bool, overwrite: bool, planned=None) -> None:
        """Lock the folder and check it against an earlier run; ``planned(rel)`` says whether this run will
        write ``rel`` (so that --overwrite stops before deleting anything when a file in the way would stay)."""
        self.planned = planned or (lambda rel: False)
        out = self.out
        if out.exists() and not out.is_dir():
            raise BuildError(f"{out} exists and is not a folder", 2)
        run_file = self.state / "run.json"
        if out.exists():
            try:
                entries = [p.name for p in out.iterdir()]
            except OSError as e:
                raise BuildError(f"cannot read the output folder {out}: {e.strerror or e}", 2) from None
            # a run killed before it wrote run.json leaves only our own names, with .synthmed among them
            ours = STATE_DIR in entries and (set(entries) <= set(OUR_NAMES) or not self.ledger.is_empty())
            if entries and not run_file.exists() and not ours:
                foreign = sorted(e for e in entries if e not in OUR_NAMES)[:3]
                raise BuildError(f"{out} already holds files synthmed did not write ({', '.join(foreign or entries[:3])}"
                                 f"{', ...' if len(entries) > 3 else ''}); choose an empty or new folder", 2)
        self.created = not out.exists()
        self._refuse_links()  # before the lock file or anything else is written into them
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
                changed = []
                for key in run:
                    old, new = previous.get(key), run[key]
                    if isinstance(old, dict) and isinstance(new, dict):
                        changed += [f"{key}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
                    elif old != new:
                        changed.append(key if key == "spec_hash" else f"{key} {old!r} -> {new!r}")
                if changed:
                    what = "; ".join(changed)
                    raise BuildError(f"{out} was built from a different spec or settings (changed: {what}); "
                                     "rerun with --overwrite to start again", 2)
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
                for rel, sha in _row_files(row):
                    if rel and _inside(self.out, rel) and _file_sha256(self.out / rel) == sha:
                        digests[rel] = sha
            digests[f"{STATE_DIR}/parts/{part.name}"] = _file_sha256(part)
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
        foreign = self.ledger.foreign_files(sorted(p.name for p in self.out.iterdir() if p.name != STATE_DIR))
        blocking = sorted(r for r in [*foreign, *changed] if planned(r))
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
            for folder in (self.ledger.dir, self.parts, self.state, self.out):
                try:
                    folder.rmdir()
                except OSError:
                    pass

    def _lock(self) -> None:
        import fcntl

        try:
            fh = open(self.state / "lock", "a+")
        except OSError as e:
            raise BuildError(f"cannot write to the output folder {self.out}: {e.strerror or e}", 2) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise BuildError(f"another synthmed run is writing to {self.out}; wait for it to finish", 1) from None
        self._lock_fh = fh

    def release(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def claim(self, key: str, rels) -> None:
        """Claim files before writing them; a file there that synthmed did not write stops the run (exit 2)."""
        from .ledger import ForeignFileError

        try:
            self.ledger.claim(key, rels)
        except ForeignFileError as e:
            raise BuildError(f"{e} (in {self.out}); synthmed overwrites only files it wrote. Move "
                             f"{'it' if len(e.rels) == 1 else 'them'} out of the folder and rerun with --resume", 2) \
                from None


def _read_run_record(path: Path) -> dict | None:
    """run.json as a dict, or None when it cannot be read (damaged)."""
    try:
        data = json.loads(path.read_bytes()[:1_000_000])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _inside(out: Path, rel: str) -> bool:
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


def _row_files(row: dict) -> list[tuple[str, str]]:
    """(path, sha256) of every file a manifest row names."""
    pairs = [(row.get(f"{kind}_path", ""), row.get(f"{kind}_sha256", "")) for kind in ("png", "dicom", "sr", "seg")]
    if row.get("mask_paths"):
        pairs += zip(row["mask_paths"].split("|"), row.get("mask_sha256", "").split("|"))
    return [(rel, sha) for rel, sha in pairs if rel]


def _atomic_json(path: Path, data: Any) -> None:
    from .atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------- one case's files

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def _bbox(mask) -> list[int] | None:
    import numpy as np

    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


class _CaseWriter:
    """Turns (case, prompt, image) into files and one manifest row. Pure apart from the writes."""

    def __init__(self, spec: DatasetSpec, out: Path, backend_info, generation: dict):
        from .vocabulary import CHEXPERT_COLUMNS, get_vocabulary

        self.spec, self.out, self.info = spec, out, backend_info
        self.vocab = get_vocabulary()
        self.chexpert = CHEXPERT_COLUMNS
        self.generation = json.dumps(generation, sort_keys=True, separators=(",", ":"))
        self.made_dirs: set[Path] = set()
        self.claimed: set[str] = set()
        self.claim = None  # set by the chunk maker: claims a path no case predicted, before it is written

    def _put(self, rel: str, data: bytes) -> str:
        from .atomic import atomic_write_bytes

        if self.claim is not None and rel not in self.claimed:
            self.claim(rel)
            self.claimed.add(rel)
        path = self.out / rel
        if path.parent not in self.made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.made_dirs.add(path.parent)
        try:
            atomic_write_bytes(path, data)
        except OSError as e:
            raise _WriteFailed(rel, e) from e
        return _sha256(data)

    def write(self, case: "Case", prompt, image: "GeneratedImage") -> dict:
        from .writers.dicom import patient_orientation
        from .writers.png import png_bytes, png_values, to_stored

        spec = self.spec
        h, w = image.pixels.shape
        if (w, h) != (spec.image.width, spec.image.height):
            raise BuildError(f"the backend made a {w}x{h} image for {case.case_id}, but the spec asks for "
                             f"{spec.image.width}x{spec.image.height}")
        stored = to_stored(image.pixels, spec.image.bit_depth)
        row: dict[str, Any] = {c: "" for c in _manifest_columns()}
        stem = f"{case.split}/{case.case_id}"
        if "png" in spec.image.formats:
            rel = f"images/{stem}.png"
            text = {"case_id": case.case_id, "spec_hash": spec.spec_hash, "synthetic": "yes",
                    "Description": f"SYNTHETIC image made by synthmed {__version__}; not a real patient",
                    "prompt": prompt.text}
            png = png_bytes(png_values(stored, spec.image.png_bit_depth), text)
            row["png_path"], row["png_sha256"] = rel, self._put(rel, png)
            row["png_bit_depth"] = spec.image.png_bit_depth
        if "dicom" in spec.image.formats:
            from .writers.dicom import dicom_dataset, part10_bytes
            from .writers.seg import seg_bytes
            from .writers.sr import sr_bytes

            provenance = dict(spec_hash=spec.spec_hash, backend=self.info.name, model_id=self.info.model_id,
                              model_hash=self.info.model_hash, synthmed_version=__version__)
            dataset = dicom_dataset(stored, case, iod=spec.image.dicom_iod,
                                    bits_stored=12 if spec.image.bit_depth == 16 else 8, dataset_name=spec.name,
                                    prompt=prompt.text, geometry=getattr(image, "geometry", None), **provenance)
            rel = f"dicom/{stem}.dcm"
            row["dicom_path"], row["dicom_sha256"] = rel, self._put(rel, part10_bytes(dataset))
            # the labels and masks where imaging pipelines look for them, referencing the image
            rel = f"dicom/{stem}_sr.dcm"
            row["sr_path"], row["sr_sha256"] = rel, self._put(rel, sr_bytes(dataset, case, **provenance))
            if image.masks:
                rel = f"dicom/{stem}_seg.dcm"
                masks = {finding: mask.astype(bool) for finding, mask in image.masks.items()}
                row["seg_path"], row["seg_sha256"] = rel, self._put(rel, seg_bytes(dataset, case, masks, **provenance))
        mask_paths, mask_hashes, boxes = [], [], {}
        for finding, mask in image.masks.items():
            rel = f"masks/{stem}_mask_{finding}.png"
            mask_paths.append(rel)
            # 0/1, not 0/255: label-map readers (TorchIO LabelMap, MONAI, ITK) get the label values themselves
            label = (mask != 0).astype("uint8")
            mask_hashes.append(self._put(rel, png_bytes(label, {"case_id": case.case_id, "finding": finding,
                                                                "values": "0 outside, 1 inside", "synthetic": "yes"})))
            box = _bbox(mask)
            if box:
                boxes[finding] = box
        labels = case.chexpert_labels(self.vocab)
        row.update({
            "file_name": row["png_path"] or row["dicom_path"], "case_id": case.case_id, "index": case.index,
            "split": case.split, "seed": case.seed,
            "findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in case.findings),
            "finding_codes": "|".join(str(self.vocab.findings[f.finding].code) for f in case.findings),
            "location": "|".join(f.location or "" for f in case.findings),
            "severity": "|".join(f.severity or "" for f in case.findings),
            **labels, "sex": case.sex, "age": case.age, "view": case.view,
            "patient_orientation": "\\".join(patient_orientation(case.view, getattr(image, "geometry", None))),
            "width": w, "height": h, "bit_depth": spec.image.bit_depth,
            "prompt": prompt.text, "negative_prompt": prompt.negative, "prompt_template": prompt.template_id,
            "mask_paths": "|".join(mask_paths), "mask_sha256": "|".join(mask_hashes),
            "bboxes": json.dumps(boxes, sort_keys=True, separators=(",", ":")) if boxes else "",
            "cardiothoracic_ratio": (f"{image.measurements['cardiothoracic_ratio']:.4f}"
                                     if "cardiothoracic_ratio" in image.measurements else ""),
            "anatomy_id": getattr(image, "anatomy_id", None) or "",
            "backend": self.info.name, "model_id": self.info.model_id, "model_hash": self.info.model_hash,
            "generation": self.generation, "spec_hash": spec.spec_hash, "synthmed_version": __version__,
        })
        return {k: ("" if v is None else str(v)) for k, v in row.items()}


class _WriteFailed(Exception):
    def __init__(self, rel: str, error: OSError):
        super().__init__(rel)
        self.rel, self.error = rel, error


def _manifest_columns():
    from .writers.manifest import MANIFEST_COLUMNS

    return MANIFEST_COLUMNS


def _part_is_done(out: Path, part: Path, cases: list, spec: DatasetSpec, vocab) -> bool:
    """True when the part lists these cases first, says of each what the plan says, and every file it names
    has its recorded sha256. A part from another spec, or with an edited label, is made again."""
    from .writers.manifest import read_part

    try:
        rows = read_part(part)
    except (OSError, ValueError):
        return False
    if len(rows) < len(cases):
        return False
    for row, case in zip(rows, cases):
        if row != {**row, **_planned_labels(case, spec, vocab)}:
            return False
        for rel, digest in _row_files(row):
            if not _inside(out, rel) or _file_sha256(out / rel) != digest:
                return False
    return True


def _planned_labels(case: "Case", spec: DatasetSpec, vocab) -> dict[str, str]:
    """The manifest columns that say what a case is: a kept row must say exactly this."""
    expected = {
        "case_id": case.case_id, "index": case.index, "split": case.split,
        "seed": "" if case.seed is None else case.seed,
        "findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in case.findings),
        "finding_codes": "|".join(str(vocab.findings[f.finding].code) for f in case.findings),
        "location": "|".join(f.location or "" for f in case.findings),
        "severity": "|".join(f.severity or "" for f in case.findings),
        **case.chexpert_labels(vocab), "sex": case.sex, "age": case.age, "view": case.view,
        "width": spec.image.width, "height": spec.image.height, "bit_depth": spec.image.bit_depth,
        "png_bit_depth": spec.image.png_bit_depth if "png" in spec.image.formats else "", "spec_hash": spec.spec_hash,
    }
    return {k: ("" if v is None else str(v)) for k, v in expected.items()}


# ----------------------------------------------------------------------------- generate

EXECUTORS = ("local", "ray")


def generate(spec: DatasetSpec | str | Path, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             limit: int | None = None, backend: "str | Backend | None" = None, model: str | None = None,
             batch_size: int | None = None, progress: bool = True, executor: str = "local",
             ray_address: str | None = None, workers: int | None = None, gpus_per_worker: float = 0,
             qc: bool | None = None) -> BuildResult:
    """Build the dataset a spec describes into ``out``.

    Args:
        spec: a DatasetSpec, or a path to a spec file.
        out: output folder; new, empty, or one this function wrote before (with ``resume``/``overwrite``).
        resume: finish an interrupted run; files already written are verified by sha256 and kept.
        overwrite: delete what an earlier run wrote in ``out`` and start again.
        limit: build only the first ``limit`` cases (the same ones a full run starts with).
        backend: a backend name (diffusion, phantom, pattern) or a Backend object; default: the spec's.
        model: a model override for the diffusion backend.
        batch_size: images per backend call; never changes any image. Default: the spec's.
        progress: show a progress bar with images/s and ETA.
        executor: ``"local"`` (this process) or ``"ray"`` (the chunks spread over Ray workers, each with its
            own backend; ``out`` must then be a folder every worker can write). Both write the same bytes.
        ray_address: the Ray cluster to join (``executor="ray"``); default: ``RAY_ADDRESS``, else a local Ray.
        workers: Ray workers, one backend each; default: the cluster's CPUs (or GPUs / ``gpus_per_worker``).
        gpus_per_worker: GPUs each Ray worker reserves (fractions share a GPU); 0 for CPU backends.
        qc: run the cheap quality checks at the end (qc_report.json, report.html, the manifest's qc columns);
            default: the spec's ``qc.enabled``. ``result.qc_passed`` says whether every gating check passed.

    Raises:
        BuildError: an expected failure (folder in use, disk full, changed spec, ...), with an exit code.

    Example:
        >>> generate("dataset_specs/pneumonia.yaml", "out/pneumonia", backend="pattern", limit=16)  # doctest: +SKIP
    """
    started = time.perf_counter()
    # 1. Check inputs
    _check_arguments(spec=spec, out=out, resume=resume, overwrite=overwrite, limit=limit, backend=backend,
                     model=model, batch_size=batch_size, progress=progress, qc=qc)
    if not isinstance(spec, DatasetSpec):
        spec = load_spec(spec)
    if resume and overwrite:
        raise BuildError("--resume and --overwrite exclude each other", 2)
    _check_executor(executor, backend, ray_address, workers, gpus_per_worker)
    out = Path(out)
    backend_name = backend if isinstance(backend, str) or backend is None else backend.info.name
    import dataclasses

    from .sampler import SAMPLER_VERSION

    generator = {k: v for k, v in dataclasses.asdict(spec.generator).items() if k != "batch_size"}
    generator["anatomy"] = [a.id for a in spec.generator.anatomy]  # their files' sha256 are in the model hash
    model = None if model is None else os.fspath(model)  # a Path from a notebook is fine
    generator.update(backend=backend_name or spec.generator.backend, model=model or spec.generator.model)
    run = {"format": RUN_FORMAT, "name": spec.name, "spec_hash": spec.spec_hash,
           "backend": generator["backend"], "model": generator["model"], "generator": generator,
           "synthmed_version": __version__, "sampler": SAMPLER_VERSION}
    from .sampler import sample_cases

    cases = sample_cases(spec, limit=limit)
    folder = _RunFolder(out)
    folder.prepare(run, resume=resume, overwrite=overwrite, planned=_planned_paths(spec, cases))
    try:
        # 2. Plan: the chunks still to do
        chunks, todo = _plan(spec, folder, cases, limit=limit, resume=resume)
        todo_set = set(todo)
        reused = sum(stop - start for k, (start, stop) in enumerate(chunks) if k not in todo_set)
        folder.claim("run", ["cases.jsonl"])
        _write_cases_jsonl(out, cases)
        folder.ledger.record_files("run", ["cases.jsonl"])
        made_with = _model_hash_of_parts(folder, [k for k in range(len(chunks)) if k not in todo_set])
        # 3. Backend and chunks (the backend only now: loading a model is the slow part)
        written, interrupted, versions, checked = 0, False, None, {}
        run_qc = spec.qc.enabled if qc is None else qc
        if todo and executor == "ray":
            from .ray_executor import run_chunks_on_ray

            written, versions, checked = run_chunks_on_ray(
                spec, folder, chunks, todo, limit=limit, backend=backend, model=model, batch_size=batch_size,
                progress=progress, address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                qc=run_qc, made_with=made_with)
        elif todo:
            engine = _load_backend(spec, backend, model)
            _check_same_model(out, engine.info.model_hash, made_with)
            maker = _ChunkMaker(spec, out, engine, batch_size)
            written, interrupted = _run_chunks(maker, cases, chunks, todo, progress)
        # 4. Manifest, card
        qc_result = None
        if not interrupted:
            _finish(spec, folder, cases, chunks, run, versions)
            # 5. Quality checks: the cheap ones (the lock is ours already)
            if run_qc:
                qc_result = _run_qc(folder, progress, checked)
        return BuildResult(out=out, total=len(cases), written=written, reused=reused, interrupted=interrupted,
                           seconds=time.perf_counter() - started, qc=qc_result, notes=tuple(folder.notes))
    except _WriteFailed as e:
        raise BuildError(_write_failed_message(out, e)) from None
    except OSError as e:
        raise BuildError(_os_error_message(out, e)) from None
    except Exception:
        if not folder.has_output():  # nothing made (a model that cannot load): leave nothing that blocks a rerun
            folder.forget()
        raise
    finally:
        folder.release()


class BuildArgumentError(BuildError, ValueError):
    """An argument of :func:`generate` has a value it cannot take (exit code 2 on the command line)."""

    def __init__(self, message: str):
        super().__init__(message, 2)


def _check_arguments(*, spec, out, resume, overwrite, limit, backend, model, batch_size, progress, qc) -> None:
    """Refuse wrong argument types and values at the door, naming the argument (the Python API's users)."""
    from .backends import BACKENDS

    def name_of(value) -> str:
        return f"{type(value).__name__} {value!r}"[:120]

    if not isinstance(spec, (DatasetSpec, str, os.PathLike)):
        raise TypeError(f"spec must be a DatasetSpec or the path of a spec file, got {name_of(spec)}")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise TypeError(f"out must be the path of the output folder, got {name_of(out)}")
    for flag, value in (("resume", resume), ("overwrite", overwrite), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {name_of(value)}")
    if qc is not None and not isinstance(qc, bool):
        raise TypeError(f"qc must be True, False or None (the spec's qc.enabled), got {name_of(qc)}")
    for arg, value in (("limit", limit), ("batch_size", batch_size)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be a whole number, got {name_of(value)}")
        if value < 1:
            raise BuildArgumentError(f"{arg} must be at least 1, got {value}")
    if backend is not None and not isinstance(backend, str) and not (hasattr(backend, "generate")
                                                                    and hasattr(backend, "info")):
        raise TypeError(f"backend must be a backend name ({', '.join(BACKENDS)}) or a Backend object, "
                        f"got {name_of(backend)}")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be 'default' or the path of a model folder, got {name_of(model)}")


def _model_hash_of_parts(folder: "_RunFolder", kept: list[int]) -> str | None:
    """The model hash the kept chunks were made with (their first row says it), or None if none is kept."""
    from .writers.manifest import read_part

    for k in kept:
        rows = read_part(_part_path(folder.parts, k))
        if rows:
            return rows[0]["model_hash"]
    return None


def _check_same_model(out: Path, model_hash: str, made_with: str | None) -> None:
    """A resume must not mix two models: the files of the model (or the phantom's version) must be the same."""
    if made_with is not None and made_with != model_hash:
        raise BuildError(f"{out} was partly made by a model with hash {made_with[:12]}, but the model now has hash "
                         f"{model_hash[:12]} (its files changed); restore that model to resume, or rerun with "
                         "--overwrite to start again", 2)


def _run_qc(folder: _RunFolder, progress: bool, checked: dict):
    from .qc.run import QCError, qc

    try:  # qc claims what it writes in the folder's ledger itself
        return qc(folder.out, full=False, lock=False, progress=progress, precomputed=checked)
    except QCError as e:
        raise BuildError(f"the quality checks could not run: {e}", e.exit_code) from None


def _check_executor(executor, backend, ray_address, workers, gpus_per_worker) -> None:
    if executor not in EXECUTORS:
        raise BuildError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}", 2)
    if executor == "local":
        given = [f"{name}={value!r}" for name, value in
                 (("ray_address", ray_address), ("workers", workers), ("gpus_per_worker", gpus_per_worker or None))
                 if value is not None]
        if given:
            raise BuildError(f"{', '.join(given)} only apply to the Ray executor (executor='ray', --executor ray)", 2)
        return
    if backend is not None and not isinstance(backend, str):
        raise BuildError(f"executor='ray' needs a backend name (each worker builds its own), got a "
                         f"{type(backend).__name__} object", 2)
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise BuildError(f"workers must be a whole number of at least 1, got {workers!r}", 2)
    if not isinstance(gpus_per_worker, (int, float)) or gpus_per_worker < 0:
        raise BuildError(f"gpus_per_worker must be 0 or more, got {gpus_per_worker!r}", 2)
    from .ray_executor import require_ray

    require_ray()


def _remedy(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full", "free space and rerun with --resume to finish"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return err.strerror or "permission denied", "make the folder writable and rerun with --resume to finish"
    return err.strerror or str(err), "rerun with --resume to finish"


def _write_failed_message(out: Path, e: "_WriteFailed") -> str:
    reason, remedy = _remedy(e.error)
    return f"could not write {out / e.rel}: {reason}. No partial file was kept; {remedy}"


def _os_error_message(out: Path, e: OSError) -> str:
    reason, remedy = _remedy(e)
    where = f"{e.filename}" if e.filename else str(out)
    return f"could not write {where}: {reason}. {remedy[0].upper()}{remedy[1:]}"


def _part_path(parts: Path, k: int) -> Path:
    return parts / f"part-{k:06d}.csv"


def _planned_paths(spec: DatasetSpec, cases):
    """A test of whether this run writes a path (relative to OUT), without listing every path of a large plan."""
    import re

    ours = {"manifest.csv", "cases.jsonl", "dataset_card.json", "README.md", "qc_report.json", "report.html"}
    ours |= {f"images/{split}/metadata.csv" for split in spec.splits.keys}
    case_file = re.compile(r"(images|dicom|masks)/[^/]+/(case-(\d+))[^/]*$")

    def planned(rel: str) -> bool:
        match = case_file.match(rel)
        if not match:
            return rel in ours
        index = int(match.group(3))
        return index < len(cases) and cases[index].case_id == match.group(2) and \
            rel in _case_paths(spec, cases[index])

    return planned


def _plan(spec: DatasetSpec, folder: _RunFolder, cases, *, limit: int | None, resume: bool):
    """The chunks of ``cases`` as (start, stop), and the indices of the chunks still to do."""
    from .vocabulary import get_vocabulary

    total = len(cases)
    chunks = [(start, min(start + CHUNK_SIZE, total)) for start in range(0, total, CHUNK_SIZE)]
    if resume:
        _refuse_shrinking(spec, folder, cases, chunks, limit)
    vocab = get_vocabulary()
    todo = []
    for k, (start, stop) in enumerate(chunks):
        part = _part_path(folder.parts, k)
        if not (resume and part.exists() and _part_is_done(folder.out, part, [cases[i] for i in range(start, stop)],
                                                           spec, vocab)):
            todo.append(k)
        elif not folder.ledger.read(f"chunk-{k:06d}")["files"]:  # a kept chunk whose claim was lost: its part says
            _record_part(folder, k, part)
    return chunks, todo


def _record_part(folder: _RunFolder, k: int, part: Path) -> None:
    """Record a verified part's files (each checked by sha256) as the chunk's claim."""
    from .writers.manifest import read_part

    digests = {rel: sha for row in read_part(part) for rel, sha in _row_files(row)}
    digests[f"{STATE_DIR}/parts/{part.name}"] = _file_sha256(part)
    folder.ledger.record(f"chunk-{k:06d}", digests)


def _refuse_shrinking(spec: DatasetSpec, folder: _RunFolder, cases, chunks, limit: int | None) -> None:
    """A resume with a smaller --limit would leave images on disk that the manifest does not list."""
    planned = {cases[i].case_id for start, stop in chunks[-1:] for i in range(start, stop)}
    beyond: set[str] = set()
    for key in folder.ledger.keys():
        if not key.startswith("chunk-") or not key[6:].isdigit() or int(key[6:]) < len(chunks) - 1:
            continue
        for rel in folder.ledger.read(key)["files"]:
            if rel.split("/")[0] in ("images", "dicom", "masks") and (folder.out / rel).exists():
                case_id = _case_id_of(rel)
                if case_id not in planned:
                    beyond.add(case_id)
    if beyond:
        raise BuildError(f"{folder.out} holds the images of {len(beyond)} case(s) beyond the {len(cases)} now planned"
                         f"{f' (--limit {limit})' if limit else ''}, made by an earlier run; a resume would leave them "
                         "outside the manifest. Rerun with a larger --limit (or none) to finish them, or with "
                         "--overwrite to build only these cases", 2)


def _case_id_of(rel: str) -> str:
    """The case a file of ours belongs to: ``dicom/train/case-0000001_sr.dcm`` -> ``case-0000001``."""
    name = Path(rel).stem
    for infix in ("_mask_", "_sr", "_seg"):
        name = name.split(infix)[0]
    return name


def _case_paths(spec: DatasetSpec, case: "Case") -> list[str]:
    """Every file a case may have (the masks of all its findings, a SEG), relative to OUT."""
    stem = f"{case.split}/{case.case_id}"
    paths = [f"images/{stem}.png"] if "png" in spec.image.formats else []
    if "dicom" in spec.image.formats:
        paths += [f"dicom/{stem}.dcm", f"dicom/{stem}_sr.dcm", f"dicom/{stem}_seg.dcm"]
    paths += [f"masks/{stem}_mask_{f.finding}.png" for f in case.findings]
    return paths


def _load_backend(spec: DatasetSpec, backend: "str | Backend | None", model: str | None) -> "Backend":
    from .backends import BackendUnavailable, create_backend

    if backend is not None and not isinstance(backend, str):
        return backend
    try:
        return create_backend(spec, backend=backend, model=model)
    except BackendUnavailable as e:
        raise BuildError(str(e), 2) from None


class _ChunkMaker:
    """Makes whole chunks: prompts -> backend -> files -> the chunk's manifest part, written last and atomically.

    Both executors use it: the local one in this process, the Ray one once per worker. Files are
    written by a background thread while the backend makes the next batch.
    """

    def __init__(self, spec: DatasetSpec, out: Path, engine: "Backend", batch_size: int | None):
        from .prompts import build_prompt

        self.spec, self.engine, self._build_prompt = spec, engine, build_prompt
        self.folder = _RunFolder(out)  # its ledger: each chunk's files are claimed before they are written
        generation = {"backend": engine.info.name, **dict(engine.info.settings)}
        self.writer = _CaseWriter(spec, out, engine.info, generation)
        self.parts = out / STATE_DIR / "parts"
        batch = batch_size or spec.generator.batch_size
        multiple = getattr(engine, "micro_batch", 1)  # a backend that runs fixed micro-batches wastes no padding
        self.batch = -(-batch // multiple) * multiple
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthmed-writer")
        self.reject = _Rejecter(spec)

    def make(self, k: int, cases: list, *, stop: threading.Event | None = None, on_batch=None) -> int:
        """Write chunk ``k`` (its ``cases``); returns the images written. The part is written only if all were."""
        from .writers.manifest import write_part

        key = f"chunk-{k:06d}"
        part = _part_path(self.parts, k)
        planned = [p for c in cases for p in _case_paths(self.spec, c)]
        # files an earlier plan of this chunk made (another split, other findings) are ours and stale
        stale = set(self.folder.ledger.read(key)["files"]) - set(planned) - {f"{STATE_DIR}/parts/{part.name}"}
        if stale:
            self.folder.ledger.remove(key, sorted(stale))
        self.folder.claim(key, planned + [f"{STATE_DIR}/parts/{part.name}"])
        self.writer.claimed = set(planned)
        self.writer.claim = lambda rel: self.folder.claim(key, [rel])  # a file no case predicted (a backend's extra mask)
        pending: list[Future] = []
        for b0 in range(0, len(cases), self.batch):
            if stop is not None and stop.is_set():
                break
            batch_cases = cases[b0:b0 + self.batch]
            prompts = [self._build_prompt(c, self.spec.prompt, self.writer.vocab) for c in batch_cases]
            images = self.engine.generate(batch_cases, prompts)
            if len(images) != len(batch_cases):
                raise BuildError(f"the backend returned {len(images)} images for {len(batch_cases)} cases")
            made_from, tries = self.reject.apply(self.engine, batch_cases, prompts, images)
            pending += [self.pool.submit(self._write, c, used, p, im, t)
                        for c, used, p, im, t in zip(batch_cases, made_from, prompts, images, tries)]
            if on_batch is not None:
                on_batch(len(batch_cases))
        rows = [f.result() for f in pending]
        if len(rows) == len(cases):  # interrupted inside this chunk: no part, --resume redoes it
            digests = {rel: sha for row in rows for rel, sha in _row_files(row)}
            # a planned file this run did not make (a SEG or mask of a finding the case no longer has, under a
            # re-planned chunk) is an earlier run's: the claim above checked it is ours and unchanged
            leftover = [rel for rel in planned if rel not in digests and (self.folder.out / rel).exists()]
            if leftover:
                self.folder.ledger.remove(key, leftover)
            write_part(part, rows)
            digests[f"{STATE_DIR}/parts/{part.name}"] = _file_sha256(part)
            self.folder.ledger.record(key, digests)
        return len(rows)

    def _write(self, case: "Case", used: "Case", prompt, image: "GeneratedImage", tries: int) -> dict:
        """Write one image made from ``used`` (the case, or it with a regeneration's seed) as ``case``'s row."""
        import numpy as np

        if not np.isfinite(image.pixels).all():
            again = f" and on {tries} regeneration(s)" if tries else ""
            raise BuildError(f"the backend made an image with NaN or infinite pixels for {case.case_id}{again}; "
                             "set qc.reject.max_tries in the spec to regenerate such images")
        row = self.writer.write(used, prompt, image)
        row["seed"] = "" if case.seed is None else str(case.seed)
        row["qc_tries"] = str(tries)
        row["qc_seed"] = "" if used.seed is None else str(used.seed)
        return row

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _Rejecter:
    """Reject-and-regenerate: remake images failing a gating pixel check, each try from a derived seed."""

    def __init__(self, spec: DatasetSpec):
        from .qc.checks import PixelLimits
        from .qc.run import generated_checks

        qc = spec.qc
        self.checks = generated_checks(qc.gate) if qc.enabled and qc.reject.max_tries > 0 else ()
        self.max_tries = qc.reject.max_tries
        self.limits = PixelLimits(min_dynamic_range=qc.thresholds.min_dynamic_range,
                                  max_saturated_fraction=qc.thresholds.max_saturated_fraction,
                                  max_black_fraction=qc.thresholds.max_black_fraction)
        self.size = (spec.image.width, spec.image.height, spec.image.bit_depth)
        # qc judges a PNG's values where there is one (what loaders read), else the DICOM's stored values
        self.png_depth = spec.image.png_bit_depth if "png" in spec.image.formats else None

    def failing(self, image: "GeneratedImage") -> bool:
        from .qc.checks import check_generated

        width, height, depth = self.size
        flags = check_generated(image.pixels, width=width, height=height, bit_depth=depth,
                                png_bit_depth=self.png_depth, limits=self.limits)
        return any(f in self.checks for f in flags)

    def apply(self, engine: "Backend", cases: list, prompts: list, images: list) -> tuple[list, list[int]]:
        """Regenerate in place the images that fail; returns the case each image was made from and its tries."""
        import dataclasses

        made_from, tries = list(cases), [0] * len(cases)
        if not self.checks:
            return made_from, tries
        todo = [i for i, image in enumerate(images) if self.failing(image)]
        for attempt in range(1, self.max_tries + 1):
            if not todo:
                break
            retry = [dataclasses.replace(cases[i], seed=derive_retry_seed(cases[i].seed, attempt, cases[i].case_id))
                     for i in todo]
            remade = engine.generate(retry, [prompts[i] for i in todo])
            if len(remade) != len(retry):
                raise BuildError(f"the backend returned {len(remade)} images for {len(retry)} cases")
            for i, case, image in zip(todo, retry, remade):
                images[i], made_from[i], tries[i] = image, case, attempt
            todo = [i for i in todo if self.failing(images[i])]
        return made_from, tries


def _run_chunks(maker: _ChunkMaker, cases, chunks, todo, progress) -> tuple[int, bool]:
    """The local executor: make the chunks in ``todo`` in this process; Ctrl-C stops after the current batch."""
    stop_requested = threading.Event()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            if stop_requested.is_set():
                raise KeyboardInterrupt
            stop_requested.set()
            print("\nstopping after the current batch (Ctrl-C again to stop now)...", file=sys.stderr)

        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    bar = _progress(sum(chunks[k][1] - chunks[k][0] for k in todo), progress)
    written = 0
    try:
        for k in todo:
            start, stop = chunks[k]
            made = maker.make(k, [cases[i] for i in range(start, stop)], stop=stop_requested, on_batch=bar.update)
            written += made
            if made < stop - start:
                return written, True
            if stop_requested.is_set():
                return written, k != todo[-1]
        return written, False
    finally:
        maker.close()
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)


def _finish(spec: DatasetSpec, folder: _RunFolder, cases, chunks, run: dict, versions: dict | None) -> None:
    """Merge the parts into manifest.csv, then the split metadata and the card (the same for every executor)."""
    from .writers.manifest import merge_parts, write_split_metadata

    out = folder.out
    ours = ["manifest.csv", "dataset_card.json", "README.md"]
    if "png" in spec.image.formats:
        ours += [f"images/{split}/metadata.csv" for split in spec.splits.keys]
    stale = [rel for key in ("run", "qc") for rel in folder.ledger.read(key)["files"]
             if rel.startswith("images/") and rel.endswith("/metadata.csv") and rel not in ours]
    for key in ("run", "qc"):  # a split the spec no longer has: its metadata would list images that are gone
        folder.ledger.remove(key, stale)
    folder.claim("run", ours)
    merge_parts([(_part_path(folder.parts, k), stop - start) for k, (start, stop) in enumerate(chunks)],
                out / "manifest.csv")
    write_split_metadata(out / "manifest.csv", out)
    _write_card(spec, out, cases, run, versions)
    folder.ledger.record_files("run", ours)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled or None, dynamic_ncols=True, file=sys.stderr)


def _write_cases_jsonl(out: Path, cases) -> None:
    from .atomic import atomic_write_text_lines

    atomic_write_text_lines(out / "cases.jsonl", cases.iter_jsonl())


def _software_versions(spec: DatasetSpec, backend: str) -> dict[str, str]:
    """Versions of the software that makes a run's files here: decided by the spec and backend, not by what
    this process happens to have imported (so that every executor writes the same card)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    used = [("PIL", "Pillow")]  # it writes the PNGs and masks: its zlib decides their bytes
    if "dicom" in spec.image.formats:
        used += [("pydicom", "pydicom"), ("highdicom", "highdicom")]
    if backend == "diffusion":
        used += [("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers")]
    versions = {"synthmed": __version__, "python": platform.python_version(), "numpy": numpy.__version__}
    for module, dist in used:
        try:
            versions[module] = getattr(sys.modules.get(module), "__version__", None) or version(dist)
        except PackageNotFoundError:
            pass
    return versions


def _write_card(spec: DatasetSpec, out: Path, cases, run: dict, worker_versions: dict | None = None) -> None:
    """dataset_card.json and a short README.md: what this set is, where it came from, how it may be used.

    ``worker_versions``: the software versions of the processes that made the images, where that was not this one.
    """
    from .atomic import atomic_write_bytes

    versions = {**_software_versions(spec, run["backend"]), **(worker_versions or {})}
    counts = cases.counts()
    anatomy = {}
    if run["backend"] == "drr":  # where the CT the films are projected from comes from
        from .backends.drr import anatomy_card

        anatomy["anatomy"] = anatomy_card(spec.generator.anatomy)
    card = {
        "name": spec.name, "description": spec.description, "synthetic": True, "intended_use": INTENDED_USE,
        "output_format": run["format"],
        "count": len(cases), "spec_hash": spec.spec_hash, "spec": spec.to_dict(),
        "backend": {"name": run["backend"], "model": run["model"]},
        "counts": [{k: v for k, v in r.items() if k != "target"} | {"target": round(r["target"], 6)} for r in counts],
        "software": versions,
        **anatomy,
        "files": {"manifest": "manifest.csv", "metadata": "images/<split>/metadata.csv", "cases": "cases.jsonl",
                  "images": "images/<split>/<case_id>.png", "dicom": "dicom/<split>/<case_id>.dcm",
                  "sr": "dicom/<split>/<case_id>_sr.dcm", "seg": "dicom/<split>/<case_id>_seg.dcm",
                  "masks": "masks/<split>/<case_id>_mask_<finding>.png",
                  "manifest_columns": "https://github.com/synthmed/synthmed/blob/main/schemas/manifest_columns.json"},
    }
    # in the spec's own order: a spec read back from the card must plan the same cases (split order matters)
    atomic_write_bytes(out / "dataset_card.json",
                       (json.dumps(card, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    splits = ", ".join(f"{s} {sum(r[s] for r in counts):,}" for s in spec.splits.keys)
    readme = (f"# {spec.name}\n\nSYNTHETIC chest X-ray dataset made by synthmed {__version__}: {len(cases):,} images "
              f"({splits}).\nNo image shows a real patient. Intended use: {INTENDED_USE}.\n\n"
              f"- `manifest.csv`: one row per image: what it shows (findings, location, severity, the 14 CheXpert "
              f"columns), patient, view, prompt, seed, file paths and sha256.\n"
              f"- `dataset_card.json`: the spec (sha256 {spec.spec_hash[:12]}), counts per cell, software versions.\n"
              + (f"- `images/<split>/`: {spec.image.png_bit_depth}-bit grayscale PNGs"
                 + (" (the DICOM files keep 12 bits)" if spec.image.png_bit_depth == 8 and spec.image.bit_depth == 16
                    and "dicom" in spec.image.formats else "") + ".\n"
                 if "png" in spec.image.formats else "")
              + ("- `dicom/<split>/`: per image the DICOM image, `<case_id>_sr.dcm` (its findings, coded: a DICOM SR, "
                 "TID 1500) and, where there are masks, `<case_id>_seg.dcm` (a DICOM SEG); all one study.\n"
                 if "dicom" in spec.image.formats else "") +
              "- Load with Hugging Face: `datasets.load_dataset('imagefolder', data_dir='.')`.\n")
    if "anatomy" in card:
        readme += f"\n{card['anatomy']['images']}\nAnatomy: {card['anatomy']['source']} (`dataset_card.json`, " \
                  "`anatomy`, has the sha256 of every file).\n"
    atomic_write_bytes(out / "README.md", readme.encode("utf-8"))

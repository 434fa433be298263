"""qc(): read an output folder, run every check, write qc_report.json and report.html, fill the manifest.

The per-image checks read each file once (:func:`synthmed.qc.checks.check_row`); everything
set-level works from what that pass kept: histogram figures, region means, 32 x 32 thumbnails,
a few images per finding cell, and features when a feature extractor is at hand.

Set-level checks:

- ``spec_fidelity``: per attribute (finding, location, severity, sex, view, split, age band) and
  per pair, TVD + chi-square + a 0-1 score (``1 - TVD``) against the spec's distribution.
- ``duplicates``: a residual dHash (the 32 x 32 thumbnail minus the set's mean thumbnail, so the
  anatomy every chest film shares does not make all images alike) finds candidate pairs, which
  count when their residuals' cosine is high too; and pairs of centred embeddings with a high cosine.
- ``diversity``: mean MS-SSIM among images of one finding cell (RoentGen's intra-prompt MS-SSIM;
  the prompt itself also varies with age, sex and view).
- ``intensity``: region means and histogram quantiles within mean ± k·σ of a reference set
  (MAISI's per-organ check; fixed lung and mediastinum boxes stand in for organ masks).
- ``fid``, ``kid``, ``precision``, ``recall``, ``coverage``: against a reference manifest's images.
- ``label_fidelity`` and an IS-style figure: from the auditor's class probabilities.
- ``memorisation``: nearest training images, from a training manifest.
- ``manifest_consistency``: every row says what ``cases.jsonl`` (the build's plan) says of its case, and what the
  spec allows (splits, sexes, views, ages, finding cells, image size, spec hash).

What qc reads and writes (docs/safety.md): every path a manifest names must stay inside the output folder
(refused, with its row, before anything is read); images are decoded within the limits of
:mod:`synthmed.qc.checks`. qc writes qc_report.json, report.html, the manifest's qc columns and the split
metadata.csv files only where synthmed's record (:mod:`synthmed.ledger`) says they are synthmed's, or where
no file is; in a folder it cannot write it still reports (to stdout, or to ``report_dir``).

Example:
    >>> result = qc("out/pneumonia")  # doctest: +SKIP
    >>> result.passed, result.report_path.name  # doctest: +SKIP
    (True, 'qc_report.json')
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from .. import __version__
from .report import MAX_FAILURE_THUMBS
from .checks import (CHECKS, GENERATED_CHECKS, PER_IMAGE_CHECKS, Expected, ImageResult, PixelLimits, box_downsample,
                     check_row, decode_dicom, decode_png, dciodvfy_sample, pixel_stats, region_means, stored_values,
                     REGION_SIDE, REGIONS)

REPORT_FORMAT = 1
REPORT_JSON = "qc_report.json"
REPORT_HTML = "report.html"
DIVERSITY_PER_GROUP = 6      # images per finding cell for MS-SSIM: 15 pairs
DIVERSITY_SIDE = 128         # MS-SSIM on images no larger than this (4 scales)
DISPLAY_SIDE = 96            # thumbnails in report.html
FEATURE_BATCH = 32
SET_CHECKS = ("intensity", "dciodvfy", "manifest_consistency", "spec_fidelity", "duplicates", "diversity", "fid", "kid",
              "precision", "recall", "coverage", "label_fidelity", "memorisation")
STATE_DIR = ".synthmed"
LEDGER_KEY = "qc"
MAX_PROBLEMS = 50            # manifest_consistency lists this many rows in the report
# The shipped auditors judge sets whose images look like the films they were trained on: (backend, model id)
SHIPPED_AUDITOR_DOMAIN = (("phantom", None), ("diffusion", "synthmed-default"))
# The drr auditor gives no verdict yet: trained mostly on one finding per film, it reads films with several (a device
# and a disease) poorly: 0.92 of its own held-out films exactly, 0.41 of dataset_specs/icu_drr.yaml's first 64
SHIPPED_AUDITOR_DOMAINS = {"phantom": SHIPPED_AUDITOR_DOMAIN, "drr": (("drr", None),)}
NO_VERDICT_YET = {"drr": ("the shipped drr auditor gives no verdict yet: trained mostly on one finding per film, it "
                          "misses one of several findings on a film (a device beside a disease) too often; its score "
                          "is reported only")}
# Label fidelity gives a verdict from this many images up: the shipped model reads 0.69 of 64 pneumonia-spec
# films exactly (0.89 of 240 evaluation cases), so with fewer the sampling spread (±0.17 at 30) is the verdict
LABEL_FIDELITY_MIN_IMAGES = 30
# A shipped auditor judges a set only if it detects each of the set's findings in this share of its held-out films
MIN_READ_SENSITIVITY = 0.8
ALL_CHECKS = PER_IMAGE_CHECKS + tuple(c for c in SET_CHECKS if c not in PER_IMAGE_CHECKS)


class QCError(RuntimeError):
    """An expected failure of ``qc`` (not an output folder, a missing reference), with the CLI's exit code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


try:  # the auditor module defines the protocol; a checkout without it still runs every other check
    from .auditor import FeatureExtractor
except ImportError:  # pragma: no cover
    class FeatureExtractor(Protocol):  # type: ignore[no-redef]
        """Anything with a ``name`` that maps float32 images [N, H, W] in [0, 1] to features [N, D]."""

        name: str

        def __call__(self, images) -> np.ndarray: ...


@dataclass(frozen=True)
class QCResult:
    """What :func:`qc` found: the verdict, the report, and the images it flagged."""

    out: Path
    passed: bool
    report: dict
    failed_checks: tuple[str, ...]          # gating checks that failed
    flagged: dict[str, tuple[str, ...]]     # case_id -> checks it failed
    report_path: Path | None
    html_path: Path | None
    seconds: float
    per_image_seconds: float                # the per-image pass alone (reads, decodes, checks)
    not_written: tuple[str, ...] = ()       # files qc left alone, each with why (not ours, a read-only folder)

    @property
    def images_checked(self) -> int:
        return int(self.report["images"]["checked"])


# ----------------------------------------------------------------------------- inputs

def _read_manifest(out: Path) -> list[dict]:
    from ..writers.manifest import read_part

    path = out / "manifest.csv"
    try:
        rows = read_part(path)
    except FileNotFoundError:
        raise _no_manifest(out) from None
    except (OSError, ValueError, csv.Error) as e:
        raise QCError(f"{path} is not a manifest this synthmed version reads: {e}") from None
    if not rows:
        raise QCError(f"{path} has no rows: there is no image to check (a manifest of header only)")
    return rows


def _no_manifest(out: Path) -> QCError:
    """Why a folder has no manifest.csv: a generate writing it now, an unfinished build, or not ours at all."""
    state = out / STATE_DIR
    if _lock_is_held(state / "lock"):
        return QCError(f"another synthmed run is writing to {out} (its manifest.csv is not written yet); "
                       "wait for it to finish", 1)
    if (state / "run.json").is_file():
        return QCError(f"{out} holds an unfinished synthmed build (no manifest.csv yet); finish it with "
                       f"`synthmed generate SPEC -o {out} --resume`, then run qc")
    return QCError(f"{out} is not a synthmed output folder: it has no manifest.csv")


def _lock_is_held(path: Path) -> bool:
    """Whether another process holds a run lock (probed without creating or writing the file)."""
    import fcntl

    try:
        fh = open(path, "rb")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
    return False


def _check_paths(out: Path, rows: list[dict]) -> None:
    """Every file a manifest names must lie inside ``out``, by its words and after links; else QCError with the rows."""
    from .checks import inside_folder

    base = out.resolve()
    folders: dict[str, bool] = {}
    bad = []
    for n, row in enumerate(rows, start=1):
        named = [(c, row.get(c) or "") for c in ("file_name", "png_path", "dicom_path", "sr_path", "seg_path")]
        named += [("mask_paths", rel) for rel in (row.get("mask_paths") or "").split("|")]
        for column, rel in named:
            if not rel:
                continue
            ok = inside_folder(rel)
            if ok:
                parent = str(Path(rel).parent)
                if parent not in folders:
                    folders[parent] = (out / parent).resolve().is_relative_to(base)
                path = out / rel
                ok = folders[parent] and (not path.is_symlink() or path.resolve().is_relative_to(base))
            if not ok:
                bad.append(f"row {n} ({row.get('case_id') or '?'}) {column} {rel!r}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise QCError(f"{out / 'manifest.csv'} names files outside {out} (qc reads and writes only inside it, and "
                      f"follows no link out of it): {shown}")


def _load_spec(out: Path):
    from ..spec import SpecError, load_spec

    card_path = out / "dataset_card.json"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        return load_spec(card["spec"], source=str(card_path), check_files=False)  # its CTs may be elsewhere now
    except FileNotFoundError:
        raise QCError(f"{out} is not a synthmed output folder: it has no dataset_card.json") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QCError(f"{card_path} does not hold a readable spec: {e}") from None
    except SpecError as e:
        raise QCError(f"{card_path}: its spec does not validate:\n{e}") from None


def _read_cases(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """cases.jsonl by case id (the plan the build wrote), or (None, why not)."""
    from ..sampler import Case

    path = out / "cases.jsonl"
    cases: dict[str, Any] = {}
    n = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    case = Case.from_dict(json.loads(line))
                    cases[case.case_id] = case
    except FileNotFoundError:
        return None, "cases.jsonl is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"cases.jsonl line {n} does not read as a case ({type(e).__name__}: {e})"
    return cases, None


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


# ----------------------------------------------------------------------------- the auditor and features

def shipped_films(rows: Sequence[Mapping[str, str]]) -> str:
    """Which shipped auditor reads these images: ``drr`` where most rows come from the drr backend, else ``phantom``."""
    drr = sum(1 for r in rows if (r.get("backend") or "") == "drr")
    return "drr" if rows and 2 * drr > len(rows) else "phantom"


def _load_auditor(auditor, films: str = "phantom") -> tuple[Any, str | None]:
    """(auditor or None, why not). ``auditor``: True (the shipped one for ``films``), False, or an Auditor object."""
    if auditor is False or auditor is None:
        return None, "not requested"
    if auditor is not True:
        return auditor, None
    try:
        from .auditor import Auditor, shipped_auditor_dir  # written separately; absent in older checkouts
    except (ImportError, AttributeError) as e:
        return None, f"the auditor module is not available ({type(e).__name__}: {e})"
    try:
        return Auditor.load(shipped_auditor_dir(films)), None
    except Exception as e:  # no shipped weights, a broken file: the sections are skipped, qc goes on
        return None, f"the auditor could not be loaded ({type(e).__name__}: {e})"


def auditor_applies(rows: Sequence[Mapping[str, str]], auditor, shipped: bool,
                    n_read: int | None = None, films: str = "phantom") -> tuple[bool, str | None]:
    """Whether label fidelity may give a verdict on these images: (applies, why not).

    An auditor the caller brings applies (they chose it for their images). A shipped one was trained on
    256 x 256 films of one kind (``films``): the phantom auditor judges sets of the phantom backend and of the
    shipped default model, the drr auditor sets of the drr backend, at its input size or larger; on other
    images its score is a figure to look at, not a verdict. Either way a verdict needs
    :data:`LABEL_FIDELITY_MIN_IMAGES` images read (``n_read``).
    """
    if n_read is not None and n_read < LABEL_FIDELITY_MIN_IMAGES:
        return False, (f"{n_read} image(s) read: too few for a verdict (at least {LABEL_FIDELITY_MIN_IMAGES}); "
                       "the score is reported only")
    if not shipped:
        return True, None
    if films in NO_VERDICT_YET:
        return False, NO_VERDICT_YET[films]
    made_by = {(r.get("backend") or "?", r.get("model_id") or None) for r in rows}
    domain = {backend: model for backend, model in SHIPPED_AUDITOR_DOMAINS[films]}
    foreign = sorted(f"{b}" + (f" ({m})" if m else "") for b, m in made_by
                     if b not in domain or (domain[b] is not None and m != domain[b]))
    if foreign:
        judged = ("sets of the phantom backend and the shipped default model" if films == "phantom"
                  else "sets of the drr backend")
        return False, (f"the shipped auditor was trained on {films} films; it gives a verdict on {judged}, "
                       f"not on {', '.join(foreign)} images (its score is reported only)")
    config = getattr(auditor, "config", None)
    side = config.get("input_size") if isinstance(config, Mapping) else None
    sizes = {(r.get("width") or "", r.get("height") or "") for r in rows}
    small = [f"{w}x{h}" for w, h in sizes if side and w.isdigit() and h.isdigit() and min(int(w), int(h)) < side]
    if small:
        return False, (f"the shipped auditor reads {side}x{side} films; these are {', '.join(sorted(small))} "
                       "(its score is reported only)")
    missed = _findings_it_misses(rows, config)
    if missed:
        return False, (f"the shipped auditor reads {', '.join(missed)} on too few of its own held-out films to "
                       f"judge them (sensitivity below {MIN_READ_SENSITIVITY}, see its card); this set has them, so "
                       "its score is reported only")
    return True, None


def _findings_it_misses(rows: Sequence[Mapping[str, str]], config) -> list[str]:
    """The set's labelled findings that the auditor's card says it detects in under MIN_READ_SENSITIVITY of its
    held-out films, each with that figure (a score on them would judge the auditor, not the set)."""
    training = config.get("training") if isinstance(config, Mapping) else None
    val = training.get("val") if isinstance(training, Mapping) else None
    sensitivity = val.get("finding_sensitivity") if isinstance(val, Mapping) else None
    if not isinstance(sensitivity, Mapping):
        return []
    from .auditor import labels_of

    labelled = {finding for r in rows if r.get("findings") for finding, _, _ in labels_of(r["findings"])}
    return [f"{name} ({sensitivity[name]:.2f})" for name in sorted(labelled)
            if isinstance(sensitivity.get(name), (int, float)) and sensitivity[name] < MIN_READ_SENSITIVITY]


class _AuditorEmbedding:
    """The auditor's embedding as a FeatureExtractor (the default one)."""

    def __init__(self, auditor):
        self.auditor = auditor
        self.name = f"auditor:{getattr(auditor, 'name', None) or getattr(auditor, 'model_id', None) or 'shipped'}"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.auditor.embed(images), dtype=np.float64)


def _concat_predictions(parts: list):
    """Join per-batch AuditorPredictions: array fields are concatenated, the others taken from the first."""
    import dataclasses

    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if hasattr(type(first), "concatenate"):
        return type(first).concatenate(parts)
    if dataclasses.is_dataclass(first):
        values = {}
        for f in dataclasses.fields(first):
            value = getattr(first, f.name)
            if isinstance(value, np.ndarray) and value.ndim >= 1:
                values[f.name] = np.concatenate([getattr(p, f.name) for p in parts], axis=0)
            else:
                values[f.name] = value
        return dataclasses.replace(first, **values)
    raise TypeError(f"cannot join {type(first).__name__} predictions of several batches")


class _Batcher:
    """Collects images into batches for the feature extractor and the auditor's predict."""

    def __init__(self, shape: tuple[int, int], extractor=None, auditor=None, batch: int = FEATURE_BATCH):
        self.shape, self.extractor, self.auditor, self.batch = shape, extractor, auditor, batch
        self.ids: list[str] = []
        self.pending: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.predictions: list = []
        self.errors: dict[str, str] = {}
        self.seconds = 0.0

    @property
    def active(self) -> bool:
        return self.extractor is not None or self.auditor is not None

    def add(self, case_id: str, pixels: np.ndarray) -> None:
        if not self.active:
            return
        if pixels.shape != self.shape:
            pixels = box_downsample(pixels, *self.shape) if pixels.shape[0] >= self.shape[0] else _resize(pixels, self.shape)
        self.ids.append(case_id)
        self.pending.append(pixels.astype(np.float32, copy=False))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        started = time.perf_counter()
        images = np.stack(self.pending)
        self.pending = []
        if self.extractor is not None and "features" not in self.errors:
            try:
                self.features.append(np.asarray(self.extractor(images), dtype=np.float64))
            except Exception as e:  # a user's extractor: report, never crash the checks
                self.errors["features"] = f"{type(e).__name__}: {e}"
        if self.auditor is not None and "auditor" not in self.errors:
            try:
                self.predictions.append(self.auditor.predict(images))
            except Exception as e:
                self.errors["auditor"] = f"{type(e).__name__}: {e}"
        self.seconds += time.perf_counter() - started

    def feature_matrix(self) -> np.ndarray | None:
        if "features" in self.errors or not self.features:
            return None
        return np.concatenate(self.features, axis=0)

    def prediction(self):
        if "auditor" in self.errors or not self.predictions:
            return None
        try:
            return _concat_predictions(self.predictions)
        except Exception as e:
            self.errors["auditor"] = f"{type(e).__name__}: {e}"
            return None


def _resize(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
                      .resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def _import_extractor(text: str):
    """``module:attribute`` -> a FeatureExtractor (the attribute itself, or what calling it with no argument gives)."""
    import importlib

    module_name, _, attribute = text.partition(":")
    if not module_name or not attribute:
        raise QCError(f"a feature extractor is given as module:attribute, got {text!r}")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise QCError(f"cannot import the feature extractor {text!r}: {e}") from None
    if isinstance(target, type) or not hasattr(target, "name"):
        target = target()
    if not callable(target):
        raise QCError(f"the feature extractor {text!r} is not callable")
    return target


# ----------------------------------------------------------------------------- other image sets

@dataclass
class _ImageSet:
    """A reference or training set, read once: stats, region means, features, thumbnails."""

    ids: list[str] = field(default_factory=list)
    features: np.ndarray | None = None
    features_error: str | None = None
    stats: list = field(default_factory=list)
    regions: list[dict[str, float]] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def _image_path_column(rows: list[dict]) -> str | None:
    for column in ("png_path", "file_name", "path", "image", "dicom_path"):
        if rows and column in rows[0]:
            return column
    return None


def _read_any_image(path: Path) -> tuple[np.ndarray, int] | None:
    """(stored integer pixels, full scale) of a PNG, DICOM or any Pillow-readable image; None if unreadable.

    The limits of :mod:`synthmed.qc.checks` hold here too: a file or a declared size beyond them is unreadable.
    """
    from .checks import check_declared_size, read_limited

    try:
        data = read_limited(path)
    except (OSError, ValueError):
        return None
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return stored_values(*decode_png(data))
        if path.suffix.lower() in (".dcm", ".dicom") or data[128:132] == b"DICM":
            dicom = decode_dicom(data)
            full = (1 << dicom.bits_stored) - 1
            pixels = np.clip(dicom.pixels, 0, full)
            return pixels.astype(np.uint16 if full > 255 else np.uint8), full
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            check_declared_size(im.format or "image", im.width, im.height, 32 * len(im.getbands()))
            return np.asarray(im.convert("L")), 255
    except Exception:
        return None


def _read_image_set(manifest: Path, shape: tuple[int, int], extractor, *, keep_thumbs: bool) -> _ImageSet:
    """Read every image a manifest (CSV with png_path / file_name / path) lists, relative to its folder."""
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise QCError(f"cannot read the manifest {manifest}: {e}") from None
    column = _image_path_column(rows)
    if column is None:
        raise QCError(f"{manifest} lists no images: it needs a png_path, file_name, path or dicom_path column")
    found = _ImageSet()
    batcher = _Batcher(shape, extractor=extractor)
    for n, row in enumerate(rows):
        rel = row.get(column) or row.get("dicom_path") or ""
        image_id = row.get("case_id") or rel or str(n)
        read = _read_any_image(manifest.parent / rel) if rel else None
        if read is None:
            found.unreadable.append(image_id)
            continue
        stored, full = read
        pixels = stored.astype(np.float32) * np.float32(1.0 / full)
        found.ids.append(image_id)
        found.stats.append(pixel_stats(stored, full))
        found.regions.append(region_means(box_downsample(pixels, REGION_SIDE)))
        if keep_thumbs:
            found.thumbs.append(box_downsample(pixels, REGION_SIDE))
        batcher.add(image_id, pixels)
    batcher.flush()
    found.features = batcher.feature_matrix()
    found.features_error = batcher.errors.get("features")
    if not found.ids:
        raise QCError(f"none of the {len(rows)} images {manifest} lists could be read")
    return found


# ----------------------------------------------------------------------------- spec fidelity

def _labels_of(findings_field: str) -> tuple[str, str, str]:
    """(finding, location, severity) labels of a manifest row, as the sampler's Cell names them."""
    parts = [p.split(":") for p in findings_field.split("|") if p]
    finding = "+".join(p[0] for p in parts) or "-"
    location = "/".join(dict.fromkeys(p[1] for p in parts if len(p) > 1 and p[1])) or "-"
    severity = "/".join(dict.fromkeys(p[2] for p in parts if len(p) > 2 and p[2])) or "-"
    return finding, location, severity


def _age_band(age: int) -> str:
    low = (int(age) // 10) * 10
    return f"{low}-{low + 9}"


def _age_band_probs(age_spec) -> dict[str, float]:
    """Probability of each 10-year band under the spec's age distribution, by the sampler's own inverse CDF."""
    from ..sampler import _age_from_uniform

    grid = (np.arange(200_000, dtype=np.float64) + 0.5) / 200_000  # midpoints: exact to 5e-6 per band
    values, freq = np.unique(_age_from_uniform(age_spec, grid).astype(np.int64), return_counts=True)
    probs: dict[str, float] = {}
    for value, f in zip(values.tolist(), freq.tolist()):
        band = _age_band(value)
        probs[band] = probs.get(band, 0.0) + f / grid.size
    return probs


ATTRIBUTES = ("finding", "location", "severity", "sex", "view", "split", "age")
PAIRS = (("finding", "location"), ("finding", "severity"), ("finding", "location", "severity"),
         ("finding", "split"), ("finding", "sex"), ("finding", "view"), ("sex", "view"))


def expected_distributions(spec) -> tuple[dict[str, dict], dict[tuple, dict]]:
    """The spec's distribution of every attribute and of every pair in :data:`PAIRS`."""
    from ..sampler import enumerate_cells

    cells = enumerate_cells(spec.findings)
    marginal: dict[str, dict] = {name: {} for name in ATTRIBUTES}
    joint_cell: dict[tuple, float] = {}
    for cell in cells:
        key = (cell.finding, cell.location, cell.severity)
        joint_cell[key] = joint_cell.get(key, 0.0) + cell.prob
        for name, value in zip(("finding", "location", "severity"), key):
            marginal[name][value] = marginal[name].get(value, 0.0) + cell.prob
    marginal["sex"] = spec.sex.as_dict()
    marginal["view"] = spec.view.as_dict()
    marginal["split"] = spec.splits.as_dict()
    marginal["age"] = _age_band_probs(spec.age)
    position = {"finding": 0, "location": 1, "severity": 2}
    pairs: dict[tuple, dict] = {}
    for pair in PAIRS:
        if all(p in position for p in pair):
            table: dict[tuple, float] = {}
            for key, prob in joint_cell.items():
                sub = tuple(key[position[p]] for p in pair)
                table[sub] = table.get(sub, 0.0) + prob
        else:  # the sampler draws sex, view and split independently of the finding cell
            table = {}
            for a, pa in marginal[pair[0]].items():
                for b, pb in marginal[pair[1]].items():
                    table[(a, b)] = pa * pb
        pairs[pair] = table
    return marginal, pairs


def _observed(rows: list[dict]) -> tuple[dict[str, Counter], dict[tuple, Counter]]:
    marginal = {name: Counter() for name in ATTRIBUTES}
    pairs = {pair: Counter() for pair in PAIRS}
    for row in rows:
        finding, location, severity = _labels_of(row.get("findings", ""))
        values = {"finding": finding, "location": location, "severity": severity, "sex": row.get("sex") or "-",
                  "view": row.get("view") or "-", "split": row.get("split") or "-",
                  "age": _age_band(int(row["age"])) if (row.get("age") or "").lstrip("-").isdigit() else "-"}
        for name in ATTRIBUTES:
            marginal[name][values[name]] += 1
        for pair in PAIRS:
            pairs[pair][tuple(values[p] for p in pair)] += 1
    return marginal, pairs


def planned_distributions(spec, n: int, cases: Iterable | None = None) -> tuple[dict[str, dict], dict[tuple, dict]]:
    """Counts of every attribute and pair in :data:`PAIRS` among the first ``n`` cases of the spec's plan.

    What a build of ``n`` cases (``--limit n``, or the whole ``count``) holds by construction: the first cases
    of an exact plan follow the spec only roughly, and a random plan never exactly. ``cases``: the build's
    own record of them (cases.jsonl), used instead of drawing the plan again.
    """
    from ..sampler import sample_cases

    if cases is not None:
        marginal, pairs = _observed([{"findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}"
                                                           for f in c.findings),
                                      "split": c.split, "sex": c.sex, "view": c.view, "age": str(c.age)}
                                     for c in cases])
        return {k: dict(v) for k, v in marginal.items()}, {k: dict(v) for k, v in pairs.items()}
    cases = sample_cases(spec, limit=n)
    columns = cases.columns()
    findings = ["|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in cell.findings)
                for cell in cases.cells]
    splits, sexes, views = cases.split_names, cases.sex_names, cases.view_names
    plan_rows = [{"findings": findings[c], "split": splits[sp], "sex": sexes[sx], "view": views[v], "age": str(a)}
                 for c, sp, sx, v, a in zip(*(columns[k].tolist() for k in ("cell", "split", "sex", "view", "age")))]
    marginal, pairs = _observed(plan_rows)
    return {k: dict(v) for k, v in marginal.items()}, {k: dict(v) for k, v in pairs.items()}


def _planned_count(spec, rows: list[dict], cases: Mapping | None) -> int:
    """How many cases of the plan the build covers: cases.jsonl's count, else the largest index in the manifest."""
    if cases:
        return min(len(cases), spec.count)
    indices = [int(r["index"]) for r in rows if (r.get("index") or "").isdigit()]
    return min(max(indices) + 1, spec.count) if indices else min(len(rows), spec.count)


def spec_fidelity_report(spec, rows: list[dict], min_score: float, *, planned: int | None = None,
                         cases: Mapping | None = None) -> dict:
    """Spec fidelity of the manifest's rows: every attribute and pair, and the overall score (the lowest).

    Args:
        planned: compare with the plan of the first ``planned`` cases (what a build of that many cases holds);
            None compares with the spec's distribution itself.
        cases: the build's record of those cases (cases.jsonl, by case id), read instead of drawing the plan.
    """
    from .metrics import pair_fidelity, spec_fidelity

    if planned is None:
        expected, expected_pairs = expected_distributions(spec)
        against = "the spec's distribution"
    else:
        expected, expected_pairs = planned_distributions(spec, planned, None if cases is None else cases.values())
        against = (f"the plan of the {planned:,} cases built (the first {planned:,} of the spec's {spec.count:,}), "
                   + ("as cases.jsonl records it" if cases is not None
                      else "drawn again by synthmed.sampler.sample_cases(spec, limit=n)"))
    observed, observed_pairs = _observed(rows)
    attributes = {}
    for name in ATTRIBUTES:
        attributes[name] = _json_fidelity(spec_fidelity(expected[name], dict(observed[name])))
    pairs = {}
    for pair in PAIRS:
        result = pair_fidelity(expected_pairs[pair], dict(observed_pairs[pair]))
        pairs[" x ".join(pair)] = _json_fidelity(result)
    scores = [r["score"] for r in attributes.values()] + [r["score"] for r in pairs.values()]
    overall = min(scores)
    worst = min(list(attributes.items()) + list(pairs.items()), key=lambda kv: kv[1]["score"])[0]
    return {"status": "pass" if overall >= min_score else "fail", "value": overall, "threshold": min_score,
            "score": overall, "mean_score": float(np.mean(scores)), "worst": worst, "n": len(rows),
            "planned": planned, "against": against, "attributes": attributes, "pairs": pairs}


# ----------------------------------------------------------------------------- manifest consistency

def _case_columns(case, vocab) -> dict[str, str]:
    """The manifest columns that say what a case is, as generate writes them."""
    labels = case.chexpert_labels(vocab)
    values = {"index": case.index, "split": case.split, "seed": case.seed,
              "findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in case.findings),
              "finding_codes": "|".join(str(vocab.findings[f.finding].code) for f in case.findings),
              "location": "|".join(f.location or "" for f in case.findings),
              "severity": "|".join(f.severity or "" for f in case.findings),
              **labels, "sex": case.sex, "age": case.age, "view": case.view}
    return {k: "" if v is None else str(v) for k, v in values.items()}


def _age_range(age) -> tuple[int, int]:
    if age.distribution == "fixed":
        return int(age.value), int(age.value)
    if age.distribution == "categorical":
        return min(b[0] for b in age.bins), max(b[1] for b in age.bins)
    return int(age.min), int(age.max)


def manifest_consistency_report(spec, rows: list[dict], cases: Mapping | None, cases_why: str | None = None) -> dict:
    """Does every row say what the build's plan (cases.jsonl) says of its case, within what the spec allows?

    Per row: a known, unique case id; split, findings (and their codes, locations, severities, CheXpert
    columns), sex, age and view equal to the case's; width, height and bit depth whole numbers equal to the
    spec's image; split, sex, view and finding cell among the spec's; the spec hash the card's. And every case
    of cases.jsonl has a row. ``cases``: case id -> Case; None (cases.jsonl missing or unreadable, ``cases_why``)
    draws the plan again from the card's spec. Rows that agree with it pass; rows that do not fail with the
    reason, since a redrawn plan is not the build's record (a card may not keep the order of the spec's
    splits, sexes or views, and another order draws another plan).
    """
    from ..sampler import enumerate_cells, sample_cases
    from ..vocabulary import get_vocabulary

    vocab = get_vocabulary()
    redrawn = cases is None
    if redrawn:
        cases = {c.case_id: c for c in sample_cases(spec, limit=_planned_count(spec, rows, None))}
    plan = "the plan drawn again" if redrawn else "cases.jsonl"
    allowed = {"split": tuple(spec.splits.keys), "sex": tuple(spec.sex.keys), "view": tuple(spec.view.keys)}
    cells = {"|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in cell.findings)
             for cell in enumerate_cells(spec.findings, vocab)}
    size = {"width": spec.image.width, "height": spec.image.height, "bit_depth": spec.image.bit_depth}
    if "png" in spec.image.formats:
        size["png_bit_depth"] = spec.image.png_bit_depth
    low, high = _age_range(spec.age)
    problems: list[str] = []
    bad_rows = 0
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, start=1):
        found = []
        case_id = row.get("case_id") or ""
        if case_id in seen:
            found.append(f"case_id {case_id!r} is also row {seen[case_id]}'s")
        seen.setdefault(case_id, n)
        for column, value in size.items():
            text = row.get(column) or ""
            if not text.isdigit() or int(text) != value:
                found.append(f"{column} {text!r} is not the spec's {value}")
        for column, names in allowed.items():
            if (row.get(column) or "") not in names:
                found.append(f"{column} {row.get(column)!r} is not one of the spec's ({', '.join(names)})")
        age = row.get("age") or ""
        if not age.isdigit() or not low <= int(age) <= high:
            found.append(f"age {age!r} is not a whole number of years in the spec's {low}..{high}")
        if (row.get("findings") or "") not in cells:
            found.append(f"findings {row.get('findings')!r} are not a finding cell of the spec")
        if row.get("spec_hash") and row["spec_hash"] != spec.spec_hash:
            found.append(f"spec_hash {row['spec_hash'][:12]} is not the card's spec ({spec.spec_hash[:12]})")
        case = cases.get(case_id)
        if case is None:
            found.append(f"case_id {case_id!r} is not in {plan}")
        else:
            differ = [f"{column} {row.get(column)!r} (the plan: {value!r})"
                      for column, value in _case_columns(case, vocab).items() if (row.get(column) or "") != value]
            if differ:
                found.append(f"disagrees with {plan}: " + "; ".join(differ[:4])
                             + (f"; and {len(differ) - 4} more" if len(differ) > 4 else ""))
        if found:
            bad_rows += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"row {n} ({case_id or '?'}): " + "; ".join(found))
    missing = [c for c in cases if c not in seen]
    if missing:
        problems.append(f"{len(missing):,} case(s) of {plan} have no row: {', '.join(missing[:5])}"
                        + (", ..." if len(missing) > 5 else ""))
    failed = bad_rows + len(missing)
    why = cases_why or "cases.jsonl is missing"
    if redrawn and failed:
        problems.insert(0, f"{why}: the rows cannot be checked against the plan; the plan drawn again from "
                           f"dataset_card.json's spec disagrees with {failed:,} row(s) or case(s) (wrong rows, or a "
                           "card that does not keep the order of the spec's splits, sexes or views, which draws "
                           "another plan): restore cases.jsonl to check them")
    return {"status": "fail" if failed else "pass", "value": failed, "threshold": 0, "rows": len(rows),
            "rows_failed": bad_rows, "cases_without_row": len(missing), "problems": problems,
            "against": (f"the plan drawn again from dataset_card.json's spec ({why}) and the spec" if redrawn
                        else "cases.jsonl and the spec")}


def _json_fidelity(result: dict) -> dict:
    def key(k):
        return " | ".join(k) if isinstance(k, tuple) else k

    out = dict(result)
    out["pooled"] = [key(k) for k in result["pooled"]]
    out["unexpected"] = [key(k) for k in result["unexpected"]]
    out["cells"] = [{**c, "category": key(c["category"])} for c in result["cells"]]
    if out["chi2"] is not None and math.isinf(out["chi2"]):
        out["chi2"] = "inf"
    return out


# ----------------------------------------------------------------------------- duplicates, diversity, intensity

def duplicates_report(results: list[ImageResult], features: np.ndarray | None, feature_ids: list[str],
                      thresholds) -> dict:
    """Near-duplicate pairs by residual dHash and by embedding cosine, each confirmed by the residuals' cosine."""
    from .metrics import dhash, embedding_near_duplicates, near_duplicates

    with_thumb = [r for r in results if r.thumb is not None]
    n = len(results)
    if len(with_thumb) < 3:
        return {"status": "skipped", "reason": f"needs at least 3 readable images, got {len(with_thumb)}",
                "pairs": [], "fraction": 0.0, "threshold": thresholds.max_duplicate_fraction}
    thumbs = np.stack([r.thumb.astype(np.float32) for r in with_thumb])
    residual = thumbs - thumbs.mean(axis=0)
    for r, res in zip(with_thumb, residual):
        r.dhash = dhash(res)
    ids = [r.case_id for r in with_thumb]
    flat = residual.reshape(len(residual), -1).astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1)
    candidates = near_duplicates([r.dhash for r in with_thumb], list(range(len(with_thumb))),
                                 max_distance=thresholds.duplicate_hamming)
    pairs = []
    for i, j, distance in candidates:
        cosine = float(flat[i] @ flat[j] / (norms[i] * norms[j])) if norms[i] > 0 and norms[j] > 0 else 1.0
        if cosine >= thresholds.duplicate_cosine:
            pairs.append({"a": ids[i], "b": ids[j], "method": "dhash", "hamming": int(distance),
                          "cosine": round(cosine, 6)})
    embedding = {"status": "skipped", "reason": "no features"}
    if features is not None and len(feature_ids) >= 3:
        centred = features - features.mean(axis=0)
        keep = np.linalg.norm(centred, axis=1) > 0
        kept_ids = [i for i, k in zip(feature_ids, keep) if k]
        found = embedding_near_duplicates(centred[keep], kept_ids, min_cosine=thresholds.embedding_cosine)
        # A class-trained encoder maps every normal film close to every other: an embedding pair counts
        # only when the pixels agree too (residual cosine), so it adds pairs the hash missed, not look-alikes.
        row_of = {case_id: k for k, case_id in enumerate(ids)}
        seen = {(p["a"], p["b"]) for p in pairs}
        confirmed = 0
        for a, b, cosine in found:
            i, j = row_of.get(a), row_of.get(b)
            if i is None or j is None or (a, b) in seen or norms[i] == 0 or norms[j] == 0:
                continue
            pixel_cosine = float(flat[i] @ flat[j] / (norms[i] * norms[j]))
            if pixel_cosine >= thresholds.duplicate_cosine:
                confirmed += 1
                pairs.append({"a": a, "b": b, "method": "embedding", "cosine": round(float(cosine), 6),
                              "pixel_cosine": round(pixel_cosine, 6)})
        embedding = {"status": "done", "similar_pairs": len(found), "pairs": confirmed,
                     "min_cosine": thresholds.embedding_cosine}
    involved = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    fraction = len(involved) / max(n, 1)
    return {"status": "pass" if fraction <= thresholds.max_duplicate_fraction else "fail", "value": fraction,
            "fraction": fraction, "threshold": thresholds.max_duplicate_fraction, "images": involved,
            "pairs": pairs, "candidates": len(candidates), "embedding": embedding,
            "method": (f"residual dHash (32x32 thumbnail minus the set's mean thumbnail), Hamming <= "
                       f"{thresholds.duplicate_hamming}, confirmed by residual cosine >= {thresholds.duplicate_cosine}")}


def diversity_report(groups: dict[str, list[np.ndarray]], max_ms_ssim: float) -> dict:
    from .metrics import intra_prompt_diversity

    usable = {k: v for k, v in groups.items() if len(v) >= 2}
    if not usable:
        return {"status": "skipped", "reason": "no finding cell has two readable images", "threshold": max_ms_ssim}
    result = intra_prompt_diversity(usable, data_range=1.0)
    overall = result["overall"]
    return {"status": "pass" if overall <= max_ms_ssim else "fail", "value": overall, "threshold": max_ms_ssim,
            "overall": overall, "per_group": result["per_prompt"], "pairs": result["pairs"],
            "images_per_group": DIVERSITY_PER_GROUP,
            "method": "mean pairwise MS-SSIM within a finding cell (finding:location:severity); lower is more diverse"}


def _band(values: Sequence[float], k: float) -> tuple[float, float]:
    """mean ± k·σ (``ddof=1``), the rule of :func:`synthmed.qc.metrics.fit_intensity_bounds`, on per-image figures.

    The half-width is never below 0.01 of full scale, so a reference of near-identical images does not
    flag an image for quantisation noise.
    """
    x = np.asarray(values, dtype=np.float64)
    spread = float(x.std(ddof=1)) if x.size > 1 else 0.0
    half = max(k * spread, 0.01)
    return float(x.mean()) - half, float(x.mean()) + half


def _intensity_figures(regions: Mapping[str, float], stats) -> dict[str, float]:
    return {**{f"region:{name}": value for name, value in regions.items()}, **stats.features()}


def intensity_report(results: list[ImageResult], reference: _ImageSet | None, k: float) -> dict:
    """Bands per region mean and histogram quantile, learned from a reference set (MAISI's per-organ
    mean ± k·σ), and the images outside them. Without a reference there is nothing to learn from: skipped
    (a set's own spread is no standard: its findings alone move region means)."""
    if reference is None:
        return {"status": "skipped", "k": k, "reason": "no reference set given (--reference MANIFEST): the bands "
                                                       "are learned from one"}
    fitted = [_intensity_figures(regions, s) for regions, s in zip(reference.regions, reference.stats)]
    if len(fitted) < 3:
        return {"status": "skipped", "k": k, "reason": f"needs at least 3 reference images, got {len(fitted)}"}
    names = list(fitted[0])
    bounds = {name: _band([f[name] for f in fitted], k) for name in names}
    measured = [r for r in results if r.stats is not None and r.regions]
    outside = 0
    for r in measured:
        values = _intensity_figures(r.regions, r.stats)
        bad = [f"{name} {values[name]:.3f} outside [{bounds[name][0]:.3f}, {bounds[name][1]:.3f}]"
               for name in names if not bounds[name][0] <= values[name] <= bounds[name][1]]
        if bad:
            outside += 1
            r.fail("intensity", "; ".join(bad))
    return {"status": "fail" if outside else "pass", "k": k,
            "fitted_on": f"reference set ({len(fitted)} images), mean ± k·σ",
            "regions": {name: list(box) for name, box in REGIONS.items()},
            "bounds": {n: [round(lo, 6), round(hi, 6)] for n, (lo, hi) in bounds.items()},
            "failed": outside, "checked": len(measured)}


def _histogram_summary(results: list[ImageResult], reference: _ImageSet | None) -> dict:
    hists = np.stack([r.stats.histogram for r in results if r.stats is not None]) if any(
        r.stats is not None for r in results) else np.zeros((0, 1))
    out = {}
    if hists.shape[0]:
        out["set"] = {"mean": hists.mean(axis=0).tolist(), "p5": np.percentile(hists, 5, axis=0).tolist(),
                      "p95": np.percentile(hists, 95, axis=0).tolist()}
    if reference is not None and reference.stats:
        ref = np.stack([s.histogram for s in reference.stats])
        out["reference"] = {"mean": ref.mean(axis=0).tolist()}
    return out


# ----------------------------------------------------------------------------- reference metrics, auditor, memorisation

def reference_report(gen: np.ndarray | None, ref: _ImageSet | None, extractor_name: str | None,
                     thresholds, why_no_features: str | None) -> dict:
    from .metrics import fid_from_features, kid_from_features, precision_recall_density_coverage

    if ref is None:
        return {"status": "skipped", "reason": "no reference set given (--reference MANIFEST)"}
    if gen is None or ref.features is None:
        return {"status": "skipped", "reason": why_no_features or ref.features_error or "no features"}
    n_gen, n_ref = gen.shape[0], ref.features.shape[0]
    out: dict[str, Any] = {"status": "done", "feature_extractor": extractor_name, "n_generated": n_gen,
                           "n_reference": n_ref, "dimensions": int(gen.shape[1])}
    if min(n_gen, n_ref) < 2:
        return {**out, "status": "skipped", "reason": f"FID needs at least 2 images per set, got {n_gen} and {n_ref}"}
    method = "eigh" if gen.shape[1] > 64 else "sqrtm"
    out["fid"] = fid_from_features(ref.features, gen, method=method)
    kid_mean, kid_std = kid_from_features(ref.features, gen, subset_size=min(100, n_gen, n_ref))
    out["kid"], out["kid_std"] = kid_mean, kid_std
    if min(n_gen, n_ref) > 5:
        out.update(precision_recall_density_coverage(ref.features, gen, k=5))
    else:
        out["prdc_reason"] = f"precision/recall/density/coverage need more than 5 images per set, got {n_gen} and {n_ref}"
    if n_gen < 1000:
        out["note"] = f"FID and KID are biased upwards at small N ({n_gen} generated images); compare sets of equal size"
    return out


def _verdict(value, threshold, higher_is_better: bool) -> str:
    if value is None:
        return "skipped"
    if threshold is None:
        return "info"
    return "pass" if (value >= threshold if higher_is_better else value <= threshold) else "fail"


def _label_fidelity_score(fidelity) -> float | None:
    """The one figure the gate compares: the share of images whose predicted set of findings is exactly the label's."""
    if not isinstance(fidelity, Mapping):
        return None
    for value in ((fidelity.get("findings") or {}).get("exact_set_agreement"), fidelity.get("score")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def auditor_report(prediction, rows: list[dict], why_not: str | None, min_label_fidelity) -> dict:
    """Label fidelity of the auditor's reading of each image, and an IS-style figure of its finding probabilities.

    ``rows``: the manifest rows of the predicted images, in the prediction's order.
    """
    from .metrics import inception_score

    if prediction is None:
        return {"status": "skipped", "reason": why_not or "no prediction"}
    out: dict[str, Any] = {"status": "done"}
    try:
        from .auditor import label_fidelity

        fidelity = label_fidelity(prediction, rows)
        out["label_fidelity"] = _jsonable(fidelity)
        score = _label_fidelity_score(fidelity)
        out["label_fidelity_score"] = score
        out["label_fidelity_score_is"] = "findings.exact_set_agreement: share of images whose predicted findings equal the label's"
        out["label_fidelity_status"] = _verdict(score, min_label_fidelity, True)
    except Exception as e:
        out["label_fidelity"] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
        out["label_fidelity_status"] = "skipped"
    try:
        probs = np.asarray(prediction.finding_probs, dtype=np.float64)
        probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)  # per-image class shares
        out["inception_score"] = inception_score(probs)
        out["inception_score_note"] = ("IS-style figure from the auditor's finding probabilities, normalised per "
                                       f"image over {probs.shape[1]} classes (1 = one class for all, "
                                       f"{probs.shape[1]} = confident and evenly spread)")
    except Exception as e:
        out["inception_score_reason"] = f"{type(e).__name__}: {e}"
    return out


def memorisation_report(gen: np.ndarray | None, gen_ids: list[str], gen_pixels: np.ndarray | None,
                        training: _ImageSet | None, why_not: str | None, max_fraction: float) -> dict:
    """Nearest training image of every generated one (encoder and pixel space); fails above ``max_fraction`` flagged."""
    if training is None:
        return {"status": "skipped", "reason": "no training manifest given (--training-manifest MANIFEST)"}
    if gen is None or training.features is None:
        return {"status": "skipped", "reason": why_not or training.features_error or "no features"}
    try:
        from .auditor import memorisation_audit
    except (ImportError, AttributeError) as e:
        return {"status": "skipped", "reason": f"the memorisation audit is not available ({type(e).__name__}: {e})"}
    train_pixels = np.stack(training.thumbs) if training.thumbs and gen_pixels is not None else None
    try:
        result = memorisation_audit(gen, gen_ids, training.features, training.ids,
                                    gen_pixels=gen_pixels if train_pixels is not None else None,
                                    train_pixels=train_pixels, threshold=None)
    except Exception as e:
        return {"status": "skipped", "reason": f"the memorisation audit failed ({type(e).__name__}: {e})"}
    result = _jsonable(result)
    flagged = _flagged_ids(result)
    fraction = len(flagged) / max(len(gen_ids), 1)
    for space in ("encoder", "pixel"):  # the per-image lists are long; the report keeps the flagged ones
        if isinstance(result.get(space), dict):
            result[space].pop("nearest", None)
    return {"status": "pass" if fraction <= max_fraction else "fail", "value": fraction, "threshold": max_fraction,
            "flagged": flagged, "audit": result, "n_training": len(training.ids)}


def _flagged_ids(result) -> list[str]:
    """Generated ids flagged in any space of a memorisation audit, in first-seen order."""
    found: dict[str, None] = {}
    for space in ("encoder", "pixel"):
        section = result.get(space) if isinstance(result, dict) else None
        for item in (section or {}).get("flagged", []) if isinstance(section, dict) else []:
            if isinstance(item, dict) and item.get("generated_id") is not None:
                found[str(item["generated_id"])] = None
    return list(found)


def _jsonable(value):
    """A JSON-safe copy: numpy scalars and arrays become numbers and lists, tuples lists, NaN/inf strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ----------------------------------------------------------------------------- the run

def _selection(rows: list[dict], samples_per_cell: int) -> tuple[dict[tuple, list[str]], dict[str, list[str]]]:
    """Which images the report shows per finding x severity, and which feed the diversity check (first in order)."""
    grid: dict[tuple, list[str]] = {}
    groups: dict[str, list[str]] = {}
    for row in rows:
        finding, _, severity = _labels_of(row.get("findings", ""))
        cell = grid.setdefault((finding, severity), [])
        if len(cell) < samples_per_cell:
            cell.append(row["case_id"])
        group = groups.setdefault(row.get("findings", "") or "-", [])
        if len(group) < DIVERSITY_PER_GROUP:
            group.append(row["case_id"])
    return grid, groups


def _display_thumb(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape
    scale = DISPLAY_SIDE / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = box_downsample(pixels, *size) if scale <= 1 else _resize(pixels, size)
    return np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)


def _limits(config) -> PixelLimits:
    return PixelLimits(min_dynamic_range=config.thresholds.min_dynamic_range,
                       max_saturated_fraction=config.thresholds.max_saturated_fraction,
                       max_black_fraction=config.thresholds.max_black_fraction)


def _expected(spec) -> Expected:
    return Expected(width=spec.image.width, height=spec.image.height, bit_depth=spec.image.bit_depth,
                    formats=spec.image.formats, png_bit_depth=spec.image.png_bit_depth)


def check_rows(out: str | Path, spec, rows: Iterable[Mapping[str, str]]) -> dict[str, ImageResult]:
    """The per-image checks of manifest rows, under the spec's ``qc:`` thresholds, by case id.

    Where the images are written (a Ray worker, after its chunk), so the final :func:`qc` of a
    scaled-out build does not read every file back on one machine.

    Example:
        >>> results = check_rows("out/pneumonia", spec, read_part(part_path))  # doctest: +SKIP
    """
    limits, expected = _limits(spec.qc), _expected(spec)
    return {row["case_id"]: check_row(Path(out), row, expected, limits)[0] for row in rows}


def qc(out: str | Path, *, reference: str | Path | None = None, training_manifest: str | Path | None = None,
       config=None, feature_extractor: FeatureExtractor | str | None = None, auditor: Any = True,
       full: bool = True, dciodvfy_sample: int | None = None, write: bool = True, lock: bool = True,
       progress: bool = False, precomputed: Mapping[str, ImageResult] | None = None,
       report_dir: str | Path | None = None) -> QCResult:
    """Check a synthmed output folder and write its quality report.

    Args:
        out: the output folder (manifest.csv, dataset_card.json, images/, dicom/).
        reference: a manifest (CSV with png_path, file_name or path, relative to its folder) of reference
            images: the intensity bands are fitted on them and FID / KID / PRDC computed against them.
        training_manifest: the manifest of the images the generator was trained on, for the memorisation audit.
        config: a ``QCSpec`` (thresholds, gate); default: the spec's ``qc:`` section (from dataset_card.json).
        feature_extractor: for FID / KID / PRDC, embedding duplicates and memorisation: an object with ``name``
            and ``__call__(images float32 [N, H, W] in [0, 1]) -> [N, D]``, or ``"module:attribute"``;
            default: the shipped auditor's embedding.
        auditor: True (load the shipped auditor), False (no auditor sections) or an auditor object.
        full: False runs only the cheap part (per-image checks, intensity, spec fidelity, duplicates, dciodvfy
            sample; FID when a reference is given), as ``generate`` does.
        dciodvfy_sample: how many DICOM images dciodvfy checks, each with its SR and SEG (default: the config's
            ``dciodvfy_sample``).
        write: write qc_report.json and report.html, and fill the manifest's qc_status / qc_flags / metadata.csv,
            each only where synthmed's record says the file is synthmed's or where there is none yet; the
            others are left alone and named in ``result.not_written``. In a folder this process cannot write,
            nothing is written (the result still holds the whole report).
        lock: hold the folder's run lock (``generate`` already holds it when it calls this).
        progress: a progress bar over the images.
        precomputed: per-image results by case id, made by :func:`check_rows` with this folder's spec where
            the images were written (the Ray workers do that); used instead of reading those files again
            when the run needs no pixels of them (the cheap run without a reference or training set).
        report_dir: write qc_report.json and report.html into this folder (made if needed) and leave ``out``
            untouched: for a read-only build or another user's folder.

    Raises:
        QCError: not an output folder, a manifest naming files outside it, an unreadable reference, a folder
            in use (``exit_code`` 2 or 1).

    Example:
        >>> result = qc("out/pneumonia", reference="real/manifest.csv")  # doctest: +SKIP
    """
    started = time.perf_counter()
    # 1. Check inputs
    _check_arguments(out=out, reference=reference, training_manifest=training_manifest, report_dir=report_dir,
                     feature_extractor=feature_extractor, auditor=auditor, full=full, write=write, lock=lock,
                     progress=progress, dciodvfy_sample=dciodvfy_sample, precomputed=precomputed)
    out = Path(out)
    if not out.is_dir():
        raise QCError(f"{out} is not a folder" if out.exists() else f"{out} does not exist")
    if report_dir is not None and write:
        inside = Path(report_dir).resolve()
        if inside != out.resolve() and inside.is_relative_to(out.resolve()):
            raise QCError(f"the report folder {report_dir} (--report-dir, report_dir= in Python) is inside {out}; "
                          f"a report folder leaves {out} untouched: choose one outside it (or {out} itself)")
    rows = _read_manifest(out)
    _check_paths(out, rows)
    spec = _load_spec(out)
    config = config if config is not None else spec.qc
    if dciodvfy_sample is not None:
        import dataclasses

        if dciodvfy_sample < 0:
            raise QCError(f"dciodvfy_sample must be 0 or more, got {dciodvfy_sample}")
        config = dataclasses.replace(config, dciodvfy_sample=int(dciodvfy_sample))
    unknown = [c for c in config.gate if c not in ALL_CHECKS]
    if unknown:
        raise QCError(f"unknown check(s) in gate: {', '.join(unknown)} (known: {', '.join(ALL_CHECKS)})")
    paths = {}
    for name, value in (("reference", reference), ("training manifest", training_manifest)):
        if value is not None:
            path = Path(value)
            if not path.is_file():
                raise QCError(f"the {name} {path} is not a file")
            paths[name] = path
    if isinstance(feature_extractor, str):
        feature_extractor = _import_extractor(feature_extractor)
    limits, expected = _limits(config), _expected(spec)
    if precomputed and (limits != _limits(spec.qc)):
        precomputed = None  # made under the spec's own thresholds, not this config's
    outputs = _Outputs(out, Path(report_dir) if report_dir is not None else None, write=write, lock=lock)
    try:
        return _run(out, rows, spec, config, limits, expected, paths, feature_extractor, auditor, full, outputs,
                    progress, started, precomputed or {})
    finally:
        outputs.release()


def _check_arguments(**args) -> None:
    """Refuse wrong argument types at the door (TypeError naming the argument), before any file is read."""
    def name_of(value) -> str:
        return f"{type(value).__name__} {value!r}"[:120]

    if not isinstance(args["out"], (str, os.PathLike)) or not os.fspath(args["out"]):
        raise TypeError(f"out must be the path of a synthmed output folder, got {name_of(args['out'])}")
    for name in ("reference", "training_manifest", "report_dir"):
        value = args[name]
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not os.fspath(value)):
            what = "a folder" if name == "report_dir" else "a manifest"
            raise TypeError(f"{name} must be None or the path of {what}, got {name_of(value)}")
    for name in ("full", "write", "lock", "progress"):
        if not isinstance(args[name], bool):
            raise TypeError(f"{name} must be True or False, got {name_of(args[name])}")
    auditor = args["auditor"]
    if not isinstance(auditor, bool) and auditor is not None and not (hasattr(auditor, "predict")
                                                                     or hasattr(auditor, "embed")):
        raise TypeError(f"auditor must be True, False or an auditor object, got {name_of(auditor)}")
    extractor = args["feature_extractor"]
    if extractor is not None and not isinstance(extractor, str) and not callable(extractor):
        raise TypeError(f"feature_extractor must be None, 'module:attribute' or a callable with a name, "
                        f"got {name_of(extractor)}")
    sample = args["dciodvfy_sample"]
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int)):
        raise TypeError(f"dciodvfy_sample must be None or a whole number, got {name_of(sample)}")
    if args["precomputed"] is not None and not isinstance(args["precomputed"], Mapping):
        raise TypeError(f"precomputed must be None or a mapping of case id to result, got "
                        f"{name_of(args['precomputed'])}")


class _Outputs:
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
            except ForeignFileError:
                what = ("its qc_status / qc_flags columns are not filled" if rel == "manifest.csv"
                        else "--report-dir DIR writes the report elsewhere")
                self.not_written.append(f"{rel} exists and synthmed's record does not name it (a copied dataset, or "
                                        f"a file of yours): left as it is; {what}")
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
        """Write what may be written; returns (qc_report.json, report.html) where written."""
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


def _run(out, rows, spec, config, limits, expected, paths, feature_extractor, auditor, full, outputs, progress,
         started, precomputed) -> QCResult:
    thresholds = config.thresholds
    notes: list[str] = []
    # 2. The auditor and the feature extractor. The cheap run computes features only for a reference or a
    #    training set (FID, memorisation), and never the auditor's predictions.
    wants_features = full or bool(paths)
    wants_auditor = full or (wants_features and feature_extractor is None)
    films = shipped_films(rows)
    auditor_obj, auditor_why = _load_auditor(auditor if wants_auditor else False, films)
    extractor = feature_extractor if wants_features else None
    extractor_why = None if wants_features else "features are computed by the full run, or with a reference"
    if extractor is None and wants_features and auditor_obj is not None:
        # the Auditor is itself a FeatureExtractor (name + __call__ = embed); wrap objects that only embed
        extractor = (auditor_obj if callable(auditor_obj) and hasattr(auditor_obj, "name")
                     else _AuditorEmbedding(auditor_obj) if hasattr(auditor_obj, "embed") else None)
    if extractor is None and wants_features:
        extractor_why = (f"no feature extractor: the default is the auditor's embedding, and {auditor_why}"
                         if auditor_why else "no feature extractor")
    extractor_name = getattr(extractor, "name", type(extractor).__name__) if extractor is not None else None
    predictor = auditor_obj if full else None
    if not full and auditor is not False:
        auditor_why = "skipped at the end of generate to keep it cheap; run `synthmed qc OUT` for the full report"
    grid, groups = _selection(rows, config.samples_per_cell)
    shown = {cid for ids in grid.values() for cid in ids}
    diverse = {cid for ids in groups.values() for cid in ids} if full else set()
    batcher = _Batcher((expected.height, expected.width), extractor=extractor, auditor=predictor)

    # 3. The per-image pass: each file read once
    results: list[ImageResult] = []
    thumbs: dict[str, np.ndarray] = {}
    diversity_images: dict[str, np.ndarray] = {}
    small_copies: dict[str, np.ndarray] = {}  # 64 x 64 copies for the pixel-space memorisation audit
    keep_small = "training manifest" in paths and extractor is not None
    if batcher.active or diverse or keep_small:
        precomputed = {}  # these need every image's pixels: read them all
    bar = _progress(len(rows), progress)
    per_image = 0.0
    failure_thumbs = 0
    try:
        for row in rows:
            t0 = time.perf_counter()
            result, pixels = precomputed.get(row.get("case_id", "")), None
            if result is None:
                result, pixels = check_row(out, row, expected, limits)
            elif result.case_id in shown or (result.flags and failure_thumbs < MAX_FAILURE_THUMBS):
                pixels = check_row(out, row, expected, limits)[1]  # a thumbnail needs its pixels
            per_image += time.perf_counter() - t0
            results.append(result)
            if pixels is not None:
                if result.case_id in shown or (result.flags and failure_thumbs < MAX_FAILURE_THUMBS):
                    thumbs[result.case_id] = _display_thumb(pixels)
                    failure_thumbs += bool(result.flags)
                if result.case_id in diverse and "size" not in result.flags:  # MS-SSIM pairs need one shape
                    side = min(DIVERSITY_SIDE, *pixels.shape)
                    diversity_images[result.case_id] = box_downsample(pixels, side)
                batcher.add(result.case_id, pixels)
                if keep_small:
                    small_copies[result.case_id] = box_downsample(pixels, REGION_SIDE)
            bar.update(1)
        batcher.flush()
    finally:
        bar.close()
    by_id = {r.case_id: r for r in results}
    features = batcher.feature_matrix()
    if batcher.errors.get("features"):
        extractor_why = f"the feature extractor failed ({batcher.errors['features']})"
    if batcher.errors.get("auditor"):
        auditor_why = f"the auditor failed ({batcher.errors['auditor']})"

    # 4. Other image sets
    shape = (expected.height, expected.width)
    reference_set = (_read_image_set(paths["reference"], shape, extractor, keep_thumbs=False)
                     if "reference" in paths else None)
    training_set = (_read_image_set(paths["training manifest"], shape, extractor, keep_thumbs=True)
                    if "training manifest" in paths else None)

    # 5. Set-level checks
    sections: dict[str, dict] = {}
    sections["intensity"] = intensity_report(results, reference_set, thresholds.intensity_k)
    sections["dciodvfy"] = dciodvfy_sample(out, rows, config.dciodvfy_sample)
    for case_id, errors in sections["dciodvfy"].get("failures", {}).items():
        by_id[case_id].fail("dciodvfy", "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""))
    cases, cases_why = _read_cases(out)
    sections["manifest_consistency"] = manifest_consistency_report(spec, rows, cases, cases_why)
    sections["spec_fidelity"] = spec_fidelity_report(spec, rows, thresholds.min_spec_fidelity,
                                                     planned=_planned_count(spec, rows, cases), cases=cases)
    sections["duplicates"] = duplicates_report(results, features, batcher.ids, thresholds)
    for pair in sections["duplicates"].get("pairs", []):
        by_id[pair["a"]].fail("duplicates", f"near-duplicate of {pair['b']} ({pair['method']})")
        by_id[pair["b"]].fail("duplicates", f"near-duplicate of {pair['a']} ({pair['method']})")
    if full:
        sections["diversity"] = diversity_report(
            {g: [diversity_images[c] for c in ids if c in diversity_images] for g, ids in groups.items()},
            thresholds.max_ms_ssim)
    else:
        sections["diversity"] = {"status": "skipped", "reason": "skipped at the end of generate to keep it cheap; "
                                                               "run `synthmed qc OUT` for it"}
    sections["reference"] = reference_report(features, reference_set, extractor_name, thresholds, extractor_why)
    rows_by_id = {r["case_id"]: r for r in rows}
    sections["auditor"] = auditor_report(batcher.prediction(), [rows_by_id[i] for i in batcher.ids], auditor_why,
                                         thresholds.min_label_fidelity)
    if sections["auditor"]["status"] == "done":
        applies, why_not = auditor_applies(rows, auditor_obj, shipped=auditor is True, n_read=len(batcher.ids),
                                           films=films)
        sections["auditor"].update(applies=applies, applies_reason=why_not)
        if not applies and sections["auditor"].get("label_fidelity_status") in ("pass", "fail"):
            sections["auditor"].update(label_fidelity_status="info",
                                       label_fidelity_against_threshold=sections["auditor"]["label_fidelity_status"])
    if batcher.errors.get("auditor") and sections["auditor"]["status"] == "skipped":
        sections["auditor"]["reason"] = auditor_why
    gen_pixels = np.stack([small_copies[i] for i in batcher.ids]) if training_set is not None and batcher.ids else None
    sections["memorisation"] = memorisation_report(features, batcher.ids, gen_pixels, training_set, extractor_why,
                                                   thresholds.max_memorised_fraction)
    for case_id in sections["memorisation"].get("flagged", []):
        if case_id in by_id:
            by_id[case_id].fail("memorisation", "close to a training image")

    # 6. Thumbnails of images flagged at set level (intensity, duplicates, ...), read again: only those shown
    wanted = [r.case_id for r in results if r.flags][:MAX_FAILURE_THUMBS]
    wanted += [i for p in sections["duplicates"].get("pairs", [])[:24] for i in (p["a"], p["b"])]
    _add_thumbs(out, rows_by_id, [i for i in dict.fromkeys(wanted) if i not in thumbs], thumbs)

    # 7. Verdicts
    checks = _check_table(results, sections, config, thresholds)
    failed_gates = tuple(name for name, c in checks.items() if c["gating"] and c["status"] == "fail")
    passed = not failed_gates
    gated_but_skipped = [name for name, c in checks.items() if c["gating"] and c["status"] == "skipped"
                         and (full or name != "label_fidelity")]  # the cheap run never reads labels back
    if gated_but_skipped:
        notes.append(f"gating check(s) skipped, so they could not fail: {', '.join(gated_but_skipped)}")
    gate = set(config.gate)
    flagged = {r.case_id: tuple(r.flag_names) for r in results if r.flags}
    statuses = {r.case_id: ("fail" if any(f in gate for f in r.flags) else "warn" if r.flags else "pass")
                for r in results}
    report = {
        "format": REPORT_FORMAT, "synthmed_version": __version__,
        "dataset": {"name": spec.name, "spec_hash": spec.spec_hash, "count": len(rows),
                    "width": expected.width, "height": expected.height, "bit_depth": expected.bit_depth,
                    "png_bit_depth": expected.png_depth if "png" in expected.formats else None,
                    "formats": list(expected.formats)},
        "verdict": "pass" if passed else "fail", "failed_checks": list(failed_gates), "gate": list(config.gate),
        "mode": "full" if full else "fast",
        "thresholds": {k: getattr(thresholds, k) for k in thresholds.__dataclass_fields__},
        "checks": checks,
        "images": {"checked": len(results), "passed": sum(s == "pass" for s in statuses.values()),
                   "warned": sum(s == "warn" for s in statuses.values()),
                   "failed": sum(s == "fail" for s in statuses.values()),
                   "failures": [{"case_id": r.case_id, "status": statuses[r.case_id], "flags": r.flag_names,
                                 "messages": {k: r.flags[k] for k in r.flag_names}} for r in results if r.flags]},
        "sections": sections,
        "histograms": _histogram_summary(results, reference_set),
        "feature_extractor": extractor_name, "feature_extractor_reason": extractor_why,
        "reference": str(paths["reference"]) if "reference" in paths else None,
        "training_manifest": str(paths["training manifest"]) if "training manifest" in paths else None,
        "notes": notes,
    }
    if reference_set is not None and reference_set.unreadable:
        report["notes"].append(f"{len(reference_set.unreadable)} reference image(s) could not be read")
    report = _jsonable(report)

    # 8. Outputs
    report_path, html_path = outputs.write(report, thumbs, grid, rows, statuses, flagged)
    return QCResult(out=out, passed=passed, report=report, failed_checks=failed_gates, flagged=flagged,
                    report_path=report_path, html_path=html_path, seconds=time.perf_counter() - started,
                    per_image_seconds=per_image, not_written=tuple(outputs.not_written))


def _add_thumbs(out: Path, rows_by_id: Mapping[str, dict], case_ids: Iterable[str], thumbs: dict) -> None:
    for case_id in case_ids:
        row = rows_by_id.get(case_id, {})
        rel = row.get("png_path") or row.get("dicom_path")
        read = _read_any_image(out / rel) if rel else None
        if read is not None:
            stored, full = read
            thumbs[case_id] = _display_thumb(stored.astype(np.float32) * np.float32(1.0 / full))


def _check_table(results: list[ImageResult], sections: dict, config, thresholds) -> dict[str, dict]:
    """One row per check: what it tests, whether it gates, its status, how many images failed, its limit."""
    gate = set(config.gate)
    table: dict[str, dict] = {}
    n = len(results)
    for name in PER_IMAGE_CHECKS + ("intensity", "dciodvfy"):
        failed = sum(name in r.flags for r in results)
        entry = {"description": CHECKS[name], "gating": name in gate, "failed": failed, "checked": n,
                 "status": "fail" if failed else "pass"}
        if name == "nan":
            entry["note"] = "files hold integers; NaN is checked on a backend's output when reject.max_tries > 0"
        if name == "intensity":
            section = sections["intensity"]
            entry.update(threshold=thresholds.intensity_k, checked=section.get("checked", 0))
            if section["status"] == "skipped":
                entry.update(status="skipped", reason=section.get("reason"))
        if name == "dciodvfy":
            section = sections["dciodvfy"]
            entry.update(checked=section.get("checked", 0), sample=section.get("sample"))
            if section["status"] == "skipped":
                entry.update(status="skipped", reason=section.get("reason"))
        if name == "blank":
            entry["threshold"] = thresholds.min_dynamic_range
        if name == "saturated":
            entry["threshold"] = thresholds.max_saturated_fraction
        table[name] = entry

    def set_level(name, description, section, value, threshold, status):
        entry = {"description": description, "gating": name in gate, "status": status, "value": value,
                 "threshold": threshold}
        if status == "skipped":
            entry["reason"] = section.get("reason")
        table[name] = entry

    consistency = sections["manifest_consistency"]
    set_level("manifest_consistency", "rows that disagree with cases.jsonl or the spec (case, labels, patient, view, "
              "size, split)", consistency, consistency.get("value"), 0, consistency["status"])
    table["manifest_consistency"].update(failed=consistency.get("value"), checked=consistency.get("rows"), unit="rows")
    for name, description in (("spec_fidelity", "lowest 1 - TVD of an attribute or pair against the plan of the "
                                                "cases built"),
                              ("duplicates", "fraction of images in a near-duplicate pair"),
                              ("diversity", "mean MS-SSIM within a finding cell (lower is more diverse)")):
        section = sections[name]
        set_level(name, description, section, section.get("value"), section.get("threshold"), section["status"])
    ref = sections["reference"]
    for name, key, threshold, higher in (("fid", "fid", thresholds.max_fid, False),
                                         ("kid", "kid", thresholds.max_kid, False),
                                         ("precision", "precision", thresholds.min_precision, True),
                                         ("recall", "recall", thresholds.min_recall, True),
                                         ("coverage", "coverage", thresholds.min_coverage, True)):
        value = ref.get(key) if ref["status"] == "done" else None
        description = {"fid": "Fréchet distance to the reference set's features",
                       "kid": "kernel (MMD²) distance to the reference set's features",
                       "precision": "share of generated images inside the reference manifold",
                       "recall": "share of reference images inside the generated manifold",
                       "coverage": "share of reference neighbourhoods holding a generated image"}[name]
        status = _verdict(value, threshold, higher)
        set_level(name, description, ref if value is None else {}, value, threshold, status)
        if value is None:
            table[name]["reason"] = ref.get("reason") or ref.get("prdc_reason")
    aud = sections["auditor"]
    score = aud.get("label_fidelity_score")
    status = aud.get("label_fidelity_status", "skipped") if aud["status"] == "done" else "skipped"
    set_level("label_fidelity", "agreement of the auditor's predictions with the manifest's labels", aud, score,
              thresholds.min_label_fidelity, status)
    if status == "skipped" and aud["status"] == "done":
        table["label_fidelity"]["reason"] = aud.get("label_fidelity", {}).get("reason")
    if aud.get("applies") is False:  # reported, no verdict: see auditor_applies
        table["label_fidelity"].update(gating=False, reason=aud.get("applies_reason"))
    mem = sections["memorisation"]
    set_level("memorisation", "fraction of generated images closer to a training image than training images are "
              "to each other (1st percentile)", mem, mem.get("value"), mem.get("threshold"), mem["status"])
    return table


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


def _progress(total: int, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="qc", disable=not enabled or None, dynamic_ncols=True, file=sys.stderr)


def generated_checks(gate: Sequence[str]) -> tuple[str, ...]:
    """The gating checks that regenerating an image can fix."""
    return tuple(c for c in GENERATED_CHECKS if c in gate)


__all__ = ["QCError", "QCResult", "FeatureExtractor", "qc", "expected_distributions", "planned_distributions",
           "spec_fidelity_report", "manifest_consistency_report", "auditor_applies",
           "generated_checks"]

"""What qc reads: the output folder (manifest, spec, cases.jsonl), other image sets, features and the auditor.

Every path a manifest names must stay inside the output folder (:func:`check_paths`, refused with its rows before
anything is read); images are decoded within the limits of :mod:`synthmed.qc.checks`. The features and the
auditor's predictions are computed in batches as the images are read (:class:`Batcher`), so each file is read
once. :class:`CheckInputs` is what the set-level checks are given.

Example:
    >>> rows = read_manifest(Path("out/pneumonia"))  # doctest: +SKIP
    >>> check_paths(Path("out/pneumonia"), rows)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from .checks import (REGION_SIDE, ImageResult, box_downsample, decode_dicom, decode_png, pixel_stats, region_means,
                     stored_values)

STATE_DIR = ".synthmed"      # an output folder's run state: lock, run record, synthmed's record of its files
FEATURE_BATCH = 32


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


# ----------------------------------------------------------------------------- the output folder

def read_manifest(out: Path) -> list[dict]:
    """The rows of ``out``/manifest.csv; QCError saying why there are none (no folder of ours, a build running)."""
    from ..writers.manifest import read_part

    path = out / "manifest.csv"
    try:
        rows = read_part(path)
    except FileNotFoundError:
        raise _no_manifest(out) from None
    except (OSError, ValueError, csv.Error) as e:
        said = str(e).startswith(str(path))  # read_part's own message names the file (and the line)
        raise QCError(f"{e}" if said else f"{path} is not a manifest this synthmed version reads: {e}") from None
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


def check_paths(out: Path, rows: list[dict]) -> None:
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


def load_card_spec(out: Path):
    """The spec dataset_card.json holds (validated, its CT files not looked for); QCError where there is none."""
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


def read_cases(out: Path) -> tuple[dict[str, Any] | None, str | None]:
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


# ----------------------------------------------------------------------------- the auditor and features

# The shipped default model and its distilled fast student learned drr films: the drr auditor reads their images
DEFAULT_MODEL_IDS = ("synthmed-default", "synthmed-default-fast")


def shipped_films(rows: Sequence[Mapping[str, str]]) -> str:
    """Which shipped auditor reads these images: ``drr`` where most rows are drr films (the drr backend's, or the
    shipped default model's, which learned them), else ``phantom``."""
    drr = sum(1 for r in rows if (r.get("backend") or "") == "drr"
              or ((r.get("backend") or "") == "diffusion" and (r.get("model_id") or "") in DEFAULT_MODEL_IDS))
    return "drr" if rows and 2 * drr > len(rows) else "phantom"


def load_auditor(auditor, films: str = "phantom") -> tuple[Any, str | None]:
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


class AuditorEmbedding:
    """The auditor's embedding as a FeatureExtractor (the default one), for auditors that only ``embed``."""

    def __init__(self, auditor):
        self.auditor = auditor
        self.name = f"auditor:{getattr(auditor, 'name', None) or getattr(auditor, 'model_id', None) or 'shipped'}"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.auditor.embed(images), dtype=np.float64)


def import_extractor(text: str):
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


class Batcher:
    """Collects images into batches for the feature extractor and the auditor's predict.

    A failing extractor or auditor is recorded in ``errors`` (``features`` / ``auditor``), never raised: its
    sections are skipped with the reason, the other checks go on.
    """

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
        """Queue one image (float [H, W] in [0, 1]), resized to the batch shape; a full batch is run."""
        if not self.active:
            return
        if pixels.shape != self.shape:
            pixels = box_downsample(pixels, *self.shape) if pixels.shape[0] >= self.shape[0] else resize(pixels, self.shape)
        self.ids.append(case_id)
        self.pending.append(pixels.astype(np.float32, copy=False))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Run the extractor and the auditor on the queued images."""
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
        """Features [N, D] of the images in ``ids``' order; None without them."""
        if "features" in self.errors or not self.features:
            return None
        return np.concatenate(self.features, axis=0)

    def prediction(self):
        """The auditor's predictions of the images in ``ids``' order, joined; None without them."""
        if "auditor" in self.errors or not self.predictions:
            return None
        try:
            return _concat_predictions(self.predictions)
        except Exception as e:
            self.errors["auditor"] = f"{type(e).__name__}: {e}"
            return None


def resize(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear float32 copy of a 2-D image at ``shape`` (height, width), for images smaller than wanted."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
                      .resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


# ----------------------------------------------------------------------------- other image sets

@dataclass
class ImageSet:
    """A reference or training set, read once: stats, region means, features, thumbnails."""

    ids: list[str] = field(default_factory=list)
    features: np.ndarray | None = None
    features_error: str | None = None
    stats: list = field(default_factory=list)
    regions: list[dict[str, float]] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "path: why" of each image that could not be read
    findings: list[tuple[str, ...]] | None = None   # each read image's finding ids (in ids' order); None: no labels
    labels: str | None = None                       # where the labels came from, or why there are none


@dataclass(frozen=True)
class ListedImage:
    """One image a reference or training set lists: its id, its file, its finding ids (None: the set has no labels)."""

    image_id: str
    path: Path | None
    findings: tuple[str, ...] | None = None


def _image_path_column(rows: list[dict]) -> str | None:
    # file_name first: relative to the CSV's folder in a manifest.csv and in a split's metadata.csv (Hugging Face
    # imagefolder's convention), where png_path starts at the dataset folder above
    for column in ("file_name", "png_path", "path", "image", "dicom_path"):
        if rows and column in rows[0]:
            return column
    return None


def read_any_image(path: Path) -> tuple[np.ndarray, int] | None:
    """(stored integer pixels, full scale) of a PNG, DICOM or any Pillow-readable image; None if unreadable.

    The limits of :mod:`synthmed.qc.checks` hold here too: a file or a declared size beyond them is unreadable.
    """
    read = _any_image_or_why(path)
    return None if isinstance(read, str) else read


def _any_image_or_why(path: Path) -> tuple[np.ndarray, int] | str:
    """:func:`read_any_image`, or why it cannot be read."""
    from .checks import check_declared_size, read_limited

    try:
        data = read_limited(path)
    except (OSError, ValueError) as e:
        return getattr(e, "strerror", None) or str(e)
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
    except Exception as e:  # any decoder's failure is this file's, not the run's
        from PIL import UnidentifiedImageError

        if isinstance(e, UnidentifiedImageError):  # its message holds a memory address: not in a report
            return "not a PNG, DICOM or other image format Pillow reads"
        return _why(e, path)


def _why(e: Exception, path: Path) -> str:
    """An error's message on one line, without the path it may start with (the report names the path)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[len(str(path)):].lstrip(": ") or text if text.startswith(str(path)) else text


def read_reference_image(path: Path) -> tuple[np.ndarray, int] | str:
    """A reference or training image as a viewer shows it, as (stored integer pixels, full scale), or why it cannot
    be read. DICOM goes through :func:`synthmed.datasets.read_image` (Modality and VOI LUT, MONOCHROME1
    inverted), at 16 bits; PNG, JPEG and the rest as :func:`read_any_image` reads them."""
    from .checks import read_limited

    try:
        data = read_limited(path)  # the size limits of synthmed.qc.checks, before a decoder sees the file
    except (OSError, ValueError) as e:
        return getattr(e, "strerror", None) or str(e)
    if path.suffix.lower() in (".dcm", ".dicom") or data[128:132] == b"DICM":
        from ..datasets import DatasetError, read_image

        try:
            pixels = read_image(path)
        except (DatasetError, OSError, ValueError) as e:
            return _why(e, path)
        return np.round(np.clip(pixels, 0.0, 1.0) * 65535.0).astype(np.uint16), 65535
    return _any_image_or_why(path)


def image_list(manifest: Path) -> list[tuple[str, Path]]:
    """(image id, path) of every image a reference or training set lists: a synthmed-style manifest (CSV with
    png_path / file_name / path / image / dicom_path, relative to its folder), or a real dataset's folder or
    CSV in its own layout (CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14: :func:`synthmed.datasets.read_dataset`)."""
    return [(image.image_id, image.path) for image in listed_images(manifest)[0]]


def listed_images(manifest: Path, uncertain: str = "ignore") -> tuple[list[ListedImage], str]:
    """The images a reference or training set lists (as :func:`image_list`), each with its finding ids, and where
    the labels came from (or why there are none).

    A manifest's labels are its ``findings`` column (``finding:location:severity|...``); a real dataset's are its
    records' findings in synthmed's vocabulary, uncertain ones (-1) read by ``uncertain`` (``ignore``: the image
    is in neither group; ``positive``; ``negative``; :func:`synthmed.datasets.read_dataset`).
    """
    rows = []
    if not manifest.is_dir():
        try:
            with open(manifest, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise QCError(f"cannot read the manifest {manifest}: {e}") from None
        if not rows and reader.fieldnames:
            raise QCError(f"{manifest} has a header ({', '.join(reader.fieldnames[:5])}) and no rows: it lists no "
                          "images")
    column = _image_path_column(rows)
    if column is not None:
        from .checks import inside_folder

        base, bad = manifest.parent.resolve(), []
        for n, row in enumerate(rows, start=1):  # held to its folder as the output manifest is (check_paths)
            named = column if row.get(column) else "dicom_path"
            rel = row.get(named) or ""
            if rel and not (inside_folder(rel) and (manifest.parent / rel).resolve().is_relative_to(base)):
                bad.append(f"row {n}" + (f" ({row['case_id']})" if row.get("case_id") else "") + f" {named} {rel!r}")
        if bad:
            shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise QCError(f"{manifest} names images outside its folder {manifest.parent} (qc reads a reference or "
                          f"training set only inside its manifest's folder, and follows no link out of it): {shown}")
        labelled = "findings" in rows[0]
        out = []
        for n, row in enumerate(rows):
            rel = row.get(column) or row.get("dicom_path") or ""
            findings = finding_ids(row.get("findings") or "") if labelled else None
            out.append(ListedImage(row.get("case_id") or rel or str(n), manifest.parent / rel if rel else None,
                                   findings))
        return out, ("the manifest's findings column" if labelled else "the manifest has no findings column")
    from ..datasets import DatasetError, read_dataset

    try:
        dataset = read_dataset(manifest, uncertain=uncertain)
    except DatasetError as e:
        raise QCError(f"{manifest} lists no images: it needs a png_path, file_name, path or dicom_path column, or "
                      f"the layout of CheXpert, MIMIC-CXR-JPG or NIH ChestX-ray14 ({e})") from None
    return ([ListedImage(record.source_id, Path(record.path), tuple(dict.fromkeys(record.finding_ids)))
             for record in dataset.records],
            f"the {dataset.kind} labels in synthmed's vocabulary (uncertain labels: {dataset.uncertain_policy})")


def finding_ids(findings_field: str) -> tuple[str, ...]:
    """The finding ids of a manifest's ``findings`` field, each once, in order.

    Example:
        >>> finding_ids("pleural_effusion:left:mild|cardiomegaly::|pleural_effusion:right:mild")
        ('pleural_effusion', 'cardiomegaly')
    """
    return tuple(dict.fromkeys(part.split(":")[0] for part in findings_field.split("|") if part.split(":")[0]))


def read_image_set(manifest: Path, shape: tuple[int, int], extractor, *, keep_thumbs: bool,
                   uncertain: str = "ignore") -> ImageSet:
    """Read every image of a reference or training set (see :func:`listed_images`), each as a viewer shows it."""
    listed, labels = listed_images(manifest, uncertain)
    labelled = bool(listed) and all(image.findings is not None for image in listed)
    found = ImageSet(findings=[] if labelled else None, labels=labels)
    batcher = Batcher(shape, extractor=extractor)
    for image in listed:
        image_id, path = image.image_id, image.path
        read = read_reference_image(path) if path is not None else "no path"
        if isinstance(read, str):
            found.unreadable.append(f"{path if path is not None else image_id}: {read}")
            continue
        stored, full = read
        pixels = stored.astype(np.float32) * np.float32(1.0 / full)
        found.ids.append(image_id)
        if found.findings is not None:
            found.findings.append(image.findings)
        found.stats.append(pixel_stats(stored, full))
        found.regions.append(region_means(box_downsample(pixels, REGION_SIDE)))
        if keep_thumbs:
            found.thumbs.append(box_downsample(pixels, REGION_SIDE))
        batcher.add(image_id, pixels)
    batcher.flush()
    found.features = batcher.feature_matrix()
    found.features_error = batcher.errors.get("features")
    if not found.ids:
        raise QCError(f"none of the {len(listed)} images {manifest} lists could be read: "
                      + "; ".join(found.unreadable[:3]) + ("; ..." if len(found.unreadable) > 3 else ""))
    return found


# ----------------------------------------------------------------------------- what the set-level checks read

@dataclass
class CheckInputs:
    """What :func:`synthmed.qc.run.qc` gives each family's ``section`` and ``table_rows``.

    A section may flag the images it concerns (``inputs.by_id[case_id].fail(check, message)``); what a field
    holds is kept only where a registered check ``needs`` it (:data:`synthmed.qc.registry.NEEDS`).
    """

    out: Path
    spec: Any                                   # the card's DatasetSpec
    config: Any                                 # the QCSpec in force: gate, thresholds, dciodvfy_sample
    rows: list[dict]                            # manifest rows
    results: list[ImageResult]                  # per-image results, in the rows' order
    full: bool                                  # False: the cheap run at the end of generate
    features: np.ndarray | None = None          # [N, D] of the images in feature_ids
    feature_ids: list[str] = field(default_factory=list)   # images read by the extractor and the auditor, in order
    extractor_name: str | None = None
    extractor_why: str | None = None            # why there are no features
    prediction: Any = None                      # the auditor's reading of the images in feature_ids
    auditor: Any = None                         # the auditor object, None without one
    auditor_why: str | None = None              # why there is no prediction
    auditor_failed: bool = False                # the auditor raised (its reason is auditor_why)
    shipped_auditor: bool = False               # the auditor is the shipped one (qc's auditor=True)
    films: str = "phantom"                      # which shipped auditor reads these images (shipped_films)
    reference_set: ImageSet | None = None
    training_set: ImageSet | None = None
    cases: dict[str, Any] | None = None         # cases.jsonl by case id
    cases_why: str | None = None                # why cases is None
    diversity_groups: dict[str, list[str]] = field(default_factory=dict)   # finding cell -> case ids for MS-SSIM
    diversity_images: dict[str, np.ndarray] = field(default_factory=dict)  # case id -> image, <= 128 a side
    small_copies: dict[str, np.ndarray] = field(default_factory=dict)      # case id -> 64 x 64 copy

    @property
    def thresholds(self):
        return self.config.thresholds

    @property
    def gate(self) -> set[str]:
        return set(self.config.gate)

    @cached_property
    def by_id(self) -> dict[str, ImageResult]:
        return {r.case_id: r for r in self.results}

    @cached_property
    def rows_by_id(self) -> dict[str, dict]:
        return {r["case_id"]: r for r in self.rows}

"""qc(): read an output folder, run every registered check, write qc_report.json and report.html, fill the manifest.

The per-image checks read each file once (:func:`synthmed.qc.checks.check_row`); everything
set-level works from what that pass kept: histogram figures, region means, 32 x 32 thumbnails,
a few images per finding cell, and features when a feature extractor is at hand. Then every family of
checks in :mod:`synthmed.qc.registry`, in its order, computes its section of the report (flagging the images
it concerns) and its rows of the check table; a gating row that fails fails the run.

Where each check lives (one module per family; the registry names them):

- the per-image checks (``readable``, ``size``, ``bit_depth``, ``nan``, ``blank``, ``saturated``, ``sha256``,
  ``dicom_match``): :mod:`synthmed.qc.checks`.
- ``intensity``: region means and histogram quantiles within mean ± k·σ of a reference set (MAISI's per-organ
  check; fixed lung and mediastinum boxes stand in for organ masks): :mod:`synthmed.qc.intensity`.
- ``dciodvfy``: dicom3tools on a sample of the DICOM images, SRs and SEGs: :mod:`synthmed.qc.dciodvfy`.
- ``manifest_consistency``: every row says what ``cases.jsonl`` (the build's plan) says of its case, and what the
  spec allows (splits, sexes, views, ages, finding cells, image size, spec hash):
  :mod:`synthmed.qc.manifest_consistency`.
- ``spec_fidelity``: per attribute (finding, location, severity, sex, view, split, age band) and per pair,
  TVD + chi-square + a 0-1 score (``1 - TVD``) against the plan: :mod:`synthmed.qc.spec_fidelity`.
- ``duplicates``: residual dHash pairs and embedding pairs, each confirmed by the residuals' cosine:
  :mod:`synthmed.qc.duplicates`.
- ``diversity``: mean MS-SSIM among images of one finding cell (RoentGen's intra-prompt MS-SSIM):
  :mod:`synthmed.qc.diversity`.
- ``fid``, ``kid``, ``precision``, ``recall``, ``coverage``: against a reference manifest's images (or a real
  dataset's), over the whole set and, where the reference carries labels, per finding:
  :mod:`synthmed.qc.reference_metrics`. A standard feature space comes from a model folder:
  :mod:`synthmed.qc.feature_folder`.
- ``label_fidelity`` and an IS-style figure, from the auditor's readings: :mod:`synthmed.qc.label_fidelity`.
- ``memorisation``: nearest training images, from a training manifest: :mod:`synthmed.qc.memorisation`.

What qc reads and writes (docs/safety.md): every path a manifest names must stay inside the output folder
(refused, with its row, before anything is read: :mod:`synthmed.qc.inputs`); images are decoded within the
limits of :mod:`synthmed.qc.checks`. qc writes qc_report.json, report.html, the manifest's qc columns and the
split metadata.csv files only where synthmed's record (:mod:`synthmed.ledger`) says they are synthmed's, or
where no file is; in a folder it cannot write it still reports, to stdout or to ``report_dir``
(:mod:`synthmed.qc.outputs`).

Example:
    >>> result = qc("out/pneumonia")  # doctest: +SKIP
    >>> result.passed, result.report_path.name  # doctest: +SKIP
    (True, 'qc_report.json')
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .. import __version__
from .check_table import section_rows
from .checks import REGION_SIDE, Expected, ImageResult, PixelLimits, box_downsample, check_row
from .diversity import DIVERSITY_PER_GROUP, DIVERSITY_SIDE
from .feature_folder import load_feature_folder, looks_like_folder
from .inputs import (AuditorEmbedding, Batcher, CheckInputs, FeatureExtractor, QCError, check_paths, import_extractor,
                     load_auditor, load_card_spec, read_any_image, read_cases, read_image_set, read_manifest, resize,
                     shipped_films)
from .intensity import histogram_summary
from .outputs import Outputs
from .registry import CHECK_NAMES, FAMILIES, needed, regenerable_in, unknown_checks
from .report import MAX_FAILURE_THUMBS, jsonable
from .spec_fidelity import finding_labels

# Re-exported (named in __all__): what synthmed.qc.run defined before each check had a module of its own
from .checks import (CHECKS, GENERATED_CHECKS, PER_IMAGE_CHECKS, REGIONS, decode_dicom, decode_png,
                     pixel_stats, region_means, stored_values)
from .dciodvfy import dciodvfy_sample
from .duplicates import duplicates_report
from .inputs import FEATURE_BATCH, STATE_DIR
from .intensity import intensity_report
from .label_fidelity import (LABEL_FIDELITY_MIN_IMAGES, MIN_READ_SENSITIVITY, NO_VERDICT_YET, SHIPPED_AUDITOR_DOMAIN,
                             SHIPPED_AUDITOR_DOMAINS, auditor_applies, auditor_report)
from .manifest_consistency import MAX_PROBLEMS, manifest_consistency_report
from .memorisation import memorisation_report
from .outputs import LEDGER_KEY, REPORT_HTML, REPORT_JSON
from .reference_metrics import reference_report
from .registry import SET_CHECKS
from .spec_fidelity import ATTRIBUTES, PAIRS, expected_distributions, planned_distributions, spec_fidelity_report

REPORT_FORMAT = 1
DISPLAY_SIDE = 96            # thumbnails in report.html
ALL_CHECKS = CHECK_NAMES     # every word qc.gate may hold, in the report's order


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


def check_rows(out: str | Path, spec, rows: Iterable[Mapping[str, str]]) -> dict[str, ImageResult]:
    """The per-image checks of manifest rows, under the spec's ``qc:`` thresholds, by case id.

    Where the images are written (a Ray worker, after its chunk), so the final :func:`qc` of a
    scaled-out build does not read every file back on one machine.

    Example:
        >>> results = check_rows("out/pneumonia", spec, read_part(part_path))  # doctest: +SKIP
    """
    limits, expected = PixelLimits.from_thresholds(spec.qc.thresholds), Expected.from_spec(spec)
    return {row["case_id"]: check_row(Path(out), row, expected, limits)[0] for row in rows}


def qc(out: str | Path, *, reference: str | Path | None = None, training_manifest: str | Path | None = None,
       config=None, feature_extractor: FeatureExtractor | str | os.PathLike | None = None, auditor: Any = True,
       full: bool = True, dciodvfy_sample: int | None = None, write: bool = True, lock: bool = True,
       progress: bool = False, precomputed: Mapping[str, ImageResult] | None = None,
       report_dir: str | Path | None = None, reference_uncertain: str = "ignore") -> QCResult:
    """Check a synthmed output folder and write its quality report.

    Args:
        out: the output folder (manifest.csv, dataset_card.json, images/, dicom/), or the BuildResult of
            :func:`synthmed.build.generate`.
        reference: a manifest (CSV with png_path, file_name or path, relative to its folder) of reference
            images, or a real dataset's folder or CSV (CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14): the intensity
            bands are fitted on them and FID / KID / PRDC computed against them, per finding too where the
            reference has labels (a manifest's ``findings`` column, a real dataset's labels).
        training_manifest: the manifest (or a real dataset's folder or CSV) of the images the generator was
            trained on, for the memorisation audit.
        config: a ``QCSpec`` (thresholds, gate); default: the spec's ``qc:`` section (from dataset_card.json).
        feature_extractor: for FID / KID / PRDC, embedding duplicates and memorisation: an object with ``name``
            and ``__call__(images float32 [N, H, W] in [0, 1]) -> [N, D]``, ``"module:attribute"``, or the path
            of a model folder (a torchvision or timm model in safetensors: :mod:`synthmed.qc.feature_folder`);
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
        reference_uncertain: how a real dataset's uncertain labels (-1) count in the per-finding figures:
            ``ignore`` (in neither group), ``positive`` or ``negative`` (:func:`synthmed.datasets.read_dataset`).

    Raises:
        QCError: not an output folder, a manifest naming files outside it, an unreadable reference, a folder
            in use (``exit_code`` 2 or 1).

    Example:
        >>> result = qc("out/pneumonia", reference="real/manifest.csv")  # doctest: +SKIP
    """
    started = time.perf_counter()
    # 1. Check inputs
    if hasattr(out, "manifest") and isinstance(getattr(out, "out", None), Path):  # generate's BuildResult
        out = out.out
    _check_arguments(out=out, reference=reference, training_manifest=training_manifest, report_dir=report_dir,
                     feature_extractor=feature_extractor, auditor=auditor, full=full, write=write, lock=lock,
                     progress=progress, dciodvfy_sample=dciodvfy_sample, precomputed=precomputed,
                     reference_uncertain=reference_uncertain)
    out = Path(out)
    if not out.is_dir():
        raise QCError(f"{out} is not a folder" if out.exists() else f"{out} does not exist")
    if report_dir is not None and write:
        inside = Path(report_dir).resolve()
        if inside != out.resolve() and inside.is_relative_to(out.resolve()):
            raise QCError(f"the report folder {report_dir} (--report-dir, report_dir= in Python) is inside {out}; "
                          f"a report folder leaves {out} untouched: choose one outside it (or {out} itself)")
    rows = read_manifest(out)
    check_paths(out, rows)
    spec = load_card_spec(out)
    config = config if config is not None else spec.qc
    if dciodvfy_sample is not None:
        import dataclasses

        if dciodvfy_sample < 0:
            raise QCError(f"dciodvfy_sample must be 0 or more, got {dciodvfy_sample}")
        config = dataclasses.replace(config, dciodvfy_sample=int(dciodvfy_sample))
    unknown = unknown_checks(config.gate)
    if unknown:
        raise QCError(f"unknown check(s) in gate: {', '.join(unknown)} (known: {', '.join(ALL_CHECKS)})")
    paths = {}
    for name, value in (("reference", reference), ("training manifest", training_manifest)):
        if value is not None:
            path = Path(value)
            if not (path.is_file() or path.is_dir()):
                raise QCError(f"the {name} {path} is not a file or a dataset folder")
            paths[name] = path
    if isinstance(feature_extractor, (str, os.PathLike)):
        text = os.fspath(feature_extractor)
        feature_extractor = (load_feature_folder(text) if isinstance(feature_extractor, os.PathLike)
                             or looks_like_folder(text) else import_extractor(text))
    limits, expected = PixelLimits.from_thresholds(config.thresholds), Expected.from_spec(spec)
    if precomputed and (limits != PixelLimits.from_thresholds(spec.qc.thresholds)):
        precomputed = None  # made under the spec's own thresholds, not this config's
    outputs = Outputs(out, Path(report_dir) if report_dir is not None else None, write=write, lock=lock)
    try:
        return _run(out, rows, spec, config, limits, expected, paths, feature_extractor, auditor, full, outputs,
                    progress, started, precomputed or {}, reference_uncertain)
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
    if extractor is not None and not isinstance(extractor, (str, os.PathLike)) and not callable(extractor):
        raise TypeError(f"feature_extractor must be None, 'module:attribute', a model folder or a callable with a "
                        f"name, got {name_of(extractor)}")
    from ..datasets import UNCERTAIN_POLICIES

    if args["reference_uncertain"] not in UNCERTAIN_POLICIES:
        raise TypeError(f"reference_uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, "
                        f"got {name_of(args['reference_uncertain'])}")
    sample = args["dciodvfy_sample"]
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int)):
        raise TypeError(f"dciodvfy_sample must be None or a whole number, got {name_of(sample)}")
    if args["precomputed"] is not None and not isinstance(args["precomputed"], Mapping):
        raise TypeError(f"precomputed must be None or a mapping of case id to result, got "
                        f"{name_of(args['precomputed'])}")


def _run(out, rows, spec, config, limits, expected, paths, feature_extractor, auditor, full, outputs, progress,
         started, precomputed, reference_uncertain) -> QCResult:
    thresholds = config.thresholds
    notes: list[str] = []
    # 2. The auditor and the feature extractor. The cheap run computes features only for a reference or a
    #    training set (FID, memorisation), and never the auditor's predictions.
    wants_features = (full or bool(paths)) and needed("features")
    wants_auditor = full or (wants_features and feature_extractor is None)
    films = shipped_films(rows)
    auditor_obj, auditor_why = load_auditor(auditor if wants_auditor else False, films)
    extractor = feature_extractor if wants_features else None
    extractor_why = None if wants_features else "features are computed by the full run, or with a reference"
    if extractor is None and wants_features and auditor_obj is not None:
        # the Auditor is itself a FeatureExtractor (name + __call__ = embed); wrap objects that only embed
        extractor = (auditor_obj if callable(auditor_obj) and hasattr(auditor_obj, "name")
                     else AuditorEmbedding(auditor_obj) if hasattr(auditor_obj, "embed") else None)
    if extractor is None and wants_features:
        extractor_why = (f"no feature extractor: the default is the auditor's embedding, and {auditor_why}"
                         if auditor_why else "no feature extractor")
    extractor_name = getattr(extractor, "name", type(extractor).__name__) if extractor is not None else None
    predictor = auditor_obj if full and needed("prediction") else None
    if not full and auditor is not False:
        auditor_why = ("not run in the cheap checks (qc --fast, and at the end of generate); run `synthmed qc OUT` "
                       "for the full report")
    grid, groups = _selection(rows, config.samples_per_cell)
    shown = {cid for ids in grid.values() for cid in ids}
    diverse = {cid for ids in groups.values() for cid in ids} if full and needed("diversity_images") else set()
    batcher = Batcher((expected.height, expected.width), extractor=extractor, auditor=predictor)

    # 3. The per-image pass: each file read once
    results: list[ImageResult] = []
    thumbs: dict[str, np.ndarray] = {}
    diversity_images: dict[str, np.ndarray] = {}
    small_copies: dict[str, np.ndarray] = {}  # 64 x 64 copies for the pixel-space memorisation audit
    keep_small = "training manifest" in paths and extractor is not None and needed("small_copies")
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
    features = batcher.feature_matrix()
    if batcher.errors.get("features"):
        extractor_why = f"the feature extractor failed ({batcher.errors['features']})"
    if batcher.errors.get("auditor"):
        auditor_why = f"the auditor failed ({batcher.errors['auditor']})"
    prediction = batcher.prediction()  # a failure to join its batches is recorded in errors; auditor_why stays

    # 4. Other image sets, and the build's own record of its plan
    shape = (expected.height, expected.width)
    reference_set = (read_image_set(paths["reference"], shape, extractor, keep_thumbs=False,
                                    uncertain=reference_uncertain)
                     if "reference" in paths and needed("reference_set") else None)
    training_set = (read_image_set(paths["training manifest"], shape, extractor, keep_thumbs=True)
                    if "training manifest" in paths and needed("training_set") else None)
    cases, cases_why = read_cases(out) if needed("cases") else (None, None)

    # 5. Set-level checks: each family of the registry, in its order, computes its section (and flags images)
    inputs = CheckInputs(out=out, spec=spec, config=config, rows=rows, results=results, full=full,
                         features=features, feature_ids=batcher.ids, extractor_name=extractor_name,
                         extractor_why=extractor_why, prediction=prediction, auditor=auditor_obj,
                         auditor_why=auditor_why, auditor_failed=bool(batcher.errors.get("auditor")),
                         shipped_auditor=auditor is True, films=films, reference_set=reference_set,
                         training_set=training_set, cases=cases, cases_why=cases_why, diversity_groups=groups,
                         diversity_images=diversity_images, small_copies=small_copies)
    sections: dict[str, dict] = {family.section: family.load().section(inputs) for family in FAMILIES
                                 if family.section is not None}

    # 6. Thumbnails of images flagged at set level (intensity, duplicates, ...), read again: only those shown
    wanted = [r.case_id for r in results if r.flags][:MAX_FAILURE_THUMBS]
    wanted += [i for p in sections["duplicates"].get("pairs", [])[:24] for i in (p["a"], p["b"])]
    _add_thumbs(out, inputs.rows_by_id, [i for i in dict.fromkeys(wanted) if i not in thumbs], thumbs)

    # 7. Verdicts
    checks = _check_table(sections, inputs)
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
        "histograms": histogram_summary(results, reference_set),
        "feature_extractor": extractor_name, "feature_extractor_reason": extractor_why,
        "reference": str(paths["reference"]) if "reference" in paths else None,
        "training_manifest": str(paths["training manifest"]) if "training manifest" in paths else None,
        "notes": notes,
    }
    for what, found in (("reference", reference_set), ("training", training_set)):
        unread = found.unreadable if found is not None else []
        if unread:
            report["notes"].append(f"{len(unread)} {what} image(s) could not be read, left out: "
                                   + "; ".join(unread[:10]) + (f"; and {len(unread) - 10} more" if len(unread) > 10
                                                               else ""))
    report = jsonable(report)

    # 8. Outputs
    report_path, html_path = outputs.write(report, thumbs, grid, rows, statuses, flagged)
    return QCResult(out=out, passed=passed, report=report, failed_checks=failed_gates, flagged=flagged,
                    report_path=report_path, html_path=html_path, seconds=time.perf_counter() - started,
                    per_image_seconds=per_image, not_written=tuple(outputs.not_written))


def _check_table(sections: Mapping[str, dict], inputs: CheckInputs) -> dict[str, dict]:
    """One row per check, in the registry's order: what it tests, whether it gates, its status, figures, limit.

    A family's module gives its rows (``table_rows``); without one, each check's row is its section's status,
    value and threshold.
    """
    rows: dict[str, dict] = {}
    for family in FAMILIES:
        module = family.load()
        section = sections[family.section] if family.section is not None else None
        if hasattr(module, "table_rows"):
            rows.update(module.table_rows(section, inputs))
        else:
            rows.update(section_rows(family.checks, section, inputs.gate))
    return {name: rows[name] for name in CHECK_NAMES}


def _selection(rows: list[dict], samples_per_cell: int) -> tuple[dict[tuple, list[str]], dict[str, list[str]]]:
    """Which images the report shows per finding x severity, and which feed the diversity check (first in order)."""
    grid: dict[tuple, list[str]] = {}
    groups: dict[str, list[str]] = {}
    for row in rows:
        finding, _, severity = finding_labels(row.get("findings", ""))
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
    small = box_downsample(pixels, *size) if scale <= 1 else resize(pixels, size)
    return np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)


def _add_thumbs(out: Path, rows_by_id: Mapping[str, dict], case_ids: Iterable[str], thumbs: dict) -> None:
    for case_id in case_ids:
        row = rows_by_id.get(case_id, {})
        rel = row.get("png_path") or row.get("dicom_path")
        read = read_any_image(out / rel) if rel else None
        if read is not None:
            stored, full = read
            thumbs[case_id] = _display_thumb(stored.astype(np.float32) * np.float32(1.0 / full))


def _progress(total: int, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="qc", disable=not enabled or None, dynamic_ncols=True, file=sys.stderr)


def generated_checks(gate: Sequence[str]) -> tuple[str, ...]:
    """The gating checks that regenerating an image can fix (:data:`synthmed.qc.registry.REGENERABLE_CHECKS`)."""
    return regenerable_in(gate)


__all__ = ["QCError", "QCResult", "FeatureExtractor", "qc", "expected_distributions", "planned_distributions",
           "spec_fidelity_report", "manifest_consistency_report", "auditor_applies",
           "generated_checks",
           # re-exported from the modules that own them now
           "ALL_CHECKS", "ATTRIBUTES", "CHECKS", "FEATURE_BATCH", "GENERATED_CHECKS", "LABEL_FIDELITY_MIN_IMAGES",
           "LEDGER_KEY", "MAX_PROBLEMS", "MIN_READ_SENSITIVITY", "NO_VERDICT_YET", "PAIRS", "PER_IMAGE_CHECKS",
           "REGIONS", "REPORT_HTML", "REPORT_JSON", "SET_CHECKS", "SHIPPED_AUDITOR_DOMAIN", "SHIPPED_AUDITOR_DOMAINS",
           "STATE_DIR", "auditor_report", "check_rows", "dciodvfy_sample", "decode_dicom", "decode_png",
           "duplicates_report", "intensity_report", "memorisation_report", "pixel_stats", "reference_report",
           "region_means", "shipped_films", "stored_values"]

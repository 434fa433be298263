"""The ``fid``, ``kid``, ``precision``, ``recall`` and ``coverage`` checks: distances to a reference set's features.

Computed on the feature extractor's features (by default the shipped auditor's embedding; ``--features`` a model
folder for a standard feature space, :mod:`synthmed.qc.feature_folder`) of the generated images and of the
reference set's (``--reference``: a manifest, or a real dataset's folder or CSV). Each gives a verdict only where
the spec sets its limit (``qc.thresholds.max_fid``, ``max_kid``, ``min_precision``, ``min_recall``,
``min_coverage``); otherwise its figure is reported (``info``).

Where the reference carries labels (a manifest's ``findings`` column, a real dataset's labels in synthmed's
vocabulary), the same figures are computed per finding too (``per_finding``): the generated images with a finding
against the reference images with it. An image counts under each finding it has and each finding above one in
the vocabulary (a nodule also under ``lung_lesion``, as CheXpert labels it). A finding is compared only where
both sides hold at least :data:`MIN_IMAGES_PER_FINDING` images; the others are listed with why. The per-finding
figures are reported, never gated.

Example:
    >>> section = reference_report(features, reference_set, "auditor:shipped", spec.qc.thresholds, None)  # doctest: +SKIP
    >>> section["fid"], section["per_finding"]["findings"]["pneumonia"]["fid"]  # doctest: +SKIP
    (12.3, 20.1)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .check_table import set_row, verdict
from .inputs import CheckInputs, ImageSet, finding_ids
from .registry import get_family

# check -> (its key in the section, whether a higher figure is better)
FIGURES = {"fid": ("fid", False), "kid": ("kid", False), "precision": ("precision", True),
           "recall": ("recall", True), "coverage": ("coverage", True)}
# Fewest images of a finding on each side for its own figures: PRDC's k = 5 neighbourhoods need more than 5, and
# below about 20 the covariance behind FID is too noisy to rank findings by (FID's bias falls as 1/N).
MIN_IMAGES_PER_FINDING = 20
PRDC_K = 5


def reference_report(gen: np.ndarray | None, ref: ImageSet | None, extractor_name: str | None,
                     thresholds, why_no_features: str | None) -> dict:
    """FID, KID and precision / recall / density / coverage of the generated features against the reference's."""
    if ref is None:
        return {"status": "skipped", "reason": "no reference set given (--reference MANIFEST)"}
    if gen is None or ref.features is None:
        return {"status": "skipped", "reason": why_no_features or ref.features_error or "no features"}
    n_gen, n_ref = gen.shape[0], ref.features.shape[0]
    out: dict[str, Any] = {"status": "done", "feature_extractor": extractor_name, "n_generated": n_gen,
                           "n_reference": n_ref, "dimensions": int(gen.shape[1])}
    if min(n_gen, n_ref) < 2:
        return {**out, "status": "skipped", "reason": f"FID needs at least 2 images per set, got {n_gen} and {n_ref}"}
    out.update(set_figures(gen, ref.features))
    if n_gen < 1000:
        out["note"] = f"FID and KID are biased upwards at small N ({n_gen} generated images); compare sets of equal size"
    return out


def set_figures(gen: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """FID, KID (with its spread) and, above :data:`PRDC_K` images a side, precision / recall / density / coverage
    of generated features [N_gen, D] against reference features [N_ref, D] (at least 2 rows each)."""
    from .metrics import fid_from_features, kid_from_features, precision_recall_density_coverage

    n_gen, n_ref = gen.shape[0], ref.shape[0]
    out: dict[str, Any] = {"fid": fid_from_features(ref, gen, method="eigh" if gen.shape[1] > 64 else "sqrtm")}
    out["kid"], out["kid_std"] = kid_from_features(ref, gen, subset_size=min(100, n_gen, n_ref))
    if min(n_gen, n_ref) > PRDC_K:
        out.update(precision_recall_density_coverage(ref, gen, k=PRDC_K))
    else:
        out["prdc_reason"] = (f"precision/recall/density/coverage need more than {PRDC_K} images per set, "
                              f"got {n_gen} and {n_ref}")
    return out


def with_ancestors(findings: Sequence[str], parents: Mapping[str, str | None]) -> tuple[str, ...]:
    """The findings and every finding above one in the vocabulary, each once.

    Example:
        >>> with_ancestors(["nodule", "pneumonia"], {"nodule": "lung_lesion", "lung_lesion": None})
        ('nodule', 'lung_lesion', 'pneumonia')
    """
    out: dict[str, None] = {}
    for finding in findings:
        seen = 0
        while finding and finding not in out and seen < 32:  # a vocabulary's tree is shallow; 32 stops a loop
            out[finding] = None
            finding, seen = parents.get(finding), seen + 1
    return tuple(out)


def per_finding_report(gen: np.ndarray, gen_findings: Sequence[Sequence[str]], ref: np.ndarray,
                       ref_findings: Sequence[Sequence[str]], *, labels: str | None = None,
                       parents: Mapping[str, str | None] | None = None, order: Sequence[str] = (),
                       min_images: int = MIN_IMAGES_PER_FINDING) -> dict[str, Any]:
    """The set-level figures per finding: generated images with it against reference images with it.

    Args:
        gen: float [N_gen, D] features of the generated images; ``gen_findings`` their finding ids, row by row.
        ref: float [N_ref, D] features of the reference images; ``ref_findings`` theirs.
        labels: where the reference's labels came from (reported).
        parents: finding -> the finding above it (the vocabulary's ``parent``); an image counts under both.
        order: findings in the order to report them (the vocabulary's); others follow, sorted.
        min_images: fewest images on each side for a finding's figures.

    Returns:
        ``{"status": "done", "min_images", "labels", "findings": {finding: {"n_generated", "n_reference", "fid",
        "kid", ...}}, "skipped": {finding: why}, "reference_only": [findings no generated image has]}``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> gen, ref = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
        >>> r = per_finding_report(gen, [["a"]] * 30 + [["b"]] * 10, ref, [["a"]] * 25 + [["c"]] * 15)
        >>> sorted(r["findings"]), r["skipped"]["b"], r["reference_only"]
        (['a'], '10 generated and 0 reference images; at least 20 of each are needed', ['c'])
    """
    parents = parents or {}
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for side, findings in ((0, gen_findings), (1, ref_findings)):
        for row, ids in enumerate(findings):
            for finding in with_ancestors(ids, parents):
                groups.setdefault(finding, ([], []))[side].append(row)
    rank = {finding: n for n, finding in enumerate(order)}
    names = sorted(groups, key=lambda f: (rank.get(f, len(rank)), f))
    out: dict[str, Any] = {"status": "done", "min_images": int(min_images), "labels": labels, "findings": {},
                           "skipped": {}, "reference_only": [f for f in names if not groups[f][0]]}
    for finding in names:
        gen_rows, ref_rows = groups[finding]
        if not gen_rows:
            continue
        n_gen, n_ref = len(gen_rows), len(ref_rows)
        if min(n_gen, n_ref) < min_images:
            out["skipped"][finding] = (f"{n_gen} generated and {n_ref} reference images; at least {min_images} of "
                                       "each are needed")
            continue
        out["findings"][finding] = {"n_generated": n_gen, "n_reference": n_ref,
                                    **set_figures(gen[gen_rows], ref[ref_rows])}
    return out


def _per_finding(inputs: CheckInputs) -> dict[str, Any]:
    """The ``per_finding`` part of the reference section, from the run's inputs."""
    from ..vocabulary import get_vocabulary

    ref = inputs.reference_set
    if ref.findings is None:
        return {"status": "skipped", "reason": f"the reference has no labels ({ref.labels})"}
    vocabulary = get_vocabulary()
    gen_findings = []
    for case_id in inputs.feature_ids:
        row = inputs.rows_by_id.get(case_id, {})
        gen_findings.append(finding_ids(row.get("findings") or ""))
    return per_finding_report(inputs.features, gen_findings, ref.features, ref.findings, labels=ref.labels,
                              parents={k: f.parent for k, f in vocabulary.findings.items()},
                              order=list(vocabulary.findings), min_images=MIN_IMAGES_PER_FINDING)


def section(inputs: CheckInputs) -> dict:
    """The ``reference`` section (skipped without a reference set or features)."""
    out = reference_report(inputs.features, inputs.reference_set, inputs.extractor_name, inputs.thresholds,
                           inputs.extractor_why)
    if out["status"] == "done":
        out["per_finding"] = _per_finding(inputs)
    return out


def table_rows(section: dict, inputs: CheckInputs) -> dict[str, dict]:
    """One row per figure: its verdict against the spec's limit, ``info`` without one, ``skipped`` without it."""
    rows = {}
    for check in get_family("reference").checks:
        key, higher = FIGURES[check.name]
        value = section.get(key) if section["status"] == "done" else None
        threshold = getattr(inputs.thresholds, check.threshold)
        status = verdict(value, threshold, higher)
        rows[check.name] = set_row(check, section if value is None else {}, value, threshold, status, inputs.gate)
        if value is None:
            rows[check.name]["reason"] = section.get("reason") or section.get("prdc_reason")
    return rows

"""The ``fid``, ``kid``, ``precision``, ``recall`` and ``coverage`` checks: distances to a reference set's features.

Computed on the feature extractor's features (by default the shipped auditor's embedding) of the generated
images and of the reference manifest's (``--reference``). Each gives a verdict only where the spec sets its limit
(``qc.thresholds.max_fid``, ``max_kid``, ``min_precision``, ``min_recall``, ``min_coverage``); otherwise its
figure is reported (``info``).

Example:
    >>> section = reference_report(features, reference_set, "auditor:shipped", spec.qc.thresholds, None)  # doctest: +SKIP
    >>> section["fid"], section["precision"]  # doctest: +SKIP
    (12.3, 0.81)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .check_table import set_row, verdict
from .inputs import CheckInputs, ImageSet
from .registry import get_family

# check -> (its key in the section, whether a higher figure is better)
FIGURES = {"fid": ("fid", False), "kid": ("kid", False), "precision": ("precision", True),
           "recall": ("recall", True), "coverage": ("coverage", True)}


def reference_report(gen: np.ndarray | None, ref: ImageSet | None, extractor_name: str | None,
                     thresholds, why_no_features: str | None) -> dict:
    """FID, KID and precision / recall / density / coverage of the generated features against the reference's."""
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


def section(inputs: CheckInputs) -> dict:
    """The ``reference`` section (skipped without a reference set or features)."""
    return reference_report(inputs.features, inputs.reference_set, inputs.extractor_name, inputs.thresholds,
                            inputs.extractor_why)


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

"""The ``memorisation`` check: generated images closer to a training image than training images are to each other.

The nearest training image of every generated one (``--training-manifest``), in the encoder's feature space and
in pixel space (64 x 64 copies), against the 1st percentile of the training set's own nearest-neighbour
distances (:func:`synthmed.qc.auditor.memorisation_audit`). The flagged images are named in ``qc_flags``;
the check fails above ``qc.thresholds.max_memorised_fraction`` of the set.

Example:
    >>> section = memorisation_report(features, ids, pixels, training_set, None, 0.05)  # doctest: +SKIP
    >>> section["status"], section["flagged"]  # doctest: +SKIP
    ('pass', [])
"""

from __future__ import annotations

import numpy as np

from .inputs import CheckInputs, ImageSet


def memorisation_report(gen: np.ndarray | None, gen_ids: list[str], gen_pixels: np.ndarray | None,
                        training: ImageSet | None, why_not: str | None, max_fraction: float) -> dict:
    """Nearest training image of every generated one (encoder and pixel space); fails above ``max_fraction`` flagged."""
    from .report import jsonable

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
    result = jsonable(result)
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


def section(inputs: CheckInputs) -> dict:
    """The ``memorisation`` section (skipped without a training manifest or features); flags the images found."""
    ids, copies = inputs.feature_ids, inputs.small_copies
    gen_pixels = np.stack([copies[i] for i in ids]) if inputs.training_set is not None and ids else None
    found = memorisation_report(inputs.features, ids, gen_pixels, inputs.training_set, inputs.extractor_why,
                                inputs.thresholds.max_memorised_fraction)
    for case_id in found.get("flagged", []):
        if case_id in inputs.by_id:
            inputs.by_id[case_id].fail("memorisation", "close to a training image")
    return found

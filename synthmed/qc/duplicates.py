"""The ``duplicates`` check: the share of images in a near-duplicate pair (``qc.thresholds.max_duplicate_fraction``).

A residual dHash (the 32 x 32 thumbnail minus the set's mean thumbnail, so the anatomy every chest film shares
does not make all images alike) finds candidate pairs, which count when their residuals' cosine is high too;
and pairs of centred embeddings with a high cosine, confirmed the same way. Both images of a pair are flagged
``duplicates``.

Example:
    >>> section = duplicates_report(results, None, [], spec.qc.thresholds)  # doctest: +SKIP
    >>> section["fraction"], section["pairs"][:1]  # doctest: +SKIP
    (0.03125, [{'a': 'case-0000003', 'b': 'case-0000004', 'method': 'dhash', 'hamming': 0, 'cosine': 1.0}])
"""

from __future__ import annotations

import numpy as np

from .checks import ImageResult
from .inputs import CheckInputs


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


def section(inputs: CheckInputs) -> dict:
    """The ``duplicates`` section; flags both images of every pair."""
    found = duplicates_report(inputs.results, inputs.features, inputs.feature_ids, inputs.thresholds)
    for pair in found.get("pairs", []):
        inputs.by_id[pair["a"]].fail("duplicates", f"near-duplicate of {pair['b']} ({pair['method']})")
        inputs.by_id[pair["b"]].fail("duplicates", f"near-duplicate of {pair['a']} ({pair['method']})")
    return found

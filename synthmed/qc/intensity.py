"""The ``intensity`` check: region means and histogram quantiles inside bands learned from a reference set.

MAISI's per-organ check, mean ± k·σ of a reference set's figures (``qc.thresholds.intensity_k``); fixed lung
and mediastinum boxes (:data:`synthmed.qc.checks.REGIONS`) stand in for organ masks. Without a reference set
there is nothing to learn from: skipped (a set's own spread is no standard: its findings alone move region
means). Images outside a band are flagged ``intensity``. Also here: the histograms report.html draws.

Example:
    >>> section = intensity_report(results, reference_set, k=3.0)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .check_table import flag_row
from .checks import REGIONS, ImageResult
from .inputs import CheckInputs, ImageSet
from .registry import get


def band(values: Sequence[float], k: float) -> tuple[float, float]:
    """mean ± k·σ (``ddof=1``), the rule of :func:`synthmed.qc.metrics.fit_intensity_bounds`, on per-image figures.

    The half-width is never below 0.01 of full scale, so a reference of near-identical images does not
    flag an image for quantisation noise.

    Example:
        >>> band([0.5, 0.5, 0.5], 3.0)
        (0.49, 0.51)
    """
    x = np.asarray(values, dtype=np.float64)
    spread = float(x.std(ddof=1)) if x.size > 1 else 0.0
    half = max(k * spread, 0.01)
    return float(x.mean()) - half, float(x.mean()) + half


def _figures(regions: Mapping[str, float], stats) -> dict[str, float]:
    return {**{f"region:{name}": value for name, value in regions.items()}, **stats.features()}


def intensity_report(results: list[ImageResult], reference: ImageSet | None, k: float) -> dict:
    """Bands per region mean and histogram quantile, learned from a reference set (MAISI's per-organ
    mean ± k·σ), and the images outside them (each flagged ``intensity``). Without a reference there is
    nothing to learn from: skipped (a set's own spread is no standard: its findings alone move region means)."""
    if reference is None:
        return {"status": "skipped", "k": k, "reason": "no reference set given (--reference MANIFEST): the bands "
                                                       "are learned from one"}
    fitted = [_figures(regions, s) for regions, s in zip(reference.regions, reference.stats)]
    if len(fitted) < 3:
        return {"status": "skipped", "k": k, "reason": f"needs at least 3 reference images, got {len(fitted)}"}
    names = list(fitted[0])
    bounds = {name: band([f[name] for f in fitted], k) for name in names}
    measured = [r for r in results if r.stats is not None and r.regions]
    outside = 0
    for r in measured:
        values = _figures(r.regions, r.stats)
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


def histogram_summary(results: list[ImageResult], reference: ImageSet | None) -> dict:
    """The set's mean histogram with its 5th and 95th percentiles per bin, and the reference's mean (report.html)."""
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


def section(inputs: CheckInputs) -> dict:
    """The ``intensity`` section; flags the images outside the bands."""
    return intensity_report(inputs.results, inputs.reference_set, inputs.thresholds.intensity_k)


def table_rows(section: dict, inputs: CheckInputs) -> dict[str, dict]:
    """Its row counts the images flagged, among those measured; skipped without a reference."""
    check = get("intensity")
    entry = flag_row(check, inputs.results, inputs.gate)
    entry.update(threshold=getattr(inputs.thresholds, check.threshold), checked=section.get("checked", 0))
    if section["status"] == "skipped":
        entry.update(status="skipped", reason=section.get("reason"))
    return {check.name: entry}

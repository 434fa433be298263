"""The ``diversity`` check: mean MS-SSIM among the images of one finding cell (``qc.thresholds.max_ms_ssim``).

RoentGen's intra-prompt MS-SSIM: the first :data:`DIVERSITY_PER_GROUP` images of each finding cell
(finding:location:severity; the prompt itself also varies with age, sex and view), at most
:data:`DIVERSITY_SIDE` pixels a side. Lower is more diverse. A full run only: the cheap run at the end of
generate skips it.

Example:
    >>> section = diversity_report({"pneumonia:right_lower_lobe:mild": images}, 0.95)  # doctest: +SKIP
    >>> section["status"], section["overall"]  # doctest: +SKIP
    ('pass', 0.41)
"""

from __future__ import annotations

import numpy as np

from .inputs import CheckInputs

DIVERSITY_PER_GROUP = 6      # images per finding cell for MS-SSIM: 15 pairs
DIVERSITY_SIDE = 128         # MS-SSIM on images no larger than this (4 scales)


def diversity_report(groups: dict[str, list[np.ndarray]], max_ms_ssim: float) -> dict:
    """Mean pairwise MS-SSIM per finding cell and over all of them; cells with fewer than two images are left out.

    Args:
        groups: finding cell -> float images [H, W] in [0, 1], all of one shape within a cell.
    """
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


def section(inputs: CheckInputs) -> dict:
    """The ``diversity`` section (skipped in the cheap run)."""
    if not inputs.full:
        return {"status": "skipped", "reason": "not run in the cheap checks (qc --fast, and at the end of generate); "
                                               "run `synthmed qc OUT` for it"}
    images = inputs.diversity_images
    return diversity_report({g: [images[c] for c in ids if c in images] for g, ids in inputs.diversity_groups.items()},
                            inputs.thresholds.max_ms_ssim)

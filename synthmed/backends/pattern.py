"""The ``pattern`` backend: a fast, deterministic test pattern with exact masks, for dry runs and tests.

``PatternBackend`` draws a smooth chest-like gradient with noise from each case's seed and a
bright (or, for a pneumothorax, dark) disc per finding, placed by its location, sized by its
severity, with an exact mask. It is not a radiograph; it exists so that the build, writers,
resume and QC can be tested in milliseconds, and so that users can dry-run a spec
(``synthmed generate spec.yaml -o out --backend pattern``).

Example:
    >>> from synthmed.sampler import Case, FindingLabel
    >>> case = Case("case-0000000", 0, "train", 7, (FindingLabel("pneumonia", "right_lower_lobe", "mild"),), "F", 40, "PA")
    >>> image = PatternBackend(64, 64).generate([case], [None])[0]
    >>> image.pixels.shape, sorted(image.masks)
    ((64, 64), ['pneumonia'])
"""

from __future__ import annotations

import time
from typing import Sequence

from .base import BackendInfo, GeneratedImage

# where a disc goes, as (x, y) fractions of the image; the patient's right is the image's left
_SIDE_X = {"right": 0.3, "left": 0.7, "bilateral": 0.5}
_ZONE_Y = {"upper": 0.3, "middle": 0.5, "lower": 0.7}
_SEVERITY_RADIUS = {None: 0.08, "mild": 0.06, "moderate": 0.1, "severe": 0.14}


def _place(location: str | None) -> tuple[float, float]:
    if location is None:
        return 0.5, 0.55
    parts = location.split("_")
    x = _SIDE_X.get(parts[0], 0.5)
    y = 0.5
    for word in parts[1:]:
        y = _ZONE_Y.get(word, y)
    if location == "lingula":
        x, y = 0.7, 0.5
    return x, y


class PatternBackend:
    """Deterministic test images with exact masks (see the module docstring).

    Args:
        width, height: image size in pixels.
        delay: seconds to sleep per image, to make interruption tests easy to time.
    """

    def __init__(self, width: int = 256, height: int = 256, delay: float = 0.0):
        self.width, self.height, self.delay = int(width), int(height), float(delay)
        self.info = BackendInfo(name="pattern", model_id="synthmed-pattern-v1", model_hash="pattern-v1",
                                settings={"width": self.width, "height": self.height})

    def generate(self, cases: Sequence, prompts: Sequence) -> list[GeneratedImage]:
        return [self._one(case) for case in cases]

    def _one(self, case) -> GeneratedImage:
        import numpy as np

        if self.delay:
            time.sleep(self.delay)
        rng = np.random.default_rng(case.seed)
        h, w = self.height, self.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        yy /= h
        xx /= w
        # dark lung fields either side of a bright mediastinum, plus noise
        lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + \
            np.exp(-(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
        pixels = 0.75 - 0.45 * lungs + rng.normal(0.0, 0.02, size=(h, w)).astype(np.float32)
        masks = {}
        for f in case.findings:
            if f.finding == "no_finding":
                continue
            cx, cy = _place(f.location)
            r = _SEVERITY_RADIUS.get(f.severity, 0.08)
            mask = ((xx - cx) / r) ** 2 + ((yy - cy) / r) ** 2 <= 1.0
            pixels = np.where(mask, pixels + (-0.3 if f.finding == "pneumothorax" else 0.25), pixels)
            masks[f.finding] = mask
        return GeneratedImage(np.clip(pixels, 0.0, 1.0).astype(np.float32), masks)

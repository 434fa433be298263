"""One patient and one exposure per case, drawn from the case's seed: what varies, and what drives it.

Randomness: a generator made from ``SeedSequence(case.seed, spawn_key=(stream,))``, one stream for the
patient and exposure (here) and one per finding (findings.py), so that adding or removing a finding never
changes the patient, and the same case always gives the same film.

What drives what (documented in docs/drr.md):

- sex: body width and depth (men wider), breast shadows for women (size drawn);
- age: bone mineral (less after 40, so the ribs fade), chest depth, the aorta unfolding after 50 (drawn);
- view: AP films are bedside films, taken in shallower inspiration, and rotate more;
- drawn for everyone: habitus (width, depth and height scale), inspiration (lung height), rotation about
  the long axis (the slabs' parallax), tilt and centring, a smooth elastic deformation, and the exposure
  (dose, scatter, blur, processing latitude and contrast).

Example:
    >>> from synthmed.sampler import Case, FindingLabel
    >>> v = draw_variation(Case("c", 0, None, 7, (FindingLabel("no_finding"),), "F", 70, "PA"))
    >>> v.breast_mm > 0, 0.8 < v.width_scale < 1.2
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .physics import Exposure

STREAM_PATIENT = 0
STREAM_NOISE = 1
STREAM_FINDING = 2


def case_rng(case, stream: int, *key: int) -> np.random.Generator:
    """The generator of one stream of a case: ``SeedSequence(case.seed, spawn_key=(stream, *key))``."""
    seed = case.seed if case.seed is not None else 0
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stream, *key)))


@dataclass(frozen=True)
class Variation:
    """Everything about one film that is not a finding.

    Scales are relative to the CT's own patient; angles in degrees; lengths in mm at the isocentre.
    """

    width_scale: float
    height_scale: float
    depth_scale: float
    soft_tissue_mm: float
    inspiration: float
    rotation_deg: float
    tilt_deg: float
    shift_mm: tuple
    elastic_mm: float
    bone_density: float
    breast_mm: float
    breast_offset: tuple
    aorta_unfolding: float
    exposure: Exposure


def draw_variation(case) -> Variation:
    """Draw a case's patient and exposure from its seed (one block of draws, in a fixed order)."""
    rng = case_rng(case, STREAM_PATIENT)
    u = rng.uniform(size=20)
    n = rng.standard_normal(size=8)
    sex = case.sex if case.sex in ("F", "M") else ("F" if u[0] < 0.5 else "M")
    age = float(case.age) if case.age is not None else 50.0
    view = case.view or "PA"
    bedside = view == "AP"
    width = (1.0 if sex == "M" else 0.94) * (1.0 + 0.045 * np.clip(n[0], -2.2, 2.2))
    height = (1.0 if sex == "M" else 0.95) * (1.0 + 0.03 * np.clip(n[1], -2.2, 2.2))
    depth = (1.0 if sex == "M" else 0.93) * (1.0 + 0.07 * np.clip(n[2], -2.2, 2.2)) * (1.0 + 0.002 * max(age - 40, 0))
    soft = max(0.0, 18.0 * n[3] + 6.0)
    insp = 1.0 + 0.045 * np.clip(n[4], -2.0, 2.0) - (0.05 if bedside else 0.0)
    rotation = float(np.clip(n[5], -2.5, 2.5)) * (3.0 if bedside else 1.6)
    tilt = float(np.clip(n[6], -2.5, 2.5)) * 1.0
    shift = (float(6.0 * (u[1] - 0.5)), float(16.0 * (u[2] - 0.5)))
    bone = float(np.clip(1.05 - 0.008 * max(age - 40.0, 0.0) + 0.06 * n[7], 0.55, 1.2))
    breast = float(15.0 + 35.0 * u[3]) if sex == "F" else 0.0
    breast_offset = (float(10.0 * (u[4] - 0.5)), float(12.0 * (u[5] - 0.5)))
    unfolding = float(np.clip((age - 50.0) / 35.0, 0.0, 1.0) * (0.25 + 0.75 * u[14]))
    exposure = Exposure(
        photons=float(2.0e4 * 2.0 ** (2.0 * u[6] - 1.0) * (0.6 if bedside else 1.0)),
        scatter=float(0.35 + 0.4 * u[7] + (0.25 if bedside else 0.0)),
        blur_mm=float(0.18 + 0.14 * u[8]),
        contrast=float(1.4 + 0.3 * u[9]),
        latitude=float(0.12 + 0.15 * u[10]),
        brightness=float(-0.08 + 0.06 * (u[11] - 0.5)),
        detail=float(0.6 + 0.8 * u[13]),
    )
    return Variation(width_scale=float(width), height_scale=float(height), depth_scale=float(depth),
                     soft_tissue_mm=float(soft), inspiration=float(insp), rotation_deg=rotation, tilt_deg=tilt,
                     shift_mm=shift, elastic_mm=float(1.5 + 2.5 * u[12]), bone_density=bone, breast_mm=breast,
                     breast_offset=breast_offset, aorta_unfolding=unfolding, exposure=exposure)

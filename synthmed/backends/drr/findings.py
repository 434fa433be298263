"""Findings drawn in 3D inside the CT's own structures, in ray space, each with the projection of its region.

A finding is a change of attenuation on a box of the view's ray space (depth plane x row x column on the
finding grid, see physics.ViewProjection): fluid filling a lobe's air spaces, a sphere of soft tissue, a
pleural space of fluid or of air, a larger heart. Its film contribution is the projection of that change
(a sum over depth: projections are linear in attenuation), and its mask is the projection of its region
(every ray that crosses it). Regions are confined to the named structures by the label map, so a lobar
consolidation stops at the fissures.

Locations: lobes are the label map's lobes (the lingula, which TotalSegmentator keeps in the left upper
lobe, is that lobe's part below the left hilum); zones are thirds of the lung's height; sides are the
lung of one side, or both.

Example:
    >>> sorted(DRAWN)[:3]
    ['atelectasis', 'cardiomegaly', 'central_venous_catheter']
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .physics import MU_WATER, ViewProjection, to_patient
from .variation import STREAM_FINDING, case_rng

MU_FLUID = MU_WATER * 1.02     # exudate, transudate, blood: water-like (per mm)
MU_SOFT = MU_WATER * 1.05      # tumour, myocardium

DRAWN = ("atelectasis", "cardiomegaly", "central_venous_catheter", "consolidation", "edema",
         "endotracheal_tube", "enlarged_cardiomediastinum", "fracture", "lung_lesion", "lung_opacity", "mass",
         "nodule", "pacemaker", "pleural_effusion", "pleural_other", "pneumonia", "pneumothorax", "support_devices")
# cardiothoracic ratio bands by severity (the measured ratio is what is reported), as the phantom's
CTR_BAND = {"mild": (0.528, 0.542), "moderate": (0.563, 0.587), "severe": (0.625, 0.68)}
_SEV = {"mild": 0, "moderate": 1, "severe": 2, None: 1}
# a nodule is at most 30 mm across and a mass larger, so the two never overlap in size (a nodule is drawn up to 1.1x
# its size by severity, a mass down to 0.9x). Under 20 mm a soft-tissue nodule projects at about the lung texture's
# own contrast at 256 x 256 (a drawn 15 mm one was read in 0.37 of PA films); a nodule is drawn solid, its
# attenuation step over the lung it fills NODULE_CONTRAST x soft tissue's (as the fracture is drawn at 1.8x)
NODULE_MM = (20.0, 24.5, 28.0)
NODULE_MAX_MM = 30.0
NODULE_CONTRAST = 1.5
FRACTURE_FADE_MM = 30.0       # the displaced fragment rejoins the rib's course over this length
MASS_MM = (40.0, 54.0, 72.0)

LOBE_OF = {
    "right_upper_lobe": ("lung_upper_lobe_right",), "right_middle_lobe": ("lung_middle_lobe_right",),
    "right_lower_lobe": ("lung_lower_lobe_right",), "left_upper_lobe": ("lung_upper_lobe_left",),
    "lingula": ("lung_upper_lobe_left",), "left_lower_lobe": ("lung_lower_lobe_left",),
}
RIGHT = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
LEFT = ("lung_upper_lobe_left", "lung_lower_lobe_left")
MEDIASTINUM = ("aorta", "superior_vena_cava", "brachiocephalic_trunk", "brachiocephalic_vein_left",
               "brachiocephalic_vein_right", "common_carotid_artery_left", "common_carotid_artery_right",
               "subclavian_artery_left", "subclavian_artery_right", "esophagus", "trachea")


class FindingNotDrawable(ValueError):
    """A finding this backend cannot draw (yet), or one whose structures the anatomy lacks."""


@dataclass
class Drawn:
    """One finding on the finding grid: its line-integral change, its mask, the slab it lies in."""

    finding: str
    delta: np.ndarray
    mask: np.ndarray
    slab: int


@dataclass
class Box:
    """A box of ray space: plane, row and column slices."""

    planes: slice
    rows: slice
    cols: slice

    def take(self, a: np.ndarray) -> np.ndarray:
        return a[self.planes, self.rows, self.cols]


# ----------------------------------------------------------------------------- ray-space helpers

def _boxes(vp: ViewProjection) -> list:
    """Bounding box of every label value in ray space (ndimage.find_objects; one pass, cached per view)."""
    return _view_cache(vp, "boxes", lambda: ndimage.find_objects(vp.labels))


def _box_of(vp: ViewProjection, ids: list[int], pad: int = 2) -> Box | None:
    found = [b for i in ids if 0 < i <= len(_boxes(vp)) and (b := _boxes(vp)[i - 1]) is not None]
    if not found:
        return None
    shape = vp.labels.shape
    sl = []
    for ax in range(3):
        lo = max(min(b[ax].start for b in found) - pad, 0)
        hi = min(max(b[ax].stop for b in found) + pad, shape[ax])
        sl.append(slice(lo, hi))
    return Box(*sl)


def _grow(box: Box, shape, planes: int, pix: int) -> Box:
    return Box(slice(max(box.planes.start - planes, 0), min(box.planes.stop + planes, shape[0])),
               slice(max(box.rows.start - pix, 0), min(box.rows.stop + pix, shape[1])),
               slice(max(box.cols.start - pix, 0), min(box.cols.stop + pix, shape[2])))


def _patient_coords(vp: ViewProjection, box: Box, compact: bool = False):
    """Patient coordinates (x left, y anterior, z superior; mm) of a box's voxels, broadcast [D, h, w];
    ``compact``: float32, each only as large as it varies (broadcastable), which keeps arithmetic cheap."""
    d, r, c = vp.grid_coords(box.planes, box.rows, box.cols)
    x, y, z = to_patient(vp.geometry.view, d, r, c)
    if compact:
        return tuple(np.asarray(a, np.float32) for a in (x, y, z))
    return np.broadcast_arrays(x, y, z)


def _view_cache(vp: ViewProjection, key, make):
    """A value that depends on the view alone, made on first use and kept with the view (``vp.cache``)."""
    if key not in vp.cache:
        vp.cache[key] = make()
    return vp.cache[key]


def _lerp_axis(a: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """``a`` resampled along one axis at fractional indices ``pos`` (linear, clamped to the ends)."""
    n = a.shape[axis]
    if n == 1:
        return np.repeat(a, len(pos), axis=axis)
    pos = np.clip(np.asarray(pos, np.float64), 0.0, n - 1)
    i0 = np.minimum(pos.astype(np.intp), n - 2)
    f = (pos - i0).astype(np.float32).reshape([-1 if k == axis else 1 for k in range(a.ndim)])
    a0 = np.take(a, i0, axis=axis)
    return a0 + (np.take(a, i0 + 1, axis=axis) - a0) * f


def _smooth_noise(rng: np.random.Generator, shape: tuple, cells: tuple) -> np.ndarray:
    """Band-limited noise of unit standard deviation with about ``cells`` blobs along each axis: a coarse
    normal grid interpolated linearly (one axis at a time: a few passes over the output, not a 3D zoom)."""
    coarse = rng.standard_normal(tuple(max(2, int(c)) + 2 for c in cells)).astype(np.float32)
    out = coarse
    for axis in reversed(range(coarse.ndim)):
        n, size = coarse.shape[axis], shape[axis]
        out = _lerp_axis(out, axis, (np.arange(size) + 0.5) * (n / size) - 0.5)
    out -= out.mean()
    out *= np.float32(1.0 / (float(out.std()) + 1e-6))
    return out


def _cells(box: Box, vp: ViewProjection, mm: float) -> tuple:
    """How many noise cells of about ``mm`` fit along each axis of a box."""
    g = vp.geometry
    h, _ = vp.finding_shape
    pf = g.pixel_iso * g.height / h
    dp = float(np.mean(vp.plane_thickness))
    sizes = ((box.planes.stop - box.planes.start) * dp, (box.rows.stop - box.rows.start) * pf,
             (box.cols.stop - box.cols.start) * pf)
    return tuple(max(1.0, s / mm) for s in sizes)


def _finish(vp: ViewProjection, finding: str, box: Box, region: np.ndarray, delta_mu: np.ndarray,
            visible: np.ndarray | None = None) -> Drawn:
    delta = vp.project(delta_mu, box.planes, box.rows, box.cols)
    mask = np.zeros(vp.finding_shape, bool)
    mask[box.rows, box.cols] = region.any(axis=0) if visible is None else visible
    weights = np.abs(delta_mu).reshape(delta_mu.shape[0], -1).sum(axis=1)
    return Drawn(finding, delta, mask, vp.slab_of(weights, box.planes))


class _Structure:
    """A structure's ray-space box, its voxels there, their patient coordinates (compact, see
    :func:`_patient_coords`) and percentiles of those, computed once per view and kept (read-only)."""

    def __init__(self, vp: ViewProjection, box: Box, inside: np.ndarray):
        inside.setflags(write=False)
        self.box, self.inside = box, inside
        self.xyz = _patient_coords(vp, box, compact=True)
        self._voxels: dict = {}
        self._stats: dict = {}

    def voxels(self, axis: str) -> np.ndarray:
        """Coordinate ``axis`` (x, y or z) of each voxel inside."""
        if axis not in self._voxels:
            a = self.xyz["xyz".index(axis)]
            self._voxels[axis] = np.broadcast_to(a, self.inside.shape)[self.inside]
        return self._voxels[axis]

    def pct(self, axis: str, q: float) -> float:
        if (axis, q) not in self._stats:
            self._stats[axis, q] = float(np.percentile(self.voxels(axis), q))
        return self._stats[axis, q]


def _lung(vp: ViewProjection, names: dict, side: str) -> _Structure:
    """The lung of one side (its lobes), cached per view."""
    ids = _lung_ids(names, side)

    def make():
        box = _box_of(vp, ids)
        if box is None:
            raise FindingNotDrawable(f"the {side} lung is not in this view's field")
        return _Structure(vp, box, np.isin(box.take(vp.labels), ids))
    return _view_cache(vp, ("lung", tuple(ids)), make)


# ----------------------------------------------------------------------------- where

def location_region(vp: ViewProjection, names: dict, location: str | None, default: str) -> tuple[Box, np.ndarray]:
    """The ray-space box and boolean region (read-only) of a vocabulary location (lobe, zone or side),
    cached per view."""
    loc = location or default
    key = ("location", loc, tuple(sorted(names.items())))
    if key not in vp.cache:
        box, region = _location_region(vp, names, loc)
        region.setflags(write=False)
        vp.cache[key] = box, region
    return vp.cache[key]


def _location_region(vp: ViewProjection, names: dict, loc: str) -> tuple[Box, np.ndarray]:
    if loc in LOBE_OF:
        parts = LOBE_OF[loc]
    elif loc.startswith("right"):
        parts = RIGHT
    elif loc.startswith("left"):
        parts = LEFT
    elif loc == "bilateral":
        parts = RIGHT + LEFT
    else:
        raise FindingNotDrawable(f"unknown location {loc!r}")
    missing = [p for p in parts if p not in names]
    if missing:
        raise FindingNotDrawable(f"the anatomy has no structure {missing[0]!r} (needed for {loc})")
    ids = [names[p] for p in parts]
    box = _box_of(vp, ids)
    if box is None:
        raise FindingNotDrawable(f"the structures of {loc} ({', '.join(parts)}) are not in this view's field")
    region = np.isin(box.take(vp.labels), ids)
    if loc == "lingula" or loc == "left_upper_lobe":
        _, _, z = _patient_coords(vp, box)
        zs = z[region]
        split = np.percentile(zs, 38.0)  # the lingula: the lobe's lower part, about its lowest 2/5
        region &= (z < split) if loc == "lingula" else (z >= split)
    elif loc.endswith("_zone"):
        x, y, z = _patient_coords(vp, box)
        zs = z[region]
        lo, hi = float(np.percentile(zs, 8)), float(zs.max())
        third = {"upper": 2, "middle": 1, "lower": 0}[loc.split("_")[1]]
        a, b = lo + (hi - lo) * third / 3, lo + (hi - lo) * (third + 1) / 3
        wave = 8.0 * np.sin(x / 23.0 + y / 31.0) + 5.0 * np.sin(x / 11.0 - y / 17.0)  # no ruler-straight edge
        region &= (z + wave <= b) if third == 0 else (z + wave >= a) & (z + wave <= b)
    return box, region


def _lung_ids(names: dict, side: str) -> list[int]:
    return [names[p] for p in (RIGHT if side == "right" else LEFT) if p in names]


def _sides(location: str | None, default: str) -> list[str]:
    loc = location or default
    if loc == "bilateral":
        return ["right", "left"]
    return ["left"] if loc.startswith("left") or loc == "lingula" else ["right"]


# ----------------------------------------------------------------------------- airspace disease

def _segment_distance(R, C, a, b):
    """Distance (pixels) from grid points (R, C) to the nearest of segments a[i] -> b[i] ([N, 2] row, col),
    and that segment's index."""
    best = np.full(R.shape, np.inf, np.float32)
    idx = np.zeros(R.shape, np.int64)
    for k0 in range(0, len(a), 64):
        aa, bb = a[k0:k0 + 64], b[k0:k0 + 64]
        ab = bb - aa
        L2 = np.maximum((ab ** 2).sum(1), 1e-9)
        t = np.clip(((R[..., None] - aa[:, 0]) * ab[:, 0] + (C[..., None] - aa[:, 1]) * ab[:, 1]) / L2, 0, 1)
        dist = np.hypot(R[..., None] - (aa[:, 0] + t * ab[:, 0]), C[..., None] - (aa[:, 1] + t * ab[:, 1]))
        j = np.argmin(dist, axis=-1)
        dmin = np.take_along_axis(dist, j[..., None], -1)[..., 0]
        better = dmin < best
        best = np.where(better, dmin, best)
        idx = np.where(better, j + k0, idx)
    return best, idx


def _bronchograms(vp, box: Box, region: np.ndarray, rng) -> np.ndarray:
    """Air bronchograms: a branching airway tree from the region's hilar side out into it, kept air inside
    the filled lobe. Drawn in ray space as tubes about 3-5 mm wide that run ~1.5 cm along the beam (an
    airway crossing the film obliquely), centred on the region's mid-depth."""
    proj = region.any(axis=0)
    rows, cols = np.nonzero(proj)
    if rows.size < 20:
        return np.zeros(region.shape, bool)
    w_full = vp.finding_shape[1]
    centre_c = w_full / 2 - box.cols.start
    # the hilar end: the region's most medial pixels about its middle height
    mid = np.abs(rows - np.median(rows)) < 0.25 * (np.ptp(rows) + 1)
    k = np.argmin(np.abs(cols[mid] - centre_c))
    start = np.array([rows[mid][k], cols[mid][k]], float)
    target = np.array([rows.mean(), cols.mean()])
    g = vp.geometry
    px = g.pixel_iso * g.height / vp.finding_shape[0]
    ext = max(np.ptp(rows), np.ptp(cols)) + 1
    segs, widths = [], []
    stack = [(start, np.arctan2(*(target - start)), 0.5 * ext, 2.4 / px * 1.3, 0)]
    while stack:
        p, ang, length, wid, gen = stack.pop()
        q = p + length * np.array([np.sin(ang), np.cos(ang)])
        segs.append((p, q))
        widths.append(wid)
        if gen < 3:
            for turn in (-1, 1):
                stack.append((q, ang + turn * rng.uniform(0.3, 0.6), length * rng.uniform(0.55, 0.75), wid * 0.78,
                              gen + 1))
    a = np.array([s[0] for s in segs], np.float32)
    b = np.array([s[1] for s in segs], np.float32)
    R, C = np.mgrid[0:proj.shape[0], 0:proj.shape[1]].astype(np.float32)
    dist, idx = _segment_distance(R, C, a, b)
    tree = dist <= np.asarray(widths, np.float32)[idx] / 2
    # along the beam: about 1.5 cm about the region's mean depth at that pixel
    planes = np.arange(region.shape[0], dtype=np.float32)[:, None, None]
    n = np.maximum(region.sum(axis=0), 1)
    mid_plane = (region * planes).sum(axis=0) / n
    half = 7.5 / float(np.mean(vp.plane_thickness))
    return tree[None] & (np.abs(planes - mid_plane[None]) <= half) & region


def airspace(vp, names, label, rng, *, kind: str) -> Drawn:
    """Consolidation (lobar: confluent, homogeneous, up to the fissures, air bronchograms), pneumonia
    (patchy, multifocal, ill-defined, of mixed density) or lung opacity (a hazy partial filling): fluid in
    the air spaces of the named region."""
    sev = _SEV[label.severity]
    box, lobe = location_region(vp, names, label.location, "right_lower_lobe")
    mu = box.take(vp.mu).astype(np.float32)
    shape = lobe.shape
    x, y, z = _patient_coords(vp, box)
    # distance from a seed inside the region, roughened: the disease spreads from there through the lobe
    idx = np.flatnonzero(lobe)
    seed = np.unravel_index(idx[int(rng.integers(idx.size))], shape)
    sx, sy, sz = x[seed], y[seed], z[seed]
    dist = np.sqrt((x - sx) ** 2 + (y - sy) ** 2 + ((z - sz) * 1.2) ** 2)
    if kind == "lobar":
        noise = _smooth_noise(rng, shape, _cells(box, vp, 30.0))
        score = dist / 90.0 + 0.45 * noise
        fraction = (0.5, 0.78, 1.0)[sev]
        target = MU_FLUID * rng.uniform(1.0, 1.05)
        edge_soft = 0.05
    elif kind == "patchy":
        n1 = _smooth_noise(rng, shape, _cells(box, vp, 20.0))
        n2 = _smooth_noise(rng, shape, _cells(box, vp, 8.0))
        score = dist / 110.0 - 0.7 * n1 - 0.3 * n2
        fraction = (0.25, 0.4, 0.58)[sev]
        target = MU_FLUID * (0.75 + 0.1 * sev) * (1.0 + 0.2 * np.clip(n2, -2, 2))
        edge_soft = 0.35
    else:  # haze
        n1 = _smooth_noise(rng, shape, _cells(box, vp, 35.0))
        score = dist / 120.0 - 0.4 * n1
        fraction = (0.45, 0.65, 0.85)[sev]
        target = MU_FLUID * (0.5 + 0.14 * sev)
        edge_soft = 0.3
    cut = float(np.quantile(score[lobe], fraction)) if fraction < 1.0 else np.inf
    region = lobe & (score <= cut)
    if not region.any():
        region = lobe
    fill = region
    if kind == "lobar":  # air bronchograms: the branching airways stay air inside the consolidation
        fill = region & ~_bronchograms(vp, box, region, rng)
    # the edge that is not a fissure is soft (pneumonia and haze fade out, consolidation stops sharply)
    soft = np.clip((cut - score) / edge_soft, 0.15, 1.0) if np.isfinite(cut) else 1.0
    delta_mu = np.where(fill, np.maximum(target - mu, 0.0) * soft, 0.0).astype(np.float32)
    return _finish(vp, label.finding, box, region, delta_mu)


# ----------------------------------------------------------------------------- nodule and mass

def lesion(vp, names, label, rng, *, kind: str) -> Drawn:
    """A round, slightly lobulated soft-tissue lesion in the named region, diameter by severity."""
    sev = _SEV[label.severity]
    diam = (NODULE_MM if kind == "nodule" else MASS_MM)[sev] * rng.uniform(0.9, 1.1)
    if kind == "nodule":
        diam = min(diam, NODULE_MAX_MM)
    r = diam / 2
    box, lobe = location_region(vp, names, label.location, "right_upper_lobe")
    x, y, z = _patient_coords(vp, box)
    idx = np.flatnonzero(lobe)
    # centres where the film shows aerated lung in front of and behind the lesion, not the heart, hilum or
    # diaphragm, where a nodule at the low end of its size range is occult (where the lobe has any)
    aerated = _lung_projection(vp, names)[box.rows, box.cols]
    clear = idx[aerated.reshape(-1)[idx % aerated.size]]
    if clear.size:
        idx = clear
    best, best_score = None, -1.0
    cand = rng.integers(idx.size, size=24)
    sub = (slice(None, None, 2),) * 3
    xs, ys, zs, inside = x[sub], y[sub], z[sub], lobe[sub]
    for k in cand:  # the candidate centre whose sphere lies most within the region
        p = np.unravel_index(idx[int(k)], lobe.shape)
        cx, cy, cz = x[p], y[p], z[p]
        ball = (xs - cx) ** 2 + (ys - cy) ** 2 + (zs - cz) ** 2 <= r * r
        score = float(inside[ball].mean()) if ball.any() else 0.0
        if score > best_score + 1e-9:
            best, best_score = (cx, cy, cz), score
    cx, cy, cz = best
    dx, dy, dz = x - cx, y - cy, z - cz
    rho = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    # lobulation: the radius varies with direction (low-order harmonics)
    a = rng.normal(0.0, 0.06 if kind == "nodule" else 0.09, size=6)
    ux, uy, uz = dx / rho, dy / rho, dz / rho
    radius = r * (1.0 + a[0] * ux + a[1] * uy + a[2] * uz + a[3] * (ux * uy) + a[4] * (uy * uz) + a[5] * (ux * uz))
    region = (rho <= radius) & lobe  # in the named lobe: a large mass flattens against a fissure
    if not region.any():
        raise FindingNotDrawable(f"{label.finding}: no room in {label.location}")
    mu = box.take(vp.mu).astype(np.float32)
    edge = np.clip((radius - rho) / 1.5, 0.0, 1.0)
    gain = NODULE_CONTRAST if kind == "nodule" else 1.0
    delta_mu = np.where(region, np.maximum(MU_SOFT - mu, 0.0) * edge * gain, 0.0).astype(np.float32)
    return _finish(vp, label.finding, box, region, delta_mu)


# ----------------------------------------------------------------------------- pleura

def effusion(vp, names, label, rng) -> list[Drawn]:
    """Pleural fluid: upright films (PA, LL) a meniscus rising at the costophrenic angle and the chest wall;
    AP (supine, bedside) a dependent layer along the back, a haze graded down the hemithorax."""
    sev = _SEV[label.severity]
    out = []
    for side in _sides(label.location, "right"):
        lung = _lung(vp, names, side)
        box = lung.box
        x, y, z = lung.xyz
        z_lo, z_hi = lung.pct("z", 0), lung.pct("z", 100)
        height = z_hi - z_lo
        if vp.geometry.view == "AP":
            y_lo, y_hi = lung.pct("y", 0), lung.pct("y", 100)
            depth = (0.18, 0.33, 0.55)[sev] * (y_hi - y_lo) * rng.uniform(0.9, 1.1)
            # thicker at the base: fluid also pools in the posterior costophrenic recess
            level = y_lo + depth * (1.0 + 0.6 * np.clip((z_lo + 0.35 * height - z) / (0.35 * height), 0, 1))
            region = lung.inside & (y <= level)
        else:
            xc, yc = _mean(lung, "x"), _mean(lung, "y")
            ax = (lung.pct("x", 100) - lung.pct("x", 0)) / 2 + 1e-3
            ay = (lung.pct("y", 100) - lung.pct("y", 0)) / 2 + 1e-3
            rho2 = ((x - xc) / ax) ** 2 + ((y - yc) / ay) ** 2
            frac = (0.17, 0.33, 0.55)[sev] * rng.uniform(0.9, 1.1)
            surface = z_lo + frac * height + 0.12 * height * np.clip(rho2, 0.0, 1.5)  # the meniscus
            region = lung.inside & (z <= surface)
        region, sub = _crop(region)
        mu = _take(vp.mu, box, sub)
        delta_mu = np.maximum(MU_FLUID - mu, 0.0) * region
        out.append(_finish(vp, label.finding, _offset(box, sub), region, delta_mu))
    return out


def _mean(s: _Structure, axis: str) -> float:
    if (axis, "mean") not in s._stats:
        s._stats[axis, "mean"] = float(np.mean(s.voxels(axis), dtype=np.float64))
    return s._stats[axis, "mean"]


def _crop(region: np.ndarray, pad: int = 0) -> tuple[np.ndarray, Box]:
    """A region cut to its bounding box (+ ``pad``, within the array) and that box, relative to the array."""
    sl = []
    for ax in range(3):
        other = tuple(k for k in range(3) if k != ax)
        idx = np.flatnonzero(region.any(axis=other))
        if idx.size == 0:
            idx = np.array([0])
        sl.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + 1 + pad, region.shape[ax])))
    box = Box(*sl)
    return box.take(region), box


def _offset(box: Box, sub: Box) -> Box:
    """A box given relative to ``box``, made absolute."""
    return Box(*(slice(b.start + s.start, b.start + s.stop) for b, s in
                 ((box.planes, sub.planes), (box.rows, sub.rows), (box.cols, sub.cols))))


def _take(a: np.ndarray, box: Box, sub: Box | None = None) -> np.ndarray:
    """Float32 copy of a ray-space array on a box (or on a sub-box of it)."""
    return (_offset(box, sub) if sub is not None else box).take(a).astype(np.float32)


def pneumothorax(vp, names, label, rng) -> list[Drawn]:
    """Air in the pleural space: the lung collapsed toward its hilum by severity, no lung markings beyond
    its edge, the visceral pleura a thin line. The mask is where the film shows pleural air and no lung."""
    sev = _SEV[label.severity]
    out = []
    for side in _sides(label.location, "right"):
        lung_s = _lung(vp, names, side)
        box, lung = lung_s.box, lung_s.inside
        mu = _take(vp.mu, box)
        x, y, z = lung_s.xyz
        medial = lung_s.pct("x", 95 if side == "right" else 5)
        hx, hy, hz = medial, _mean(lung_s, "y"), lung_s.pct("z", 40)
        s = (0.8, 0.62, 0.45)[sev] * rng.uniform(0.95, 1.05)
        sz = s * 0.9  # upright: the apex drops most
        # voxel p lies in the collapsed lung if its pre-image h + (p - h) / s is lung
        qx, qy, qz = hx + (x - hx) / s, hy + (y - hy) / (0.5 + 0.5 * s), hz + (z - hz) / sz
        inside, qmu = _lookup(vp, box, lung, mu, qx, qy, qz)
        collapsed = inside & lung
        air = lung & ~collapsed
        new_mu = np.minimum(qmu / (s * s), MU_WATER * 0.6) * collapsed
        # the visceral pleura: the collapsed lung's outer shell
        shell = collapsed & ~ndimage.binary_erosion(collapsed, iterations=1)
        np.maximum(new_mu, MU_WATER * 1.3, out=new_mu, where=shell)
        delta_mu = (new_mu - mu) * lung
        visible = air.any(axis=0) & ~collapsed.any(axis=0)
        out.append(_finish(vp, label.finding, box, air, delta_mu, visible=visible))
    return out


def _indices(vp, box: Box, qx, qy, qz, broadcast: bool = True):
    """Fractional ray-space indices (relative to ``box``) of patient points (mm); ``broadcast=False`` keeps
    each as small as its inputs allow."""
    g = vp.geometry
    if g.view == "PA":
        d, r, c = qy, -qz, qx
    elif g.view == "AP":
        d, r, c = -qy, -qz, qx
    else:
        d, r, c = qx, -qz, -qy
    h, w = vp.finding_shape
    r_iso, c_iso = g.iso_coords(w, h)
    pf_r, pf_c = r_iso[1] - r_iso[0], c_iso[1] - c_iso[0]
    d = np.asarray(d)
    back = g.sod / (g.sod + d)
    pi = np.interp(d, vp.plane_depth, np.arange(vp.plane_depth.size)) - box.planes.start
    ri = (r * back - r_iso[0]) / pf_r - box.rows.start
    ci = (c * back - c_iso[0]) / pf_c - box.cols.start
    return np.broadcast_arrays(pi, ri, ci) if broadcast else (pi, ri, ci)


def _lookup(vp, box: Box, lung: np.ndarray, mu: np.ndarray, qx, qy, qz):
    """Whether patient points (qx, qy, qz) fall in ``lung`` of ``box``, and mu there (nearest voxel)."""
    idx = [np.rint(a).astype(np.intp) for a in _indices(vp, box, qx, qy, qz, broadcast=False)]
    ok = np.ones((), bool)
    for a, n in zip(idx, lung.shape):
        ok = ok & (a >= 0) & (a < n)
    pi, ri, ci = (np.clip(a, 0, n - 1) for a, n in zip(idx, lung.shape))
    inside = ok & lung[pi, ri, ci]
    return inside, mu[pi, ri, ci] * inside


def _occupancy(vp, region: np.ndarray, smooth_mm: float) -> np.ndarray:
    """A region's occupancy smoothed over about ``smooth_mm`` (float32; zero outside the array)."""
    pf = float(np.mean(vp.plane_thickness))
    g = vp.geometry
    px = g.pixel_iso * g.height / vp.finding_shape[0]
    return ndimage.gaussian_filter(region.astype(np.float32), (smooth_mm / pf, smooth_mm / px, smooth_mm / px),
                                   mode="constant", truncate=2.0)


def _warped_region(vp, box: Box, region: np.ndarray, qx, qy, qz, smooth_mm: float = 3.0) -> np.ndarray:
    """``region`` moved by a mapping (its pre-image of each voxel is (qx, qy, qz)): a smoothed occupancy
    sampled trilinearly and cut at one half, so that a scaled structure has smooth, not voxel-step, edges."""
    occ = _occupancy(vp, region, smooth_mm)
    idx = _indices(vp, box, qx, qy, qz)
    return ndimage.map_coordinates(occ, idx, order=1, mode="constant", cval=0.0, prefilter=False) > 0.5


# ----------------------------------------------------------------------------- heart and mediastinum

HEART_SCALE_MAX = 1.9            # the largest heart drawn (severe cardiomegaly needs about 1.6)
_HEART_SCALES = np.linspace(1.0, HEART_SCALE_MAX, 13)


@dataclass
class HeartGrowth:
    """The heart enlarged to every scale at once, traced once per view: ``smin`` is, per ray-space voxel
    of ``box``, the least scale at which the enlarged heart covers it (1 inside the heart), so the heart
    at scale s is ``smin <= s`` and its projection is ``smin2d <= s`` (no per-case 3D warp)."""

    box: Box
    smin: np.ndarray      # float32 [D, h, w] on box
    fill: np.ndarray      # float32 on box: the attenuation change where the heart grows (0 in the heart)
    smin2d: np.ndarray    # float32 [h, w] finding grid: min over depth of smin (inf off the box)
    heart2d: np.ndarray   # bool [h, w]: the heart's own projection
    minima: tuple         # smin's minimum over each plane, row and column (to cut a scale's box)

    def mask(self, scale: float) -> np.ndarray:
        """The projection of the heart at ``scale`` (finding grid)."""
        return self.smin2d <= scale


def heart_growth(vp, names) -> HeartGrowth:
    """The view's :class:`HeartGrowth` (traced on first use, then kept with the view)."""
    hid = names.get("heart")
    if hid is None or _box_of(vp, [hid]) is None:
        raise FindingNotDrawable("the anatomy has no structure 'heart'")
    return _view_cache(vp, ("heart", hid), lambda: _trace_heart_growth(vp, hid))


def _trace_heart_growth(vp, hid: int) -> HeartGrowth:
    """The heart scaled about its centre, more laterally than up, the enlargement tapering off over the
    heart's upper part (the atria and the great vessels' roots stay): each voxel's pre-image at a scale is
    looked up in the heart's smoothed occupancy, at 13 scales from 1 to HEART_SCALE_MAX on every other voxel;
    the least scale is interpolated between the samples, then over the voxels in between."""
    box0 = _box_of(vp, [hid])
    st = _Structure(vp, box0, box0.take(vp.labels) == hid)
    cx, cy = _mean(st, "x") + 0.15 * (st.pct("x", 100) - st.pct("x", 0)), _mean(st, "y")
    # the heart sits on the diaphragm and grows out to both sides (the left more) far more than up
    cz, z40, z90 = st.pct("z", 15), st.pct("z", 40), st.pct("z", 90)
    # the box the largest heart fits in: its patient-frame box scaled, + the smoothing, in ray space
    s_max, sz_max, pad = HEART_SCALE_MAX, 1.0 + 0.35 * (HEART_SCALE_MAX - 1.0), 12.0
    corners = [np.array([c + (st.pct(a, q) - c) * f + (pad if q else -pad) for q in (0, 100)])
               for a, c, f in (("x", cx, s_max), ("y", cy, s_max), ("z", cz, sz_max))]
    full = Box(*(slice(0, n) for n in vp.labels.shape))
    idx = _indices(vp, full, *np.meshgrid(*corners, indexing="ij"))
    box = Box(*(slice(max(min(b.start, int(np.floor(i.min())) - 2), 0), min(max(b.stop, int(np.ceil(i.max())) + 3), n))
                for b, i, n in zip((box0.planes, box0.rows, box0.cols), idx, vp.labels.shape)))
    heart = box.take(vp.labels) == hid
    obox = _grow(box0, vp.labels.shape, 6, 12)   # the occupancy is nil farther out (5 mm smoothing)
    occ = _occupancy(vp, obox.take(vp.labels) == hid, 5.0)
    half = Box(*(slice(b.start, b.stop, 2) for b in (box.planes, box.rows, box.cols)))
    x, y, z = _patient_coords(vp, half, compact=True)
    t = np.clip((z - z40) / max(z90 - z40, 1.0), 0.0, 1.0)
    taper = t * t * (3 - 2 * t)
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)

    def occupancy_at(s, x, y, z, taper):  # the occupancy of each point's pre-image at scale s
        s_xy = s + (1.0 - s) * taper
        sz = 1.0 + 0.35 * (s - 1.0)
        idx = _indices(vp, obox, cx + (x - cx) / s_xy, cy + (y - cy) / s_xy, cz + (z - cz) / sz)
        return ndimage.map_coordinates(occ, np.array(idx).reshape(3, -1), order=1, mode="constant", cval=0.0,
                                       prefilter=False)

    # points the heart never reaches (nothing at the smallest or the largest scale) are left out
    near = (occupancy_at(1.0, x, y, z, taper) > 0.01) | (occupancy_at(HEART_SCALE_MAX, x, y, z, taper) > 0.01)
    x, y, z, taper = (np.broadcast_to(a, shape).reshape(-1)[near] for a in (x, y, z, taper))
    never = np.float32(HEART_SCALE_MAX + 0.5)
    least = np.full(x.shape, never, np.float32)
    prev = None
    for k, s in enumerate(_HEART_SCALES):
        v = occupancy_at(s, x, y, z, taper)
        new = (least == never) & (v > 0.5)
        if prev is None:
            least[new] = 1.0
        else:
            s0 = _HEART_SCALES[k - 1]
            frac = np.clip((0.5 - prev[new]) / np.maximum(v[new] - prev[new], 1e-6), 0.0, 1.0)
            least[new] = s0 + frac * (s - s0)
        prev = v
    smin = np.full(shape, never, np.float32)
    smin.reshape(-1)[near] = least
    for axis in range(3):  # every other voxel -> every voxel
        smin = _lerp_axis(smin, axis, np.arange(heart.shape[axis]) / 2.0)
    smin[heart] = 1.0
    reach, sub = _crop(smin <= HEART_SCALE_MAX)
    box = _offset(box, sub)
    smin = np.ascontiguousarray(sub.take(smin))
    fill = np.maximum(MU_FLUID * 1.02 - box.take(vp.mu).astype(np.float32), 0.0) * ~sub.take(heart)
    smin2d = np.full(vp.finding_shape, np.inf, np.float32)
    smin2d[box.rows, box.cols] = smin.min(axis=0)
    heart2d = np.zeros(vp.finding_shape, bool)
    heart2d[box0.rows, box0.cols] = (box0.take(vp.labels) == hid).any(axis=0)
    minima = tuple(smin.min(axis=tuple(k for k in range(3) if k != ax)) for ax in range(3))
    for a in (smin, fill, smin2d, heart2d, *minima):
        a.setflags(write=False)
    return HeartGrowth(box, smin, fill, smin2d, heart2d, minima)


def cardiomegaly(vp, names, scale: float) -> Drawn:
    """The heart at ``scale`` (1 .. HEART_SCALE_MAX) of :func:`heart_growth`; the renderer picks the scale
    whose film lands the cardiothoracic ratio in its band."""
    hg = heart_growth(vp, names)
    scale = float(min(max(scale, 1.0), HEART_SCALE_MAX))
    sl = []
    for m in hg.minima:
        idx = np.flatnonzero(m <= scale)
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    sub = Box(*sl)
    region = sub.take(hg.smin) <= scale
    delta_mu = sub.take(hg.fill) * region
    return _finish(vp, "cardiomegaly", _offset(hg.box, sub), region, delta_mu)


def enlarged_mediastinum(vp, names, label, rng) -> Drawn:
    """The superior mediastinum (great vessels, oesophagus, trachea and the tissue between) widened
    about the midline by severity, displacing lung."""
    sev = _SEV[label.severity]
    ids = [names[n] for n in MEDIASTINUM if n in names]
    hid = names.get("heart")
    if not ids or hid is None:
        raise FindingNotDrawable("the anatomy lacks the mediastinal structures (aorta, superior_vena_cava, ...)")
    box0 = _box_of(vp, ids)
    box = _grow(box0, vp.labels.shape, 10, 30)
    labels = box.take(vp.labels)
    x, y, z = _patient_coords(vp, box)
    heart_z = float(np.percentile(z[labels == hid], 88)) if (labels == hid).any() else -1e9
    lungs = np.isin(labels, [names[p] for p in RIGHT + LEFT if p in names])
    mu = box.take(vp.mu).astype(np.float32)
    f = (1.3, 1.55, 1.85)[sev] * rng.uniform(0.97, 1.03)
    vessels = np.isin(labels, ids)
    xm = float(np.median(x[vessels]))
    apex_z = float(np.percentile(z[lungs], 97)) if lungs.any() else float(z.max())
    # the superior mediastinum: the great vessels, oesophagus and trachea with the fat around them
    pf = float(np.mean(vp.plane_thickness))
    med = ndimage.binary_dilation(vessels, iterations=max(1, int(round(6.0 / pf)))) & ~lungs
    band = (z > heart_z) & (z < apex_z)
    med &= band
    new = (_warped_region(vp, box, med, xm + (x - xm) / f, y, z) | med) & band
    delta_mu = np.where(new & lungs, np.maximum(MU_SOFT - mu, 0.0), 0.0).astype(np.float32)
    return _finish(vp, "enlarged_cardiomediastinum", box, new, delta_mu)


# ----------------------------------------------------------------------------- age: the unfolded aorta

AORTA_WIDEN = 0.2        # the fully unfolded aorta: its span about its own midline x 1.2 ...
AORTA_RISE = 0.15        # ... and its upper half (the arch) x 1.15 higher
_UNFOLD_LEVELS = (0.25, 0.5, 0.75, 1.0)


def unfolded_aorta(vp, names, amount: float) -> tuple[np.ndarray, int] | None:
    """The line-integral change (finding grid) and slab of an aorta unfolded by ``amount`` (0 none, 1 fully):
    as the thoracic aorta lengthens with age, its ascending and descending parts bow apart and the arch
    rises, so the aortic knuckle stands out further into the left lung and higher. Not a finding (no
    label, no mask): the mediastinum below the arch keeps its width, well under mild
    enlarged_cardiomediastinum's. None when the anatomy has no aorta or ``amount`` is 0.

    Traced once per view at a few amounts; a case blends the two nearest (projections are linear).
    """
    aid = names.get("aorta")
    if amount <= 0 or aid is None:
        return None
    levels = _view_cache(vp, ("aorta", aid), lambda: _trace_unfolding(vp, names, aid))
    if levels is None:
        return None
    deltas, slab = levels
    pos = min(float(amount), 1.0) / _UNFOLD_LEVELS[0] - 1.0   # 0 at the first level
    if pos < 0:
        return deltas[0] * np.float32(amount / _UNFOLD_LEVELS[0]), slab
    k = min(int(pos), len(deltas) - 2)
    f = np.float32(pos - k)
    return deltas[k] + (deltas[k + 1] - deltas[k]) * f, slab


def _trace_unfolding(vp, names, aid: int):
    box0 = _box_of(vp, [aid])
    if box0 is None:
        return None
    box = _grow(box0, vp.labels.shape, 8, 24)
    labels = box.take(vp.labels)
    aorta = labels == aid
    x, y, z = _patient_coords(vp, box, compact=True)
    xs = np.broadcast_to(x, aorta.shape)[aorta]
    zs = np.broadcast_to(z, aorta.shape)[aorta]
    xm, zb = float(np.median(xs)), float(np.percentile(zs, 50))
    keep = ~np.isin(labels, [names[n] for n in ("trachea", "esophagus") if n in names]) & ~aorta
    mu = box.take(vp.mu).astype(np.float32)
    fill = np.maximum(MU_FLUID - mu, 0.0) * keep
    deltas, weights = [], None
    for a in _UNFOLD_LEVELS:
        fx, fz = 1.0 + AORTA_WIDEN * a, 1.0 + AORTA_RISE * a
        qz = np.where(z > zb, zb + (z - zb) / fz, z)
        grown = _warped_region(vp, box, aorta, xm + (x - xm) / fx, y, qz) & keep
        delta_mu = (fill * grown).astype(np.float32)
        deltas.append(vp.project(delta_mu, box.planes, box.rows, box.cols))
        if weights is None or a == 1.0:
            weights = np.abs(delta_mu).reshape(delta_mu.shape[0], -1).sum(axis=1)
    for d in deltas:
        d.setflags(write=False)
    return tuple(deltas), vp.slab_of(weights, box.planes)


# ----------------------------------------------------------------------------- atelectasis

def _collapse_lobe(location: str | None) -> list[str]:
    """Lobe locations to collapse: a lobe as named; a zone its lobe; a side its lower lobe."""
    loc = location or "right_lower_lobe"
    if loc in LOBE_OF:
        return [loc]
    if loc == "bilateral":
        return ["right_lower_lobe", "left_lower_lobe"]
    side = "left" if loc.startswith("left") else "right"
    if loc.endswith("_zone"):
        level = loc.split("_")[1]
        lobe = {"upper": "upper_lobe", "middle": "middle_lobe" if side == "right" else "lingula",
                "lower": "lower_lobe"}[level]
        return [f"{side}_{lobe}" if lobe != "lingula" else "lingula"]
    return [f"{side}_lower_lobe"]


def _part(a: np.ndarray, sub: Box) -> np.ndarray:
    """A compact (broadcastable) coordinate array cut to a sub-box (its length-1 axes kept)."""
    return a[tuple(slice(None) if n == 1 else sl for n, sl in zip(a.shape, (sub.planes, sub.rows, sub.cols)))]


def _collapse_setup(vp, names, loc: str, side: str) -> dict:
    """What an atelectasis of lobe ``loc`` needs that does not depend on the case (cached per view)."""
    lung = _lung(vp, names, side)

    def make():
        box, inside = lung.box, lung.inside
        lbox, lobe_full = location_region(vp, names, loc, loc)
        lobe = np.zeros(inside.shape, bool)
        lobe[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in
                   ((lbox.planes, box.planes), (lbox.rows, box.rows), (lbox.cols, box.cols)))] = lobe_full
        ls = _Structure(vp, box, lobe)
        kind = "upper" if "upper" in loc else "lower" if "lower" in loc else "middle"
        mu = _take(vp.mu, box)
        rest = inside & ~lobe
        lobe_mu = float(np.median(mu[lobe]))
        # the collapsed lobe shrinks toward a point of the lobe's box, so it stays in that box
        _, obox = _crop(lobe)
        obox = _grow(obox, lobe.shape, 4, 8)
        return dict(lobe=lobe, kind=kind, obox=obox, occ=_occupancy(vp, obox.take(lobe), 4.0),
                    medial=ls.pct("x", 92 if side == "right" else 8),
                    hz=ls.pct("z", {"upper": 80, "middle": 50, "lower": 12}[kind]),
                    hy=ls.pct("y", {"upper": 55, "middle": 60, "lower": 25}[kind]),
                    lobe_mu=lobe_mu, parench=float(np.percentile(mu[rest], 40)) if rest.any() else lobe_mu)
    return _view_cache(vp, ("collapse", loc), make)


def _hilum_shift(vp, names, side: str, shift: float):
    """The lung's attenuation with the hilum moved ``shift`` mm up (Gaussian falloff), on the box where it
    moves: (box relative to the lung's, weight > 0.05 there, moved mu). Cached per view, side and shift."""
    lung = _lung(vp, names, side)

    def make():
        x, y, z = lung.xyz
        hil_x, hil_z = lung.pct("x", 90 if side == "right" else 10), lung.pct("z", 55)
        wgt = np.exp(-(((x - hil_x) / 30.0) ** 2 + ((z - hil_z) / 35.0) ** 2))
        wgt = np.broadcast_to(wgt, lung.inside.shape)
        near, wbox = _crop(wgt > 0.05)
        src = _indices(vp, lung.box, _part(x, wbox), _part(y, wbox), _part(z, wbox) - shift * wbox.take(wgt))
        moved = ndimage.map_coordinates(_take(vp.mu, lung.box), src, order=1, mode="nearest", prefilter=False)
        return wbox, near, moved
    return _view_cache(vp, ("hilum", side, float(shift)), make)


def atelectasis(vp, names, label, rng) -> list[Drawn]:
    """Volume loss: the lobe collapsed toward its hilum (upper lobes up and in, the middle lobe and lingula
    in, lower lobes down, in and back), denser as its air is lost; its edge is the displaced fissure; the
    rest of the lung over-expands into the space (fewer markings) and the hilum moves toward the collapse."""
    sev = _SEV[label.severity]
    out = []
    for loc in _collapse_lobe(label.location):
        side = "left" if loc.startswith("left") or loc == "lingula" else "right"
        lung_s = _lung(vp, names, side)
        box, lung = lung_s.box, lung_s.inside
        c = _collapse_setup(vp, names, loc, side)
        lobe, kind, obox = c["lobe"], c["kind"], c["obox"]
        medial, hy, hz = c["medial"], c["hy"], c["hz"]
        s_lat = (0.72, 0.52, 0.36)[sev] * rng.uniform(0.95, 1.05)
        s_z = (0.82, 0.66, 0.5)[sev] * rng.uniform(0.95, 1.05)
        if kind == "middle":
            s_lat, s_z = s_lat * 0.8, min(1.0, s_z * 1.2)
        x, y, z = (_part(a, obox) for a in lung_s.xyz)
        qx, qy, qz = medial + (x - medial) / s_lat, hy + (y - hy) / (0.5 + 0.5 * s_lat), hz + (z - hz) / s_z
        idx = _indices(vp, _offset(box, obox), qx, qy, qz)
        collapsed_o = ndimage.map_coordinates(c["occ"], idx, order=1, mode="constant", cval=0.0,
                                              prefilter=False) > 0.5
        collapsed_o &= obox.take(lung)
        mu = _take(vp.mu, box)
        _, qmu = _lookup(vp, box, lobe, mu, qx, qy, qz)
        vol = s_lat * s_z * (0.5 + 0.5 * s_lat)
        dense = np.clip(np.maximum(qmu, c["lobe_mu"]) / vol, 0.0, MU_SOFT * 0.97)
        collapsed = np.zeros(lung.shape, bool)
        collapsed[obox.planes, obox.rows, obox.cols] = collapsed_o
        new_mu = mu.copy()
        # the vacated lobe: over-expanded neighbouring lung, lucent, with few vessels
        new_mu[lobe & ~collapsed] = c["parench"] * 0.85
        new_o = new_mu[obox.planes, obox.rows, obox.cols]
        new_o[collapsed_o] = dense[collapsed_o]
        # the hilum moves toward the collapse (up for an upper lobe, down for a lower one)
        shift = (5.0, 9.0, 13.0)[sev] * {"upper": 1.0, "middle": 0.3, "lower": -0.8}[kind]
        wbox, near, moved = _hilum_shift(vp, names, side, shift)
        movable = near & wbox.take(lung) & ~wbox.take(lobe) & ~wbox.take(collapsed)
        new_w = new_mu[wbox.planes, wbox.rows, wbox.cols]
        new_w[movable] = moved[movable]
        delta_mu = (new_mu - mu) * lung
        out.append(_finish(vp, label.finding, box, collapsed, delta_mu))
    return out


# ----------------------------------------------------------------------------- edema

EDEMA_REACH = (0.45, 0.6, 0.78)


def _edema_field(vp, names, side: str):
    """Per view and side: the lung, each voxel's normalised distance from the hilum (on the box the widest
    haze reaches) and, per severity, the box its haze reaches."""
    lung = _lung(vp, names, side)

    def make():
        x, y, z = lung.xyz
        hx = lung.pct("x", 92 if side == "right" else 8)
        hz, hy = lung.pct("z", 50), _mean(lung, "y")
        half_w = lung.pct("x", 100) - lung.pct("x", 0) + 1e-3
        half_h = (lung.pct("z", 100) - lung.pct("z", 0)) / 2 + 1e-3
        r = np.sqrt(((x - hx) / half_w) ** 2 + ((z - hz) / half_h) ** 2 + ((y - hy) / (1.2 * half_w)) ** 2)
        r = np.where(lung.inside, r, np.float32(np.inf)).astype(np.float32)
        _, reach_box = _crop(r < max(EDEMA_REACH))
        r = np.ascontiguousarray(reach_box.take(r))
        r.setflags(write=False)
        subs = [_crop(r < reach)[1] for reach in EDEMA_REACH]
        rows = np.flatnonzero(lung.inside.any(axis=(0, 2)))
        return r, reach_box, subs, rows
    return lung, _view_cache(vp, ("edema", side), make)


def edema(vp, names, label, rng) -> list[Drawn]:
    """Pulmonary oedema, bilateral by default: a perihilar haze fading outwards (bat-wing when severe),
    septal (Kerley B) lines at the lateral bases, graded: mild interstitial, moderate, severe alveolar."""
    sev = _SEV[label.severity]
    out = []
    for side in _sides(label.location, "bilateral"):
        lung_s, (r_all, reach_box, subs, rws) = _edema_field(vp, names, side)
        box, lung = lung_s.box, lung_s.inside
        reach = EDEMA_REACH[sev]
        strength = (0.22, 0.38, 0.62)[sev]
        mu = _take(vp.mu, box)
        # the haze, on the box it reaches (r is infinite off the lung: no haze there)
        sub = subs[sev]
        hbox = _offset(reach_box, sub)
        r = sub.take(r_all)
        noise = _smooth_noise(rng, r.shape, _cells(_offset(box, hbox), vp, 25.0))
        fall = np.clip((reach - r) / (0.45 * reach), 0.0, 1.0) ** 1.5 * (1.0 + 0.25 * np.clip(noise, -2, 2))
        haze = fall > 0.02
        region = np.zeros(lung.shape, bool)
        region[hbox.planes, hbox.rows, hbox.cols] = haze
        delta_mu = np.zeros(lung.shape, np.float32)
        delta_mu[hbox.planes, hbox.rows, hbox.cols] = np.maximum(MU_FLUID * strength * fall - hbox.take(mu), 0.0) * haze
        # septal lines: thin horizontal sheets within 2 cm of the lateral pleura, in the lower half
        if rws.size:
            lo_r = int(rws[0] + 0.5 * (rws[-1] - rws[0]))
            hi_r = int(rws[0] + 0.85 * (rws[-1] - rws[0]))
            n = (5, 8, 10)[sev]
            chosen = sorted(rng.choice(np.arange(lo_r, max(hi_r, lo_r + 1)), size=min(n, max(1, hi_r - lo_r)),
                                       replace=False))
            ax = np.broadcast_to(np.abs(lung_s.xyz[0]), lung.shape)
            line_mu = MU_FLUID * (0.3 + 0.08 * sev)
            for rr in chosen:
                row_lung = lung[:, rr, :]
                if not row_lung.any():
                    continue
                edge = float(ax[:, rr, :][row_lung].max())
                length = rng.uniform(10.0, 20.0)
                line = row_lung & (ax[:, rr, :] > edge - length)
                region[:, rr, :] |= line
                np.maximum(delta_mu[:, rr, :], line_mu - mu[:, rr, :], out=delta_mu[:, rr, :], where=line)
        out.append(_finish(vp, label.finding, box, region, delta_mu))
    return out


# ----------------------------------------------------------------------------- pleural thickening, plaque

MU_CALCIUM = MU_WATER * 2.6   # calcified plaque (per mm)


def _shell(lung: np.ndarray, vp, mm: float) -> np.ndarray:
    """The lung's outer layer ``mm`` thick (the pleural surface), by erosion on the ray-space grid."""
    g = vp.geometry
    px = g.pixel_iso * g.height / vp.finding_shape[0]
    pf = float(np.mean(vp.plane_thickness))
    k = max(1, int(round(mm / px)))
    kp = max(1, int(round(mm / pf)))
    core = ndimage.minimum_filter(lung.view(np.uint8), size=(2 * kp + 1, 2 * k + 1, 2 * k + 1), mode="nearest")
    return lung & ~core.astype(bool)


def pleural_other(vp, names, label, rng) -> list[Drawn]:
    """Pleural thickening (a soft-tissue rind along the lateral chest wall and apex) or calcified plaques
    (dense, irregular, on the lateral wall and the diaphragm), drawn at the lung's surface."""
    out = []
    for side in _sides(label.location, "right"):
        ids = _lung_ids(names, side)
        box = _box_of(vp, ids)
        lung = np.isin(box.take(vp.labels), ids)
        x, y, z = _patient_coords(vp, box)
        mu = box.take(vp.mu).astype(np.float32)
        lx, lz = x[lung], z[lung]
        ax = np.abs(x)
        lateral = ax > float(np.percentile(np.abs(lx), 55))
        if rng.uniform() < 0.5:  # thickening: a smooth rind 4-9 mm, lateral wall from apex to the base
            t = rng.uniform(4.0, 9.0)
            shell = _shell(lung, vp, t)
            noise = _smooth_noise(rng, lung.shape, _cells(box, vp, 45.0))
            z_lo = float(np.percentile(lz, rng.uniform(10, 35)))
            region = shell & lateral & (z > z_lo) & (noise > -0.6)
            target = MU_SOFT
        else:  # plaques: discrete calcified patches on the lateral and diaphragmatic pleura
            shell = _shell(lung, vp, 3.0)
            noise = _smooth_noise(rng, lung.shape, _cells(box, vp, 22.0))
            basal = z < float(np.percentile(lz, 18))
            region = shell & (lateral | basal) & (noise > 1.0) & (z < float(np.percentile(lz, 75)))
            target = MU_CALCIUM
        if not region.any():
            region = _shell(lung, vp, 5.0) & lateral
            target = MU_SOFT
        delta_mu = np.where(region, np.maximum(target - mu, 0.0), 0.0).astype(np.float32)
        out.append(_finish(vp, label.finding, box, region, delta_mu))
    return out


# ----------------------------------------------------------------------------- rib fracture

def _lung_projection(vp, names) -> np.ndarray:
    """Where the film shows aerated lung (the lungs' projection less a rim, not over the diaphragm or heart)."""
    ids = tuple(names[p] for p in RIGHT + LEFT if p in names)

    def make():
        lungs = ndimage.binary_erosion(np.isin(vp.labels, ids).any(axis=0), iterations=4)
        full = slice(0, vp.labels.shape[0]), slice(0, vp.labels.shape[1]), slice(0, vp.labels.shape[2])
        li = vp.project(vp.mu, *full)
        return lungs & (li < np.percentile(li[lungs], 45))
    return _view_cache(vp, ("aerated", ids), make)


def fracture(vp, names, label, rng) -> list[Drawn]:
    """A healing rib fracture on the named side: a break across the posterior arc of one of ribs 3-7 where it crosses
    aerated lung and runs across the beam, the distal fragment displaced downwards by about a rib's height and
    overriding (fading back over 3 cm), with a fusiform callus cuffing the break (the form in which a rib fracture reads on a film at
    256 x 256; an undisplaced acute break is occult there, as it often is on real films). The mask is the break
    with its callus."""
    side = _sides(label.location, "right")[0]
    ribs = [f"rib_{side}_{n}" for n in (3, 4, 5, 6, 7) if f"rib_{side}_{n}" in names]
    rng.shuffle(ribs)
    g = vp.geometry
    h, _ = vp.finding_shape
    pf = g.pixel_iso * g.height / h
    # the posterior arc first; where no rib offers one (a rotated or shallow film), any arc across the beam
    for rib_name, posterior in [(r, True) for r in ribs] + [(r, False) for r in ribs]:
        rid = names[rib_name]
        box0 = _box_of(vp, [rid])
        if box0 is None:
            continue
        box = _grow(box0, vp.labels.shape, 4, 8)
        rib = box.take(vp.labels) == rid
        x, y, z = _patient_coords(vp, box)
        rx, ry, rz = x[rib], y[rib], z[rib]
        if rx.size < 30:
            continue
        # the posterior arc, lateral of the spine: there a rib runs across the beam of a frontal film and reads
        # best; a lateral film sees the same arc end-on behind the lung (the lateral arc runs along the beam of a
        # frontal film and hides a break)
        ax = np.abs(rx)
        over_lung = _lung_projection(vp, names)[box.rows, box.cols]
        pr = np.nonzero(rib)
        cand = np.flatnonzero((ax >= np.percentile(ax, 30)) & (ax <= np.percentile(ax, 80))
                              & ((ry <= np.percentile(ry, 45)) | (not posterior)) & over_lung[pr[1], pr[2]])
        allp = np.stack([rx, ry, rz], 1)
        p0 = direction = None
        best = 0.8  # the most across the beam of up to 16 tries
        for k in rng.permutation(cand)[:16]:
            q = allp[k]
            near = np.sum((allp - q) ** 2, axis=1) < 15.0 ** 2
            if near.sum() < 10:
                continue
            pts = allp[near]
            dvec = np.linalg.svd(pts - pts.mean(0), full_matrices=False)[2][0]
            along_beam = abs(dvec[1]) if g.view != "LL" else abs(dvec[0])
            if along_beam < best:
                p0, direction, best = q, dvec, along_beam
        if p0 is None:
            continue
        if direction[0] * np.sign(p0[0] or 1.0) < 0:  # the distal fragment: away from the spine
            direction = -direction
        s = (x - p0[0]) * direction[0] + (y - p0[1]) * direction[1] + (z - p0[2]) * direction[2]
        dist0 = np.sqrt((x - p0[0]) ** 2 + (y - p0[1]) ** 2 + (z - p0[2]) ** 2)
        gap = rng.uniform(4.0, 6.0)
        disp = rng.uniform(8.0, 12.0)          # step-off, about a rib's height
        along = rng.uniform(3.0, 6.0)          # overriding of the fragments (a double density)
        wgt = np.where(s > 0, np.clip(1.0 - s / FRACTURE_FADE_MM, 0.0, 1.0), 0.0)
        mu = box.take(vp.mu).astype(np.float32)
        src = _indices(vp, box, x + direction[0] * along * wgt, y + direction[1] * along * wgt,
                       z + disp * wgt)
        moved = ndimage.map_coordinates(mu, src, order=1, mode="nearest", prefilter=False)
        src_rib = ndimage.map_coordinates(rib.astype(np.float32), src, order=1, mode="constant",
                                          prefilter=False) > 0.5
        around = ndimage.binary_dilation(rib, iterations=2) & ~rib
        bg = float(np.median(mu[around])) if around.any() else MU_WATER
        bone = float(np.percentile(mu[rib], 75))
        new_mu = np.where(src_rib, moved, np.where(rib, bg, mu))
        new_mu = np.where(wgt > 0, new_mu, mu)
        break_zone = (np.abs(s) < gap / 2) & (dist0 < 14.0)
        new_mu = np.where(break_zone & (rib | src_rib), bg, new_mu)
        # callus: a fusiform cuff of new bone around both fragment ends, thickest at the break
        half = rng.uniform(8.0, 12.0)
        thick = rng.uniform(4.0, 6.0)
        bone_now = rib | src_rib
        reach = ndimage.distance_transform_edt(~bone_now, sampling=(float(np.mean(vp.plane_thickness)), pf, pf))
        taper = np.clip(1.0 - (s / half) ** 2, 0.0, 1.0)
        callus = (reach <= thick * taper) & (dist0 < half + 10.0) & ~break_zone
        density = rng.uniform(0.8, 1.1)
        new_mu = np.where(callus & ~bone_now, np.maximum(new_mu, bg + density * (bone - bg)), new_mu)
        # the ray-space grid smooths a rib's thin cortex away: the break is drawn at the film's rib contrast
        delta_mu = ((new_mu - mu) * 1.8).astype(np.float32)
        # the mask: the break, its callus and the displaced fragment out to where it rejoins the rib's course
        region = (bone_now | callus) & (dist0 < FRACTURE_FADE_MM + 6.0) & (s > -(half + 2.0)) \
            & (s < FRACTURE_FADE_MM + 2.0)
        return [_finish(vp, "fracture", box, region, delta_mu)]
    raise FindingNotDrawable(f"fracture: the anatomy has no rib 3-7 on the {side} side in this view's field")


# ----------------------------------------------------------------------------- geometry helpers (patient -> film)

def _project_points(vp, pts: np.ndarray):
    """Patient points [N, 3] (mm) -> fractional finding-grid (row, col) and depth (mm along the beam)."""
    full = Box(slice(0, vp.labels.shape[0]), slice(0, vp.labels.shape[1]), slice(0, vp.labels.shape[2]))
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    _, ri, ci = _indices(vp, full, x, y, z)
    g = vp.geometry
    d = y if g.view == "PA" else -y if g.view == "AP" else x
    return np.asarray(ri, float), np.asarray(ci, float), np.asarray(d, float)


def _centreline(vp, names, structure: str, step_mm: float = 6.0) -> np.ndarray:
    """Centre (x, y, z; mm) of a structure's voxels in bins of height, from the top down: [N, 3]."""
    sid = names.get(structure)
    box = _box_of(vp, [sid]) if sid is not None else None
    if box is None:
        raise FindingNotDrawable(f"the anatomy has no structure {structure!r} in this view's field")
    sel = box.take(vp.labels) == sid
    x, y, z = (a[sel] for a in _patient_coords(vp, box))
    bins = np.floor((z - z.min()) / step_mm).astype(int)
    out = [(x[bins == b].mean(), y[bins == b].mean(), z[bins == b].mean()) for b in np.unique(bins)[::-1]]
    return np.array(out)


def _smooth_path(points, step_mm: float = 1.0, smooth: float = 4.0) -> np.ndarray:
    """A polyline through control points, resampled every ``step_mm`` and smoothed (no kinks)."""
    p = np.asarray(points, float)
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, s[-1] + 1e-9, step_mm)
    dense = np.stack([np.interp(t, s, p[:, k]) for k in range(3)], axis=1)
    if smooth > 0 and len(dense) > 3:
        dense = ndimage.gaussian_filter1d(dense, smooth / step_mm, axis=0, mode="nearest")
    return dense


def _tube(vp, path: np.ndarray, radius: float, mu: float, inner: float = 0.0):
    """Line integral (finding grid) and footprint of a tube along a 3D path (patient mm), projected
    analytically: a solid wire conserves its cross-section (mu pi r^2) over a profile at least a pixel
    wide; a hollow tube (``inner`` > 0) shows its two walls. Returns (delta, mask, mean depth)."""
    h, w = vp.finding_shape
    g = vp.geometry
    pf = g.pixel_iso * g.height / h
    ri, ci, d = _project_points(vp, path)
    back = g.sod / (g.sod + d)              # object mm -> isocentre mm
    r_px = radius * back / pf
    pad = int(np.ceil(r_px.max() + 4))
    r0, r1 = max(int(np.floor(ri.min())) - pad, 0), min(int(np.ceil(ri.max())) + pad + 1, h)
    c0, c1 = max(int(np.floor(ci.min())) - pad, 0), min(int(np.ceil(ci.max())) + pad + 1, w)
    delta = np.zeros((h, w), np.float32)
    mask = np.zeros((h, w), bool)
    if r0 >= r1 or c0 >= c1:
        return delta, mask, float(np.mean(d))
    # distance to the path: to its nearest point, the path resampled every 0.2 pixel (within 0.01 pixel
    # of the distance to the polyline where it matters); nothing farther than ``pad`` is looked at
    seg = np.hypot(np.diff(ri), np.diff(ci))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, arc[-1], max(2, int(np.ceil(arc[-1] / 0.2)) + 1))
    dense = np.stack([np.interp(t, arc, ri), np.interp(t, arc, ci)], 1)
    R, C = np.mgrid[r0:r1, c0:c1]
    best, j = cKDTree(dense).query(np.stack([R.ravel(), C.ravel()], 1).astype(np.float64), distance_upper_bound=pad)
    best = best.reshape(R.shape).astype(np.float32)
    near_r = np.interp(t, arc, r_px)[np.minimum(j, len(t) - 1)].reshape(R.shape).astype(np.float32)
    D = best * pf / np.maximum(near_r * pf / radius, 1e-6)   # distance in object mm
    if inner > 0:
        prof = 2.0 * mu * (np.sqrt(np.clip(radius ** 2 - D ** 2, 0, None)) - np.sqrt(np.clip(inner ** 2 - D ** 2, 0, None)))
        prof = ndimage.gaussian_filter(prof, 0.5)
    else:
        s = np.sqrt((radius / 2) ** 2 + (0.6 * pf) ** 2)
        prof = mu * np.pi * radius ** 2 / (np.sqrt(2 * np.pi) * s) * np.exp(-0.5 * (D / s) ** 2)
    delta[r0:r1, c0:c1] = prof
    mask[r0:r1, c0:c1] = best <= near_r + 0.5
    return delta, mask, float(np.mean(d))


def _slab_at(vp, depth: float) -> int:
    return int(np.argmin(np.abs(vp.slab_depth - depth)))


# ----------------------------------------------------------------------------- support devices

MU_PLASTIC = MU_WATER * 1.5        # tube wall (PVC)
MU_STRIPE = 1.4                    # radio-opaque stripe of a tube (per mm, barium-loaded)
MU_CATHETER = 0.7                  # radio-opaque (barium-loaded) catheter (per mm)
MU_LEAD = 0.8                      # pacing lead: metal coil (per mm, effective)
MU_TITANIUM = 0.12                 # pacemaker can (per mm, titanium at 60 keV)
DEVICES = ("endotracheal_tube", "central_venous_catheter", "pacemaker")


def _top_z(vp) -> float:
    """Patient z (mm) above the film's top edge."""
    g = vp.geometry
    r_iso, _ = g.iso_coords(*vp.finding_shape[::-1])
    return float(-r_iso[0]) + 30.0


def endotracheal_tube(vp, names, finding: str, rng) -> list[Drawn]:
    """A tube down the trachea, its tip 3-6 cm above the carina: two faint walls and a radio-opaque stripe."""
    trachea = _centreline(vp, names, "trachea", 8.0)
    carina = float(trachea[-1, 2])
    tip = carina + rng.uniform(30.0, 60.0)
    path = trachea[trachea[:, 2] > tip]
    top = path[0] + np.array([rng.uniform(-4, 4), 8.0, 0.0])
    top[2] = _top_z(vp)
    pts = np.vstack([top, path, [[path[-1, 0], path[-1, 1], tip]]])
    path = _smooth_path(pts, 1.0, 6.0)
    path = path[path[:, 2] >= tip]
    wall, m1, depth = _tube(vp, path, 5.5, MU_PLASTIC - MU_WATER * 0.2, inner=4.3)
    stripe_path = path + np.array([rng.uniform(-3.5, 3.5), 0.0, 0.0])
    stripe, m2, _ = _tube(vp, stripe_path, 0.8, MU_STRIPE)
    return [Drawn(finding, wall + stripe, m1 | m2, _slab_at(vp, depth))]


def central_venous_catheter(vp, names, finding: str, rng) -> list[Drawn]:
    """A catheter from an internal jugular vein through the brachiocephalic vein to the low SVC."""
    side = "right" if rng.uniform() < 0.7 else "left"
    svc = _centreline(vp, names, "superior_vena_cava", 6.0)
    try:
        bcv = _centreline(vp, names, f"brachiocephalic_vein_{side}", 6.0)
    except FindingNotDrawable:
        bcv = svc[:1]
    trachea = _centreline(vp, names, "trachea", 10.0)
    sign = -1.0 if side == "right" else 1.0
    jug = np.array([trachea[0, 0] + sign * rng.uniform(24, 32), trachea[0, 1] + 8.0, _top_z(vp)])
    if side == "left":  # the left vein runs across to the right, above the arch
        bcv = bcv[np.argsort(-bcv[:, 0])] if len(bcv) > 1 else bcv
    tip = svc[-1] + np.array([0.0, 0.0, rng.uniform(0.0, 15.0)])
    pts = np.vstack([jug, bcv, svc[svc[:, 2] > tip[2]], tip])
    path = _smooth_path(pts, 1.0, 8.0)
    delta, mask, depth = _tube(vp, path, 1.1, MU_CATHETER)
    return [Drawn(finding, delta, mask, _slab_at(vp, depth))]


def pacemaker(vp, names, finding: str, rng) -> list[Drawn]:
    """A generator under the clavicle (left mostly) with leads through the veins to the right atrium and the
    right ventricular apex."""
    side = "left" if rng.uniform() < 0.85 else "right"
    sign = 1.0 if side == "left" else -1.0
    lung_ids = _lung_ids(names, side)
    lbox = _box_of(vp, lung_ids)
    lung = np.isin(lbox.take(vp.labels), lung_ids)
    lx, ly, lz = (a[lung] for a in _patient_coords(vp, lbox))
    apex_z = float(np.percentile(lz, 99))
    gz = apex_z - rng.uniform(25.0, 40.0)
    level = np.abs(lz - gz) < 15.0   # under the skin in front of the lung at the can's height
    gen = np.array([sign * float(np.percentile(np.abs(lx), 55)) * rng.uniform(0.9, 1.1),
                    float(np.percentile(ly[level] if level.any() else ly, 99)) + 22.0, gz])
    hid = names.get("heart")
    hbox = _box_of(vp, [hid]) if hid is not None else None
    if hbox is None:
        raise FindingNotDrawable("the anatomy has no structure 'heart' (needed for pacemaker leads)")
    heart = hbox.take(vp.labels) == hid
    hx, hy, hz = (a[heart] for a in _patient_coords(vp, hbox))
    k = np.argmax(hx - 0.7 * hz + 0.3 * hy)                        # the apex: left, low, anterior
    rv = np.array([hx[k], hy[k], hz[k]]) + np.array([-12.0, -6.0, 10.0])
    zr = np.percentile(hz, 70)
    band = np.abs(hz - zr) < 8
    ra = np.array([np.percentile(hx[band], 8) + 14.0, np.median(hy[band]), zr])
    svc = _centreline(vp, names, "superior_vena_cava", 8.0)
    entry = np.array([sign * float(np.percentile(np.abs(lx), 35)), gen[1] - 25.0, apex_z - 8.0])
    vein = np.vstack([entry, svc[:: max(1, len(svc) // 3)]])
    lead_rv = _smooth_path(np.vstack([gen + [-sign * 18.0, 0, 10.0], vein, ra + [4.0, 0, -15.0], rv]), 1.0, 7.0)
    lead_ra = _smooth_path(np.vstack([gen + [-sign * 14.0, 0, 12.0], vein, ra + [0, 0, -10.0], ra + [6.0, 8.0, 6.0]]),
                           1.0, 5.0)
    out = []
    for lead in (lead_rv, lead_ra):
        d, m, depth = _tube(vp, lead, 1.0, MU_LEAD)
        out.append(Drawn(finding, d, m, _slab_at(vp, depth)))
    # the can: a rounded box 50 x 45 x 8 mm (x, z, y), with a denser battery and a lighter header
    h, w = vp.finding_shape
    gpts = gen[None, :]
    ri, ci, depth = _project_points(vp, gpts)
    g = vp.geometry
    pf = g.pixel_iso * g.height / h
    back = float(g.sod / (g.sod + depth[0]))
    R, C = np.mgrid[0:h, 0:w].astype(np.float32)
    du = (C - ci[0]) * pf / back                        # mm, along the film's columns
    dv = (R - ri[0]) * pf / back                        # mm, downwards
    half_w = 25.0 if g.view != "LL" else 4.0           # the lateral film sees the can edge-on
    depth_mm = 8.0 if g.view != "LL" else 50.0
    q = (np.abs(du) / half_w) ** 4 + (np.abs(dv) / 22.5) ** 4
    can = np.clip((1.0 - q) * 8.0, 0.0, 1.0) * MU_TITANIUM * depth_mm
    batt = (np.abs(du) < 0.7 * half_w) & (dv > -6.0) & (dv < 16.0)
    can = can * (1.0 + 0.5 * ndimage.gaussian_filter(batt.astype(np.float32), 0.8))
    header = (np.abs(du) < 0.8 * half_w) & (dv > -36.0) & (dv < -22.0)
    can = can + header * MU_WATER * 1.3 * depth_mm
    cmask = (q <= 1.0) | header
    out.append(Drawn(finding, can.astype(np.float32), cmask, _slab_at(vp, float(depth[0]))))
    return out


def device(vp, names, label, rng) -> list[Drawn]:
    """A support device; ``support_devices`` draws one of the three at random (as the phantom does)."""
    kind = label.finding if label.finding in DEVICES else DEVICES[int(rng.integers(len(DEVICES)))]
    fn = {"endotracheal_tube": endotracheal_tube, "central_venous_catheter": central_venous_catheter,
          "pacemaker": pacemaker}[kind]
    return fn(vp, names, label.finding, rng)


# ----------------------------------------------------------------------------- dispatch

def finding_rng(case, finding: str, k: int) -> np.random.Generator:
    return case_rng(case, STREAM_FINDING, zlib.crc32(finding.encode()), k)


def check_drawable(findings) -> None:
    """Refuse findings this backend does not draw yet, naming them."""
    bad = sorted({f for f in findings if f != "no_finding" and f not in DRAWN})
    if bad:
        raise FindingNotDrawable(
            f"the drr backend cannot draw {', '.join(bad)} yet (it draws: {', '.join(DRAWN)}); "
            "use the phantom backend for these findings")


def draw(vp, names, label, rng) -> list[Drawn]:
    """The finding of one label (not cardiomegaly: the renderer sizes the heart to its CTR band)."""
    f = label.finding
    if f == "consolidation":
        return [airspace(vp, names, label, rng, kind="lobar")]
    if f == "pneumonia":
        return [airspace(vp, names, label, rng, kind="patchy")]
    if f == "lung_opacity":
        return [airspace(vp, names, label, rng, kind="haze")]
    if f in ("nodule", "mass"):
        return [lesion(vp, names, label, rng, kind=f)]
    if f == "lung_lesion":
        sev = _SEV[label.severity]
        kind = "nodule" if sev == 0 else "mass" if sev == 2 else ("nodule", "mass")[int(rng.integers(2))]
        return [lesion(vp, names, label, rng, kind=kind)]
    if f == "pleural_effusion":
        return effusion(vp, names, label, rng)
    if f == "pneumothorax":
        return pneumothorax(vp, names, label, rng)
    if f == "enlarged_cardiomediastinum":
        return [enlarged_mediastinum(vp, names, label, rng)]
    if f == "atelectasis":
        return atelectasis(vp, names, label, rng)
    if f == "edema":
        return edema(vp, names, label, rng)
    if f == "pleural_other":
        return pleural_other(vp, names, label, rng)
    if f == "fracture":
        return fracture(vp, names, label, rng)
    if f == "support_devices" or f in DEVICES:
        return device(vp, names, label, rng)
    check_drawable([f])
    return []

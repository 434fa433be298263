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
from functools import lru_cache

import numpy as np
from scipy import ndimage

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
NODULE_MM = (9.0, 16.0, 26.0)
MASS_MM = (36.0, 50.0, 70.0)

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

@lru_cache(maxsize=8)
def _boxes(vp: ViewProjection) -> list:
    """Bounding box of every label value in ray space (ndimage.find_objects; one pass, cached)."""
    return ndimage.find_objects(vp.labels)


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


def _patient_coords(vp: ViewProjection, box: Box):
    """Patient coordinates (x left, y anterior, z superior; mm) of a box's voxels, broadcast [D, h, w]."""
    d, r, c = vp.grid_coords(box.planes, box.rows, box.cols)
    x, y, z = to_patient(vp.geometry.view, d, r, c)
    return np.broadcast_arrays(x, y, z)


def _smooth_noise(rng: np.random.Generator, shape: tuple, cells: tuple) -> np.ndarray:
    """Band-limited noise of unit standard deviation with about ``cells`` blobs along each axis."""
    coarse = rng.standard_normal(tuple(max(2, int(c)) + 2 for c in cells)).astype(np.float32)
    out = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1, grid_mode=True,
                       mode="nearest")
    out = out[tuple(slice(0, s) for s in shape)]
    pad = [(0, s - o) for s, o in zip(shape, out.shape)]
    if any(p[1] for p in pad):
        out = np.pad(out, pad, mode="edge")
    return (out - out.mean()) / (out.std() + 1e-6)


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
    weights = np.abs(delta_mu).sum(axis=(1, 2))
    return Drawn(finding, delta, mask, vp.slab_of(weights, box.planes))


# ----------------------------------------------------------------------------- where

def location_region(vp: ViewProjection, names: dict, location: str | None, default: str) -> tuple[Box, np.ndarray]:
    """The ray-space box and boolean region of a vocabulary location (lobe, zone or side)."""
    loc = location or default
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
    r = diam / 2
    box, lobe = location_region(vp, names, label.location, "right_upper_lobe")
    x, y, z = _patient_coords(vp, box)
    idx = np.flatnonzero(lobe)
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
    delta_mu = np.where(region, np.maximum(MU_SOFT - mu, 0.0) * edge, 0.0).astype(np.float32)
    return _finish(vp, label.finding, box, region, delta_mu)


# ----------------------------------------------------------------------------- pleura

def effusion(vp, names, label, rng) -> list[Drawn]:
    """Pleural fluid: upright films (PA, LL) a meniscus rising at the costophrenic angle and the chest wall;
    AP (supine, bedside) a dependent layer along the back, a haze graded down the hemithorax."""
    sev = _SEV[label.severity]
    out = []
    for side in _sides(label.location, "right"):
        ids = _lung_ids(names, side)
        box = _box_of(vp, ids)
        lung = np.isin(box.take(vp.labels), ids)
        x, y, z = _patient_coords(vp, box)
        zs = z[lung]
        z_lo, z_hi = float(zs.min()), float(zs.max())
        height = z_hi - z_lo
        if vp.geometry.view == "AP":
            ys = y[lung]
            y_lo, y_hi = float(ys.min()), float(ys.max())
            depth = (0.18, 0.33, 0.55)[sev] * (y_hi - y_lo) * rng.uniform(0.9, 1.1)
            # thicker at the base: fluid also pools in the posterior costophrenic recess
            level = y_lo + depth * (1.0 + 0.6 * np.clip((z_lo + 0.35 * height - z) / (0.35 * height), 0, 1))
            region = lung & (y <= level)
        else:
            xc, yc = float(x[lung].mean()), float(y[lung].mean())
            ax = float(np.ptp(x[lung])) / 2 + 1e-3
            ay = float(np.ptp(y[lung])) / 2 + 1e-3
            rho2 = ((x - xc) / ax) ** 2 + ((y - yc) / ay) ** 2
            frac = (0.17, 0.33, 0.55)[sev] * rng.uniform(0.9, 1.1)
            surface = z_lo + frac * height + 0.12 * height * np.clip(rho2, 0.0, 1.5)  # the meniscus
            region = lung & (z <= surface)
        mu = box.take(vp.mu).astype(np.float32)
        delta_mu = np.where(region, np.maximum(MU_FLUID - mu, 0.0), 0.0).astype(np.float32)
        out.append(_finish(vp, label.finding, box, region, delta_mu))
    return out


def pneumothorax(vp, names, label, rng) -> list[Drawn]:
    """Air in the pleural space: the lung collapsed toward its hilum by severity, no lung markings beyond
    its edge, the visceral pleura a thin line. The mask is where the film shows pleural air and no lung."""
    sev = _SEV[label.severity]
    out = []
    for side in _sides(label.location, "right"):
        ids = _lung_ids(names, side)
        box = _box_of(vp, ids)
        lung = np.isin(box.take(vp.labels), ids)
        mu = box.take(vp.mu).astype(np.float32)
        x, y, z = _patient_coords(vp, box)
        xs, zs = x[lung], z[lung]
        medial = float(np.percentile(xs, 95 if side == "right" else 5))
        hx, hy, hz = medial, float(y[lung].mean()), float(np.percentile(zs, 40))
        s = (0.8, 0.62, 0.45)[sev] * rng.uniform(0.95, 1.05)
        sz = s * 0.9  # upright: the apex drops most
        # voxel p lies in the collapsed lung if its pre-image h + (p - h) / s is lung
        qx, qy, qz = hx + (x - hx) / s, hy + (y - hy) / (0.5 + 0.5 * s), hz + (z - hz) / sz
        inside, qmu = _lookup(vp, box, lung, mu, qx, qy, qz)
        collapsed = inside & lung
        air = lung & ~collapsed
        new_mu = np.where(collapsed, np.minimum(qmu / (s * s), MU_WATER * 0.6), 0.0)
        # the visceral pleura: the collapsed lung's outer shell
        shell = collapsed & ~ndimage.binary_erosion(collapsed, iterations=1)
        new_mu = np.where(shell, np.maximum(new_mu, MU_WATER * 1.3), new_mu)
        delta_mu = np.where(lung, new_mu - mu, 0.0).astype(np.float32)
        visible = air.any(axis=0) & ~collapsed.any(axis=0)
        out.append(_finish(vp, label.finding, box, air, delta_mu, visible=visible))
    return out


def _indices(vp, box: Box, qx, qy, qz):
    """Fractional ray-space indices (relative to ``box``) of patient points (mm)."""
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
    back = g.sod / (g.sod + d)
    pi = np.interp(d, vp.plane_depth, np.arange(vp.plane_depth.size)) - box.planes.start
    ri = (r * back - r_iso[0]) / pf_r - box.rows.start
    ci = (c * back - c_iso[0]) / pf_c - box.cols.start
    return np.broadcast_arrays(pi, ri, ci)


def _lookup(vp, box: Box, lung: np.ndarray, mu: np.ndarray, qx, qy, qz):
    """Whether patient points (qx, qy, qz) fall in ``lung`` of ``box``, and mu there (nearest voxel)."""
    pi, ri, ci = (np.rint(a).astype(np.int64) for a in _indices(vp, box, qx, qy, qz))
    ok = (pi >= 0) & (pi < lung.shape[0]) & (ri >= 0) & (ri < lung.shape[1]) & (ci >= 0) & (ci < lung.shape[2])
    pi, ri, ci = (np.where(ok, a, 0) for a in (pi, ri, ci))
    inside = ok & lung[pi, ri, ci]
    return inside, np.where(inside, mu[pi, ri, ci], 0.0)


def _warped_region(vp, box: Box, region: np.ndarray, qx, qy, qz, smooth_mm: float = 3.0) -> np.ndarray:
    """``region`` moved by a mapping (its pre-image of each voxel is (qx, qy, qz)): a smoothed occupancy
    sampled trilinearly and cut at one half, so that a scaled structure has smooth, not voxel-step, edges."""
    pf = float(np.mean(vp.plane_thickness))
    g = vp.geometry
    h, _ = vp.finding_shape
    px = g.pixel_iso * g.height / h
    occ = ndimage.gaussian_filter(region.astype(np.float32), (smooth_mm / pf, smooth_mm / px, smooth_mm / px),
                                  mode="constant", truncate=2.0)
    idx = _indices(vp, box, qx, qy, qz)
    return ndimage.map_coordinates(occ, idx, order=1, mode="constant", cval=0.0, prefilter=False) > 0.5


# ----------------------------------------------------------------------------- heart and mediastinum

def heart_region(vp, names, scale: float) -> tuple[Box, np.ndarray, np.ndarray]:
    """The heart scaled by ``scale`` about its centre: (box, new heart region, original heart)."""
    hid = names.get("heart")
    if hid is None:
        raise FindingNotDrawable("the anatomy has no structure 'heart'")
    box0 = _box_of(vp, [hid])
    grow = int(np.ceil((scale - 1.0) * 0.75 * max(box0.rows.stop - box0.rows.start, box0.cols.stop - box0.cols.start,
                                                  box0.planes.stop - box0.planes.start))) + 2
    box = _grow(box0, vp.labels.shape, grow, grow) if scale > 1.0 else box0
    heart = box.take(vp.labels) == hid
    if scale == 1.0:
        return box, heart, heart
    x, y, z = _patient_coords(vp, box)
    cx, cy = float(x[heart].mean()), float(y[heart].mean())
    # the heart sits on the diaphragm and grows out to both sides (the left more) far more than up
    zs = z[heart]
    cz = float(np.percentile(zs, 15))
    cx += 0.15 * float(np.ptp(x[heart]))
    sz = 1.0 + 0.35 * (scale - 1.0)
    # the ventricles grow; the top of the heart (atria, roots of the great vessels) stays where it is, so
    # the enlargement tapers off over the heart's upper part (no flat-topped block at the hilum)
    z40, z90 = float(np.percentile(zs, 40)), float(np.percentile(zs, 90))
    t = np.clip((z - z40) / max(z90 - z40, 1.0), 0.0, 1.0)
    s_z = scale + (1.0 - scale) * (t * t * (3 - 2 * t))
    new = _warped_region(vp, box, heart, cx + (x - cx) / s_z, cy + (y - cy) / s_z, cz + (z - cz) / sz,
                         smooth_mm=5.0)
    return box, new | heart, heart


def cardiomegaly(vp, names, scale: float) -> Drawn:
    box, new, heart = heart_region(vp, names, scale)
    mu = box.take(vp.mu).astype(np.float32)
    delta_mu = np.where(new & ~heart, np.maximum(MU_FLUID * 1.02 - mu, 0.0), 0.0).astype(np.float32)
    return _finish(vp, "cardiomegaly", box, new, delta_mu)


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


def atelectasis(vp, names, label, rng) -> list[Drawn]:
    """Volume loss: the lobe collapsed toward its hilum (upper lobes up and in, the middle lobe and lingula
    in, lower lobes down, in and back), denser as its air is lost; its edge is the displaced fissure; the
    rest of the lung over-expands into the space (fewer markings) and the hilum moves toward the collapse."""
    sev = _SEV[label.severity]
    out = []
    for loc in _collapse_lobe(label.location):
        side = "left" if loc.startswith("left") or loc == "lingula" else "right"
        ids = _lung_ids(names, side)
        box = _box_of(vp, ids)
        labels = box.take(vp.labels)
        lung = np.isin(labels, ids)
        lbox, lobe_full = location_region(vp, names, loc, loc)
        lobe = np.zeros(lung.shape, bool)
        sl = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in
                   ((lbox.planes, box.planes), (lbox.rows, box.rows), (lbox.cols, box.cols)))
        lobe[sl] = lobe_full
        x, y, z = _patient_coords(vp, box)
        lx, ly, lz = x[lobe], y[lobe], z[lobe]
        medial = float(np.percentile(lx, 92 if side == "right" else 8))
        kind = "upper" if "upper" in loc else "lower" if "lower" in loc else "middle"
        hz = float(np.percentile(lz, {"upper": 80, "middle": 50, "lower": 12}[kind]))
        hy = float(np.percentile(ly, {"upper": 55, "middle": 60, "lower": 25}[kind]))
        s_lat = (0.72, 0.52, 0.36)[sev] * rng.uniform(0.95, 1.05)
        s_z = (0.82, 0.66, 0.5)[sev] * rng.uniform(0.95, 1.05)
        if kind == "middle":
            s_lat, s_z = s_lat * 0.8, min(1.0, s_z * 1.2)
        qx, qy, qz = medial + (x - medial) / s_lat, hy + (y - hy) / (0.5 + 0.5 * s_lat), hz + (z - hz) / s_z
        collapsed = _warped_region(vp, box, lobe, qx, qy, qz, smooth_mm=4.0) & lung
        mu = box.take(vp.mu).astype(np.float32)
        _, qmu = _lookup(vp, box, lobe, mu, qx, qy, qz)
        vol = s_lat * s_z * (0.5 + 0.5 * s_lat)
        dense = np.clip(np.maximum(qmu, float(np.median(mu[lobe]))) / vol, 0.0, MU_SOFT * 0.97)
        new_mu = mu.copy()
        # the vacated lobe: over-expanded neighbouring lung, lucent, with few vessels
        vacated = lobe & ~collapsed
        parench = float(np.percentile(mu[lung & ~lobe], 40)) if (lung & ~lobe).any() else float(np.median(mu[lobe]))
        new_mu[vacated] = parench * 0.85
        new_mu[collapsed] = dense[collapsed]
        # the hilum moves toward the collapse (up for an upper lobe, down for a lower one)
        shift = (5.0, 9.0, 13.0)[sev] * {"upper": 1.0, "middle": 0.3, "lower": -0.8}[kind]
        hil_x = float(np.percentile(x[lung], 90 if side == "right" else 10))
        hil_z = float(np.percentile(z[lung], 55))
        wgt = np.exp(-(((x - hil_x) / 30.0) ** 2 + ((z - hil_z) / 35.0) ** 2))
        movable = lung & ~lobe & ~collapsed
        src = _indices(vp, box, x, y, z - shift * wgt)
        moved = ndimage.map_coordinates(mu, src, order=1, mode="nearest", prefilter=False)
        new_mu = np.where(movable & (wgt > 0.05), moved, new_mu)
        delta_mu = np.where(lung, new_mu - mu, 0.0).astype(np.float32)
        out.append(_finish(vp, label.finding, box, collapsed, delta_mu))
    return out


# ----------------------------------------------------------------------------- edema

def edema(vp, names, label, rng) -> list[Drawn]:
    """Pulmonary oedema, bilateral by default: a perihilar haze fading outwards (bat-wing when severe),
    septal (Kerley B) lines at the lateral bases, graded: mild interstitial, moderate, severe alveolar."""
    sev = _SEV[label.severity]
    out = []
    for side in _sides(label.location, "bilateral"):
        ids = _lung_ids(names, side)
        box = _box_of(vp, ids)
        lung = np.isin(box.take(vp.labels), ids)
        x, y, z = _patient_coords(vp, box)
        lx, lz = x[lung], z[lung]
        hx = float(np.percentile(lx, 92 if side == "right" else 8))
        hz = float(np.percentile(lz, 50))
        hy = float(np.mean(y[lung]))
        half_w = float(np.ptp(lx)) + 1e-3
        half_h = float(np.ptp(lz)) / 2 + 1e-3
        r = np.sqrt(((x - hx) / half_w) ** 2 + ((z - hz) / half_h) ** 2 + ((y - hy) / (1.2 * half_w)) ** 2)
        reach = (0.45, 0.6, 0.78)[sev]
        strength = (0.22, 0.38, 0.62)[sev]
        noise = _smooth_noise(rng, lung.shape, _cells(box, vp, 25.0))
        fall = np.clip((reach - r) / (0.45 * reach), 0.0, 1.0) ** 1.5 * (1.0 + 0.25 * np.clip(noise, -2, 2))
        mu = box.take(vp.mu).astype(np.float32)
        target = MU_FLUID * strength * fall
        haze = lung & (fall > 0.02)
        # septal lines: thin horizontal sheets within 2 cm of the lateral pleura, in the lower half
        h_rows = lung.shape[1]
        rows_any = lung.any(axis=(0, 2))
        rws = np.flatnonzero(rows_any)
        lines = np.zeros(lung.shape, bool)
        if rws.size:
            lo_r = int(rws[0] + 0.5 * (rws[-1] - rws[0]))
            hi_r = int(rws[0] + 0.85 * (rws[-1] - rws[0]))
            n = (5, 8, 10)[sev]
            chosen = sorted(rng.choice(np.arange(lo_r, max(hi_r, lo_r + 1)), size=min(n, max(1, hi_r - lo_r)),
                                       replace=False))
            ax = np.abs(x)
            for rr in chosen:
                row_lung = lung[:, rr, :]
                if not row_lung.any():
                    continue
                edge = float(ax[:, rr, :][row_lung].max())
                length = rng.uniform(10.0, 20.0)
                lines[:, rr, :] |= row_lung & (ax[:, rr, :] > edge - length)
        region = haze | lines
        target = np.where(lines, np.maximum(target, MU_FLUID * (0.3 + 0.08 * sev)), target)
        delta_mu = np.where(region, np.maximum(target - mu, 0.0), 0.0).astype(np.float32)
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

@lru_cache(maxsize=8)
def _lung_projection_cached(vp, ids: tuple) -> np.ndarray:
    lungs = ndimage.binary_erosion(np.isin(vp.labels, ids).any(axis=0), iterations=4)
    full = slice(0, vp.labels.shape[0]), slice(0, vp.labels.shape[1]), slice(0, vp.labels.shape[2])
    li = vp.project(vp.mu, *full)
    return lungs & (li < np.percentile(li[lungs], 45))


def _lung_projection(vp, names) -> np.ndarray:
    """Where the film shows aerated lung (the lungs' projection less a rim, not over the diaphragm or heart)."""
    return _lung_projection_cached(vp, tuple(names[p] for p in RIGHT + LEFT if p in names))


def fracture(vp, names, label, rng) -> list[Drawn]:
    """A rib fracture on the named side: a cortical break across a rib's lateral arc (ribs 4-7, over the lung) with the
    distal part displaced downwards and overlapping, fading back over 6 cm. The mask is the break's region."""
    side = _sides(label.location, "right")[0]
    ribs = [f"rib_{side}_{n}" for n in (4, 5, 6, 7) if f"rib_{side}_{n}" in names]
    rng.shuffle(ribs)
    for rib_name in ribs:
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
        # the posterolateral arc, where the rib runs across the beam of a frontal film, over the lung
        # (the lateral arc runs along the beam and hides a break)
        ax = np.abs(rx)
        over_lung = _lung_projection(vp, names)[box.rows, box.cols]
        pr = np.nonzero(rib)
        cand = np.flatnonzero((ax >= np.percentile(ax, 40)) & (ax <= np.percentile(ax, 90))
                              & over_lung[pr[1], pr[2]])
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
            along_beam = abs(dvec[1]) if vp.geometry.view != "LL" else abs(dvec[0])
            if along_beam < best:
                p0, direction, best = q, dvec, along_beam
        if p0 is None:
            continue
        if direction[1] < 0:       # the displaced part: toward the front
            direction = -direction
        s = (x - p0[0]) * direction[0] + (y - p0[1]) * direction[1] + (z - p0[2]) * direction[2]
        dist0 = np.sqrt((x - p0[0]) ** 2 + (y - p0[1]) ** 2 + (z - p0[2]) ** 2)
        gap = rng.uniform(3.0, 4.5)
        disp = rng.uniform(6.0, 9.0)
        along = rng.uniform(4.0, 7.0)          # overriding of the fragments (a double density)
        wgt = np.where(s > 0, np.clip(1.0 - s / 60.0, 0.0, 1.0), 0.0)
        mu = box.take(vp.mu).astype(np.float32)
        src = _indices(vp, box, x + direction[0] * along * wgt, y + direction[1] * along * wgt,
                       z + disp * wgt)
        moved = ndimage.map_coordinates(mu, src, order=1, mode="nearest", prefilter=False)
        src_rib = ndimage.map_coordinates(rib.astype(np.float32), src, order=1, mode="constant",
                                          prefilter=False) > 0.5
        around = ndimage.binary_dilation(rib, iterations=2) & ~rib
        bg = float(np.median(mu[around])) if around.any() else MU_WATER
        new_mu = np.where(src_rib, moved, np.where(rib, bg, mu))
        new_mu = np.where(wgt > 0, new_mu, mu)
        break_zone = (np.abs(s) < gap / 2) & (dist0 < 14.0)
        new_mu = np.where(break_zone & (rib | src_rib), bg, new_mu)
        # the ray-space grid smooths a rib's thin cortex away: the break is drawn at the film's rib contrast
        delta_mu = ((new_mu - mu) * 1.8).astype(np.float32)
        region = (rib | src_rib) & (dist0 < 10.0) & (np.abs(s) < 9.0)
        return [_finish(vp, "fracture", box, region, delta_mu)]
    raise FindingNotDrawable(f"fracture: the anatomy has no rib 4-8 on the {side} side in this view's field")


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
    R, C = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    a = np.stack([ri[:-1], ci[:-1]], 1).astype(np.float32)
    b = np.stack([ri[1:], ci[1:]], 1).astype(np.float32)
    best = np.full(R.shape, np.inf, np.float32)
    near_r = np.zeros(R.shape, np.float32)
    for k0 in range(0, len(a), 64):   # distance to the nearest segment, in chunks
        aa, bb = a[k0:k0 + 64], b[k0:k0 + 64]
        ab = bb - aa
        L2 = np.maximum((ab ** 2).sum(1), 1e-9)
        t = np.clip(((R[..., None] - aa[:, 0]) * ab[:, 0] + (C[..., None] - aa[:, 1]) * ab[:, 1]) / L2, 0, 1)
        dist = np.hypot(R[..., None] - (aa[:, 0] + t * ab[:, 0]), C[..., None] - (aa[:, 1] + t * ab[:, 1]))
        j = np.argmin(dist, axis=-1)
        dmin = np.take_along_axis(dist, j[..., None], -1)[..., 0]
        better = dmin < best
        best = np.where(better, dmin, best)
        near_r = np.where(better, r_px[k0:k0 + 64][j], near_r)
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

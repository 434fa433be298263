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
    ['cardiomegaly', 'consolidation', 'enlarged_cardiomediastinum']
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

DRAWN = ("cardiomegaly", "consolidation", "enlarged_cardiomediastinum", "lung_lesion", "lung_opacity", "mass",
         "nodule", "pleural_effusion", "pneumonia", "pneumothorax")
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
        _, _, z = _patient_coords(vp, box)
        zs = z[region]
        lo, hi = float(zs.min()), float(zs.max())
        third = {"upper": 2, "middle": 1, "lower": 0}[loc.split("_")[1]]
        a, b = lo + (hi - lo) * third / 3, lo + (hi - lo) * (third + 1) / 3
        region &= (z >= a) & (z <= b)
    return box, region


def _lung_ids(names: dict, side: str) -> list[int]:
    return [names[p] for p in (RIGHT if side == "right" else LEFT) if p in names]


def _sides(location: str | None, default: str) -> list[str]:
    loc = location or default
    if loc == "bilateral":
        return ["right", "left"]
    return ["left"] if loc.startswith("left") or loc == "lingula" else ["right"]


# ----------------------------------------------------------------------------- airspace disease

def airspace(vp, names, label, rng, *, kind: str) -> Drawn:
    """Consolidation (lobar, homogeneous, air bronchograms), pneumonia (patchy, multifocal, bronchograms
    where dense) or lung opacity (hazy): fluid in the air spaces of the named region."""
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
        noise = _smooth_noise(rng, shape, _cells(box, vp, 40.0))
        score = dist / 60.0 + 0.35 * noise
        fraction = (0.4, 0.7, 1.0)[sev]
        target = MU_FLUID * rng.uniform(0.9, 1.0)
    elif kind == "patchy":
        n1 = _smooth_noise(rng, shape, _cells(box, vp, 22.0))
        n2 = _smooth_noise(rng, shape, _cells(box, vp, 9.0))
        score = dist / 90.0 - 0.55 * n1 - 0.25 * n2
        fraction = (0.22, 0.38, 0.58)[sev]
        target = MU_FLUID * (0.55 + 0.3 * sev / 2) * (1.0 + 0.15 * np.clip(n2, -2, 2))
    else:  # haze
        n1 = _smooth_noise(rng, shape, _cells(box, vp, 35.0))
        score = dist / 120.0 - 0.4 * n1
        fraction = (0.35, 0.55, 0.8)[sev]
        target = MU_FLUID * (0.3 + 0.12 * sev)
    cut = float(np.quantile(score[lobe], fraction)) if fraction < 1.0 else np.inf
    region = lobe & (score <= cut)
    if not region.any():
        region = lobe
    # air bronchograms: the CT's own airways (air-dense voxels) stay air inside dense disease
    airway = mu < MU_WATER * 0.06
    if kind == "lobar" or (kind == "patchy" and sev >= 1):
        fill = region & ~airway
    else:
        fill = region
    # the edge that is not a fissure is soft: fill fades over the outer part of the score
    soft = np.clip((cut - score) / 0.15, 0.25, 1.0) if np.isfinite(cut) else 1.0
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
        new_mu = np.where(shell, np.maximum(new_mu, MU_WATER * 0.5), new_mu)
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
    grow = int(np.ceil((scale - 1.0) * 0.5 * max(box0.rows.stop - box0.rows.start, box0.cols.stop - box0.cols.start,
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
    new = _warped_region(vp, box, heart, cx + (x - cx) / scale, cy + (y - cy) / scale, cz + (z - cz) / sz)
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
    check_drawable([f])
    return []

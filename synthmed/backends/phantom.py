"""A procedural chest radiograph phantom: fast, model-free, and every label exact.

Each case is drawn as X-ray attenuation summed through tissue layers (soft tissue, aerated
lung, heart and mediastinum, bone, fluid, metal), then exposed (``1 - exp(-attenuation)``),
blurred and given quantum noise. Anatomy varies with the case's seed, sex, age and view;
findings are drawn where their labels say, scaled by severity, with a mask of exactly where
each was drawn and the cardiothoracic ratio measured on the phantom's own heart and thorax.

Randomness: anatomy comes from ``default_rng(case.seed)`` in a fixed order, each finding from
its own ``default_rng([seed, 1, crc32(finding), k])``, so removing a finding from a case leaves
the anatomy (and the other findings) exactly as they were. The image's left is the patient's
right (radiological convention).

Example:
    >>> from synthmed.sampler import Case, FindingLabel
    >>> case = Case("case-0000000", 0, "train", 7, (FindingLabel("pneumonia", "right_lower_lobe", "mild"),), "F", 40, "PA")
    >>> image = render_case(case, 128, 128)
    >>> image.pixels.shape, sorted(image.masks), image.measurements["cardiothoracic_ratio"] < 0.5
    ((128, 128), ['pneumonia'], True)
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage

from .base import BackendInfo, GeneratedImage
from ..spec import BACKEND_VIEWS, PHANTOM_SIZE_RANGE

VIEWS = BACKEND_VIEWS["phantom"]  # frontal films only: a lateral (LL) is refused, never drawn as a PA

MODEL_ID = "synthmed-phantom-v2"
MODEL_HASH = "phantom-v2"  # v2: findings too small to see are grown (_GROW)

# cardiothoracic ratio targets; the measured ratio is what is reported
_CTR_BAND = {"mild": (0.528, 0.542), "moderate": (0.563, 0.587), "severe": (0.625, 0.68)}
_CTR_LIMIT = {None: (0.0, 0.49), "mild": (0.521, 0.549), "moderate": (0.551, 0.599), "severe": (0.605, 0.75)}
_SEVERITY_INDEX = {"mild": 0, "moderate": 1, "severe": 2, None: 1}
# lesion diameters in cm (a nodule is < 3 cm, a mass > 3 cm)
_NODULE_CM = (0.9, 1.6, 2.6)
_MASS_CM = (3.6, 5.0, 7.0)

# where a lobe or zone lies on a frontal film, in lung coordinates: (lateral fraction of the
# hemithorax, vertical fraction apex -> diaphragm) of its centre, and its half-extents
_REGIONS = {
    "upper_lobe": ((0.55, 0.22), (0.5, 0.24)),
    "right_middle_lobe": ((0.36, 0.72), (0.3, 0.19)),
    "lower_lobe": ((0.58, 0.8), (0.46, 0.2)),
    "lingula": ((0.48, 0.62), (0.34, 0.17)),
    "upper_zone": ((0.55, 1 / 6), (0.55, 0.19)),
    "middle_zone": ((0.55, 0.5), (0.55, 0.19)),
    "lower_zone": ((0.55, 0.83), (0.55, 0.19)),
    "side": ((0.55, 0.55), (0.62, 0.58)),
}


# ----------------------------------------------------------------------------- small helpers

@lru_cache(maxsize=8)
def _grid(width: int, height: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of the image's shorter side, origin at the centre."""
    s = min(width, height) * scale
    xs = ((np.arange(width, dtype=np.float32) + 0.5) - width / 2) / (min(width, height)) * 1.0
    ys = ((np.arange(height, dtype=np.float32) + 0.5) - height / 2) / (min(width, height)) * 1.0
    del s
    X, Y = np.meshgrid(xs, ys)
    X.setflags(write=False)
    Y.setflags(write=False)
    return X, Y


def _edge(d, e):
    """Soft step: 0 outside (d < 0), 1 inside, over a ramp of width e."""
    return np.clip(d * (1.0 / e) + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise with unit standard deviation, about ``cells`` blobs across the short side."""
    h, w = shape
    s = min(h, w)
    ch, cw = max(2, int(round(cells * h / s))) + 2, max(2, int(round(cells * w / s))) + 2
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    # 4x bicubic on the tiny grid, then bilinear to full size: smooth and cheap
    fine = ndimage.gaussian_filter(_resize(coarse, 4 * ch, 4 * cw), 1.6, mode="reflect")
    out = _resize(fine, h, w)
    return out / (out.std() + 1e-6)


class _Splatter:
    """Accumulates weighted points into an image (bilinear), for thin curved structures."""

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.s = min(width, height)

    def points(self, px: np.ndarray, py: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        """Add points given in normalised coordinates to ``out`` (float32 HxW)."""
        x = px * self.s + self.w / 2 - 0.5
        y = py * self.s + self.h / 2 - 0.5
        x0 = np.floor(x).astype(np.int64)
        y0 = np.floor(y).astype(np.int64)
        fx, fy = x - x0, y - y0
        weight = np.broadcast_to(weight, x.shape)
        xi = np.concatenate([x0, x0 + 1, x0, x0 + 1])
        yi = np.concatenate([y0, y0, y0 + 1, y0 + 1])
        wt = np.concatenate([weight * (1 - fx) * (1 - fy), weight * fx * (1 - fy),
                             weight * (1 - fx) * fy, weight * fx * fy])
        ok = (xi >= 0) & (xi < self.w) & (yi >= 0) & (yi < self.h)
        if not ok.any():
            return
        xi, yi, wt = xi[ok], yi[ok], wt[ok]
        # accumulate over the points' bounding box only: thin structures cover a small part of the image
        xa, ya = int(xi.min()), int(yi.min())
        bw, bh = int(xi.max()) - xa + 1, int(yi.max()) - ya + 1
        acc = np.bincount((yi - ya) * bw + (xi - xa), weights=wt, minlength=bw * bh)
        out[ya:ya + bh, xa:xa + bw] += acc.reshape(bh, bw).astype(np.float32)

    def curve(self, pts: np.ndarray, weight: float, out: np.ndarray) -> None:
        """Add a polyline (N x 2, normalised) sampled at a quarter pixel, weight per pixel length."""
        seg = np.diff(pts, axis=0)
        lengths = np.hypot(seg[:, 0], seg[:, 1]) * self.s
        n = np.maximum(1, np.ceil(lengths * 4).astype(int))
        idx, t = _subdivide(n)
        p = pts[idx] + seg[idx] * t[:, None]
        self.points(p[:, 0], p[:, 1], np.repeat(lengths / n, n) * weight, out)


def _subdivide(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment index and fraction 0, 1/n, ..., (n-1)/n along it, for segments split in n[i] parts."""
    idx = np.repeat(np.arange(len(n)), n)
    start = np.cumsum(n) - n
    return idx, (np.arange(int(n.sum())) - start[idx]) / n[idx]


def _bezier(p0, p1, p2, n=48) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize with pixel centres aligned (separable gathers: no BLAS, whose threads spin on 2 cores)."""
    def axis(n_out, n_in):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(pos).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)[:, None]
    img = img.astype(np.float32)
    r0, r1, fr = axis(h, img.shape[0])
    rows = img[r0] * (1 - fr) + img[r1] * fr
    c0, c1, fc = axis(w, img.shape[1])
    return (rows[:, c0] * (1 - fc.T) + rows[:, c1] * fc.T)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (3 sigma kernel) of the image's non-zero bounding box; the rest stays 0 exactly."""
    if sigma_px <= 0.05:
        return img
    rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
    if rows.size == 0:
        return img.copy()
    pad = int(3.0 * sigma_px + 0.5) + 1  # the kernel's radius, plus a zero row so "nearest" pads zeros
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, img.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, img.shape[1])
    if (r1 - r0) * (c1 - c0) >= 0.8 * img.size:
        return ndimage.gaussian_filter(img, sigma_px, mode="nearest", truncate=3.0)
    out = np.zeros_like(img)
    out[r0:r1, c0:c1] = ndimage.gaussian_filter(img[r0:r1, c0:c1], sigma_px, mode="nearest", truncate=3.0)
    return out


# ----------------------------------------------------------------------------- anatomy

@dataclass
class _Anatomy:
    """Every anatomical choice of one case, drawn from its seed in a fixed order."""

    view: str
    sex: str
    age: float
    cage_w: float          # half the internal thoracic width
    body_w: float          # half the soft-tissue width at the chest
    apex_y: float
    dome: dict             # side -> y of the hemidiaphragm dome
    cp: dict               # side -> y of the costophrenic angle
    xc: float              # centre of the rib cage
    xm: float              # centre of the mediastinum and spine (rotation moves it)
    ctr: float             # cardiothoracic ratio of the normal heart
    heart_tilt: float
    heart_aspect: float
    heart_right_frac: float
    med_w: float
    knob_r: float
    hilum_y: dict
    clav_y: float
    clav_slope: float
    rib_y0: float
    rib_sp: float
    bone: float
    breast: float
    bubble: tuple
    vessels: dict          # side -> (points x, points y, width) in hilum-relative units
    scapula: float
    noise_seed: int


def _vessel_tree(rng: np.random.Generator, side_sign: int, depth: int = 5, roots: int = 8):
    """A branching vessel tree from the hilum: (x, y, width) samples relative to the hilum."""
    n_seg = roots * (2 ** depth - 1)
    jitter = rng.normal(0.0, 1.0, size=(n_seg, 3))
    base_angles = np.linspace(-1.75, 1.45, roots) + rng.normal(0, 0.08, roots)  # 0 = lateral, - = up
    # one level of the tree at a time, in the order the jitter was drawn (parent by parent)
    length = 0.085 * (1.0 + 0.15 * np.sin(base_angles))  # lower vessels longer
    width = 0.0075 * np.where(base_angles > 0, 1.15, 0.95)
    # roots leave the hilum along its height, not from one point
    x0, y0, a = side_sign * 0.012 * np.cos(base_angles), 0.045 * np.sin(base_angles), base_angles
    segs, k = [], 0
    for level in range(depth):
        j = jitter[k:k + len(a)]
        k += len(a)
        a2 = a + 0.3 * j[:, 0]
        L = length * (1 + 0.2 * j[:, 1])
        x1 = x0 + side_sign * np.cos(a2) * L
        y1 = y0 + np.sin(a2) * L
        segs.append(np.stack([x0, y0, x1, y1, width], axis=1))
        spread = 0.42 + 0.1 * j[:, 2]
        a = np.stack([a2 - spread, a2 + spread], axis=1).ravel()
        x0, y0 = np.repeat(x1, 2), np.repeat(y1, 2)
        length, width = np.repeat(length * 0.78, 2), np.repeat(width * 0.7, 2)
    segs = np.concatenate(segs)
    step = 0.0025
    n = np.maximum(2, np.ceil(np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1]) / step).astype(int))
    idx, t = _subdivide(n)
    px = segs[idx, 0] + (segs[idx, 2] - segs[idx, 0]) * t
    py = segs[idx, 1] + (segs[idx, 3] - segs[idx, 1]) * t
    return px, py, segs[idx, 4]


def _draw_anatomy(case) -> _Anatomy:
    rng = np.random.default_rng(case.seed if case.seed is not None else 0)
    sex = case.sex if case.sex in ("F", "M") else ("F" if rng.random() < 0.5 else "M")
    if case.view not in (None,) + VIEWS:
        raise ValueError(f"the phantom backend draws views {' and '.join(VIEWS)}, not {case.view!r} "
                         f"(case {case.case_id}); use the drr backend for a lateral")
    view = case.view or "PA"
    age = float(case.age) if case.age is not None else 50.0
    # one block, so the order never changes; Python floats keep the maps float32
    u = rng.uniform(size=24).tolist()
    ap = view == "AP"
    cage_w = (0.345 + 0.025 * u[0]) if sex == "M" else (0.322 + 0.025 * u[0])
    habitus = u[1]
    body_w = cage_w + 0.045 + 0.045 * habitus
    insp = u[2] * (0.7 if ap else 1.0)
    apex_y = -0.365 + 0.015 * u[3]
    dome_r = 0.085 + 0.075 * insp
    dome_l = dome_r + 0.012 + 0.025 * u[4]
    rot = 0.022 * (u[5] - 0.5)
    ctr = 0.385 + 0.06 * u[6]
    if ap:
        ctr = min(ctr * 1.08, 0.475)
    age_f = min(max((age - 30.0) / 55.0, 0.0), 1.0)
    vessels = {side: _vessel_tree(rng, -1 if side == "R" else 1) for side in ("R", "L")}
    return _Anatomy(
        view=view, sex=sex, age=age, cage_w=cage_w, body_w=body_w, apex_y=apex_y,
        dome={"R": dome_r, "L": dome_l},
        cp={"R": dome_r + 0.07 + 0.03 * u[7], "L": dome_l + 0.07 + 0.03 * u[7]},
        xc=0.0, xm=rot, ctr=ctr, heart_tilt=0.5 + 0.2 * u[8], heart_aspect=0.72 + 0.08 * u[9],
        heart_right_frac=0.29 + 0.07 * u[10],
        med_w=(0.05 + 0.01 * u[11]) * (1.08 if ap else 1.0),
        knob_r=0.03 + 0.008 * u[12] + 0.01 * age_f,
        hilum_y={"R": -0.03 + 0.02 * u[13], "L": -0.055 + 0.02 * u[13]},
        clav_y=apex_y + (0.035 if not ap else 0.0) + 0.02 * u[14],
        clav_slope=(0.12 + 0.12 * u[15]) * (0.5 if ap else 1.0),
        rib_y0=apex_y - 0.01 + 0.01 * u[16], rib_sp=0.054 + 0.006 * u[17],
        bone=1.0 - 0.3 * age_f,
        breast=(0.55 + 0.45 * u[18]) if sex == "F" else 0.0,
        bubble=(u[19] < 0.75, 0.035 + 0.025 * u[20]),
        vessels=vessels,
        scapula=u[21],
        noise_seed=int(rng.integers(0, 2**62)),
    )


# ----------------------------------------------------------------------------- geometry

@dataclass
class _Geometry:
    """Anatomy after the findings' changes to it (heart size, diaphragm, collapse...)."""

    a: _Anatomy
    ctr: float
    med_scale: float = 1.0
    raise_dia: dict = field(default_factory=lambda: {"R": 0.0, "L": 0.0})
    collapse: dict = field(default_factory=lambda: {"R": 1.0, "L": 1.0})
    hilum_shift: dict = field(default_factory=lambda: {"R": 0.0, "L": 0.0})

    def heart_axes(self):
        a = self.a
        ext = self.ctr * a.cage_w
        th = a.heart_tilt
        base = math.sqrt(math.cos(th) ** 2 + (a.heart_aspect * math.sin(th)) ** 2)
        ax = ext / base
        bx = ax * a.heart_aspect
        vert = math.sqrt((ax * math.sin(th)) ** 2 + (bx * math.cos(th)) ** 2)
        hx = a.xm + ext * (1 - 2 * a.heart_right_frac)
        hy = 0.5 * (a.dome["R"] + a.dome["L"]) + 0.02 - 0.72 * vert
        return hx, hy, ax, bx, th, ext, vert


def _sign(side: str) -> int:
    return -1 if side == "R" else 1


def _cage_half(g: _Geometry, Y, side: str):
    a = g.a
    t = (Y - a.apex_y) / (a.cp[side] - a.apex_y)
    return a.cage_w * (1.0 - 0.42 * (1.0 - np.clip(t / 0.92, 0.0, 1.0)) ** 2.2)


def _dia_y(g: _Geometry, X, side: str):
    """Height of the hemidiaphragm at X (dome medially, falling to the costophrenic angle)."""
    a = g.a
    u = _sign(side) * (X - a.xc)
    dome = a.dome[side] - g.raise_dia[side]
    cp = a.cp[side] - 0.7 * g.raise_dia[side]
    ud = 0.4 * a.cage_w
    lat = np.clip((u - ud) / (a.cage_w - ud), 0.0, 1.3)
    med = np.clip((ud - u) / ud, 0.0, 1.0)
    return dome + (cp - dome) * lat ** 2 + 0.035 * med ** 2


def _mediastinum_half(g: _Geometry, Y, side: str):
    a = g.a
    base = a.med_w * g.med_scale
    # the superior mediastinum narrows into the neck and widens down to the heart
    neck = np.clip((a.apex_y + 0.06 - Y) / 0.1, 0.0, 1.0)
    low = np.clip((Y - a.apex_y - 0.2) / 0.18, 0.0, 1.0)
    extra = 0.008 if side == "R" else 0.0
    return (base + extra) * (1.0 - 0.3 * neck + 0.35 * low ** 2)


def _lung_field(g: _Geometry, X, Y, side: str, e: float, collapsed: bool = True):
    """Soft mask of one lung field (edge ramp e, normalised units)."""
    a = g.a
    sg = _sign(side)
    if collapsed and g.collapse[side] < 1.0:
        s = g.collapse[side]
        ox = a.xm + sg * (a.med_w + 0.03)
        oy = a.dome[side] - 0.06
        X = ox + (X - ox) / s
        Y = oy + (Y - oy) / (0.35 + 0.65 * s)
    u = sg * (X - a.xc)
    cw = _cage_half(g, Y, side)
    inside = _edge(cw - u, e)
    # rounded apex
    y_top = a.apex_y + 0.55 * ((u - 0.5 * a.cage_w) / a.cage_w) ** 2
    inside *= _edge(Y - y_top, e)
    inside *= _edge(_dia_y(g, X, side) - Y, e)
    um = sg * (X - a.xm)
    inside *= _edge(um - _mediastinum_half(g, Y, side), e)
    # heart and aortic knob are not lung
    hx, hy, ax, bx, th, _, _ = g.heart_axes()
    dx, dy = X - hx, Y - hy
    c, sn = math.cos(th), math.sin(th)
    r = np.sqrt(((dx * c + dy * sn) / ax) ** 2 + ((-dx * sn + dy * c) / bx) ** 2)
    inside *= _edge((r - 1.0) * bx, e)
    if side == "L":
        kx, ky = _knob_centre(g)
        rk = np.hypot(X - kx, Y - ky)
        inside *= _edge(rk - a.knob_r * (1.0 + 0.3 * (g.med_scale - 1)), e)
    return inside


def _knob_centre(g: _Geometry):
    a = g.a
    hx, hy = g.heart_axes()[:2]
    return a.xm + a.med_w * g.med_scale, hy - 0.95 * (hy - a.apex_y) * 0.5


def _heart_field(g: _Geometry, X, Y):
    hx, hy, ax, bx, th, _, _ = g.heart_axes()
    dx, dy = X - hx, Y - hy
    c, sn = math.cos(th), math.sin(th)
    return np.sqrt(((dx * c + dy * sn) / ax) ** 2 + ((-dx * sn + dy * c) / bx) ** 2)


# ----------------------------------------------------------------------------- findings

@dataclass
class _Layers:
    """What the findings add: replaced lung air, extra density, metal, and their masks."""

    fill: np.ndarray
    dense: np.ndarray
    metal: np.ndarray
    no_vessels: np.ndarray
    masks: dict


def _finding_rng(case, label, k: int) -> np.random.Generator:
    seed = case.seed if case.seed is not None else 0
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, 1, zlib.crc32(label.finding.encode()), k])


def _sides(location: str | None, default: str) -> list[str]:
    loc = location or default
    if loc == "bilateral":
        return ["R", "L"]
    if loc.startswith("right"):
        return ["R"]
    if loc.startswith("left") or loc == "lingula":
        return ["L"]
    return ["R"]


def _region_key(location: str) -> tuple[list[str], str]:
    if location in ("right", "left", "bilateral"):
        return _sides(location, "right"), "side"
    sides = _sides(location, "right")
    if location == "lingula":
        return sides, "lingula"
    if location == "right_middle_lobe":
        return sides, "right_middle_lobe"
    for word in ("upper", "middle", "lower"):
        if f"_{word}_" in location:
            return sides, (f"{word}_lobe" if location.endswith("lobe") else f"{word}_zone")
    return sides, "side"


class _Scene:
    """Coordinates and anatomy-derived maps shared by the findings of one image."""

    def __init__(self, g: _Geometry, width: int, height: int):
        self.g, self.w, self.h = g, width, height
        self.X, self.Y = _grid(width, height, 1.0)
        self.px = 1.0 / min(width, height)
        self.e = 1.2 * self.px
        self.splat = _Splatter(width, height)
        self._coords: dict = {}
        self.lung = {s: self._lung_window(s) for s in ("R", "L")}

    def _lung_window(self, side: str) -> np.ndarray:
        """The lung field, computed only over the box it can occupy (it is exactly 0 outside)."""
        g, a, e = self.g, self.g.a, self.e
        if g.collapse[side] < 1.0:
            return _lung_field(g, self.X, self.Y, side, e)
        dome = a.dome[side] - g.raise_dia[side]
        cp = a.cp[side] - 0.7 * g.raise_dia[side]
        y_max = max(dome, dome + 1.69 * (cp - dome)) + 0.035  # highest _dia_y can reach (lat <= 1.3)
        x_lo, x_hi = (a.xc - a.cage_w, a.xm) if side == "R" else (a.xm, a.xc + a.cage_w)
        rows = _span(self, a.apex_y - e, y_max + e, "y")
        cols = _span(self, x_lo - e, x_hi + e, "x")
        out = np.zeros((self.h, self.w), np.float32)
        out[rows, cols] = _lung_field(g, self.X[rows, cols], self.Y[rows, cols], side, e)
        return out

    def lung_coords(self, side: str):
        """(lateral fraction, vertical fraction) of each pixel within one hemithorax."""
        if side not in self._coords:
            g, X, Y = self.g, self.X, self.Y
            u = _sign(side) * (X - g.a.xm)
            lx = u / g.a.cage_w
            top = g.a.apex_y
            ly = (Y - top) / (_dia_y(g, X, side) - top)
            self._coords[side] = (lx, ly)
        return self._coords[side]

    def region(self, location: str | None, default: str = "right_lower_lobe"):
        """Soft weight (1 at the centre of the lobe/zone, 0 at its edge), per side."""
        sides, key = _region_key(location or default)
        (cx, cy), (rx, ry) = _REGIONS[key]
        out = {}
        for side in sides:
            lx, ly = self.lung_coords(side)
            d2 = ((lx - cx) / rx) ** 2 + ((ly - cy) / ry) ** 2
            out[side] = np.clip(1.0 - d2, -1.0, 1.0)
        return out


def _severity(label) -> int:
    return _SEVERITY_INDEX.get(label.severity, 1)


def _airspace(scene: _Scene, layers: _Layers, label, rng, *, kind: str) -> np.ndarray:
    """Consolidation, pneumonia, lung opacity, edema haze: air spaces filled with fluid."""
    sev = _severity(label)
    shape = (scene.h, scene.w)
    n1 = _smooth_noise(rng, shape, 9 if kind != "haze" else 5)
    n2 = _smooth_noise(rng, shape, 22)
    n3 = _smooth_noise(rng, shape, 30)
    mask = np.zeros(shape, bool)
    thr = {"lobar": (0.62, 0.32, 0.0), "patchy": (0.55, 0.25, -0.05), "haze": (0.6, 0.32, 0.05)}[kind][sev]
    noise_w = {"lobar": 0.22, "patchy": 0.42, "haze": 0.3}[kind]
    density = {"lobar": (0.5, 0.68, 0.85), "patchy": (0.42, 0.58, 0.74), "haze": (0.3, 0.42, 0.55)}[kind][sev]
    for side, reg in scene.region(label.location).items():
        fieldv = reg + noise_w * (0.7 * n1 + 0.3 * n2)
        soft = 0.22 if kind == "haze" else 0.2 if kind == "patchy" else 0.1
        lung = scene.lung[side]
        for grow in _GROW:  # where the noise leaves a mild one too small to see, it is grown until it shows
            occ = np.clip((fieldv - (thr - 0.5 * grow)) / soft, 0.0, 1.0) * (lung > 0.5)
            if np.count_nonzero(occ > 0.15) >= _min_pixels(scene):
                break
        if kind == "haze":
            occ = _blur(occ, 2.0 * scene.px * min(scene.w, scene.h) / 128)
        occ = _blur(occ, 0.8 * min(scene.w, scene.h) / 256)
        fill = density * occ * (0.75 + 0.25 * np.clip(n2, -1, 1))
        if kind == "lobar" or (kind == "patchy" and sev >= 1):
            # air bronchograms: air-filled bronchi left visible inside the consolidation
            bronchi = np.exp(-(n3 / 0.09) ** 2) * np.clip((occ - 0.6) / 0.4, 0, 1)
            fill = fill * (1.0 - 0.55 * bronchi)
        layers.fill = 1.0 - (1.0 - layers.fill) * (1.0 - np.clip(fill, 0, 1))
        mask |= (occ > 0.15) & (lung > 0.5)
    return mask


def _lesion(scene: _Scene, layers: _Layers, label, rng, *, kind: str) -> np.ndarray:
    """A nodule or mass: a round soft-tissue density, size by severity."""
    sev = _severity(label)
    g = scene.g
    cm = 2 * g.a.cage_w / 28.0
    diam = (_NODULE_CM if kind == "nodule" else _MASS_CM)[sev] * cm
    r = diam / 2
    regions = scene.region(label.location)
    side = list(regions)[int(rng.integers(len(regions)))]
    reg = regions[side]
    lung = scene.lung[side]
    # a centre well inside the region and the lung
    inner = ndimage.binary_erosion(lung > 0.5, iterations=max(1, int(0.6 * r / scene.px)))
    cand = np.flatnonzero(((reg > 0.35) & inner).ravel())
    if cand.size == 0:
        cand = np.flatnonzero((lung > 0.5).ravel())
    if cand.size == 0:
        cand = np.array([scene.h // 2 * scene.w + scene.w // 3])
    pick = cand[int(rng.integers(cand.size))]
    cx, cy = scene.X.ravel()[pick], scene.Y.ravel()[pick]
    ang = np.arctan2(scene.Y - cy, scene.X - cx)
    lob = 1.0 + (0.12 if kind == "mass" else 0.04) * (np.sin(3 * ang + rng.uniform(0, 6.3)) * 0.6
                                                      + np.sin(5 * ang + rng.uniform(0, 6.3)) * 0.4)
    rr = np.hypot(scene.X - cx, scene.Y - cy) / (r * lob)
    edge = 0.12 if kind == "nodule" else 0.2
    prof = np.sqrt(np.clip(1.0 - rr ** 2, 0.0, 1.0)) * np.clip((1.0 - rr) / edge + 0.5, 0, 1)
    layers.dense += (0.35 + 5.0 * diam) * prof
    layers.fill = np.maximum(layers.fill, 0.8 * prof)
    return rr <= 1.0


def _effusion(scene: _Scene, layers: _Layers, label, rng) -> np.ndarray:
    sev = _severity(label)
    g, X, Y = scene.g, scene.X, scene.Y
    mask = np.zeros((scene.h, scene.w), bool)
    height = (0.12, 0.33, 0.6)[sev] * (1 + 0.1 * rng.uniform(-1, 1))
    for side in _sides(label.location, "right"):
        sg = _sign(side)
        cw = _cage_half(g, Y, side)
        u = sg * (X - g.a.xc)
        lat = np.clip(u / g.a.cage_w, 0.0, 1.0)
        cp = g.a.cp[side] - 0.7 * g.raise_dia[side]
        level = cp - height * (cp - g.a.apex_y)
        menisc = 0.08 + 0.05 * sev
        y_f = level - menisc * lat ** 3  # fluid climbs the lateral chest wall
        um = sg * (X - g.a.xm)
        med_half = _mediastinum_half(g, Y, side)
        # the fluid hides the hemidiaphragm but not much of the abdomen below it
        region = _edge(cw - u, scene.e) * _edge(um - med_half, scene.e) * (Y < cp + 0.015) \
            * _edge(_dia_y(g, X, side) + 0.02 - Y, 0.02)
        depth = np.clip((Y - y_f) / (0.05 + 0.04 * sev), 0.0, 1.0)
        occ = region * depth
        layers.fill = np.maximum(layers.fill, occ)
        layers.dense += 0.35 * occ
        mask |= occ > 0.12
    return mask


def _pneumothorax_mask(scene: _Scene, layers: _Layers, label) -> np.ndarray:
    g = scene.g
    mask = np.zeros((scene.h, scene.w), bool)
    for side in _sides(label.location, "right"):
        if g.collapse[side] >= 1.0:
            continue
        full = _lung_field(g, scene.X, scene.Y, side, scene.e, collapsed=False)
        rim = np.clip(full - scene.lung[side], 0.0, 1.0)
        # the pleural space holds only air: no lung markings, no parenchyma
        layers.no_vessels = np.maximum(layers.no_vessels, rim)
        layers.dense -= 0.12 * rim
        # the visceral pleural line at the collapsed lung's edge
        edge = scene.lung[side]
        line = np.clip(1.0 - np.abs(edge - 0.5) * 2.0, 0, 1)
        line = _blur(line, 0.5)
        layers.dense += 0.5 * line * (full > 0.5)
        # the collapsed lung is denser
        layers.fill = np.maximum(layers.fill, (0.25 * (1 - g.collapse[side])) * scene.lung[side])
        mask |= (rim > 0.5)
    return mask


def _atelectasis(scene: _Scene, layers: _Layers, label, rng) -> np.ndarray:
    """Collapsed lung: a dense band bounded by a displaced fissure (volume loss shown elsewhere)."""
    sev = _severity(label)
    mask = np.zeros((scene.h, scene.w), bool)
    loc = label.location or "right_lower_lobe"
    sides, key = _region_key(loc)
    n = _smooth_noise(rng, (scene.h, scene.w), 8)

    def collapsed(side: str, frac: float) -> np.ndarray:
        lx, ly = scene.lung_coords(side)
        if "upper" in key:
            # collapsed upper lobe against the apex and mediastinum, elevated fissure below it
            fiss = (0.18 + 0.22 * frac) - 0.12 * (lx - 0.5)
            occ = _edge(fiss - ly, 0.02) * _edge(0.85 - lx + 0.3 * frac, 0.08)
        elif key in ("right_middle_lobe", "lingula", "middle_zone"):
            # a triangle against the heart border
            occ = _edge((0.25 + 0.3 * frac) - lx - 0.6 * np.abs(ly - 0.68), 0.03)
        else:
            # lower lobe: a triangle against the spine and diaphragm (sail shape)
            occ = _edge(ly - (1.0 - 0.55 * frac) - 0.5 * (lx - 0.1), 0.03) * _edge(0.35 + 0.55 * frac - lx, 0.05)
        return occ * (scene.lung[side] > 0.5) * np.clip(0.85 + 0.15 * n, 0, 1)

    for side in sides:
        # a mild left lower collapse lies behind the heart, where the lung field is not: grown until it shows,
        # so that no case is labelled atelectasis with nothing drawn
        for grow in _GROW:
            occ = collapsed(side, min((0.3, 0.5, 0.75)[sev] + grow, 0.95))
            if np.count_nonzero(occ > 0.15) >= _min_pixels(scene):
                break
        layers.fill = np.maximum(layers.fill, (0.7 + 0.1 * sev) * occ)
        layers.dense += 0.1 * occ
        mask |= occ > 0.15
    return mask


_GROW = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6)  # how far a finding that shows too little is grown, step by step


def _min_pixels(scene: _Scene) -> int:
    """The fewest pixels a drawn finding's mask may have: 0.1 % of the image, at least 4."""
    return max(4, scene.w * scene.h // 1000)


def _edema(scene: _Scene, layers: _Layers, label, rng) -> np.ndarray:
    sev = _severity(label)
    g = scene.g
    mask = np.zeros((scene.h, scene.w), bool)
    n = _smooth_noise(rng, (scene.h, scene.w), 7)
    kerley = np.zeros((scene.h, scene.w), np.float32)
    for side in _sides(label.location, "bilateral"):
        sg = _sign(side)
        lung = scene.lung[side]
        hx = g.a.xm + sg * (g.a.med_w + 0.04)
        hy = g.a.hilum_y[side]
        rad = (0.1, 0.15, 0.21)[sev]
        d = np.hypot((scene.X - hx) / 1.15, (scene.Y - hy) / 1.0) / rad
        haze = np.clip(1.0 - d ** 2 + 0.25 * n, 0.0, 1.0) * (lung > 0.5)
        haze = _blur(haze, 1.5 / 128 / scene.px)
        layers.fill = 1.0 - (1.0 - layers.fill) * (1.0 - (0.35 + 0.17 * sev) * haze)
        mask |= (haze > 0.1) & (lung > 0.5)
        # Kerley B lines: short horizontal lines at the lateral lung bases
        n_lines = (5, 8, 11)[sev]
        ys = rng.uniform(0.0, 1.0, n_lines)
        lens = rng.uniform(0.018, 0.035, n_lines)
        for yv, ln in zip(ys, lens):
            y0 = g.a.dome[side] - 0.02 - 0.14 * yv
            x_wall = g.a.xc + sg * (_cage_half(g, np.float32(y0), side) - 0.004)
            pts = np.array([[x_wall, y0], [x_wall - sg * ln, y0 + 0.002]])
            scene.splat.curve(pts, 1.0, kerley)
    kerley = _blur(kerley, 0.6)
    lungs = np.maximum(scene.lung["R"], scene.lung["L"])
    kerley *= lungs
    layers.dense += (0.2 + 0.07 * sev) * np.clip(kerley, 0, 1.5)
    mask |= (kerley > 0.15) & (lungs > 0.5)
    return mask


def _pleural_thickening(scene: _Scene, layers: _Layers, label, rng) -> np.ndarray:
    g = scene.g
    mask = np.zeros((scene.h, scene.w), bool)
    n = _smooth_noise(rng, (scene.h, scene.w), 10)
    for side in _sides(label.location, "right"):
        sg = _sign(side)
        u = sg * (scene.X - g.a.xc)
        cw = _cage_half(g, scene.Y, side)
        d = cw - u
        t = (Y_rel := (scene.Y - g.a.apex_y) / (g.a.cp[side] - g.a.apex_y))
        along = np.clip((t - 0.2) / 0.2, 0, 1) * np.clip((1.02 - t) / 0.1, 0, 1)
        thick = (0.012 + 0.006 * n) * along
        occ = _edge(thick - d, scene.e) * (d > -0.002) * scene.lung[side]
        del Y_rel
        layers.fill = np.maximum(layers.fill, occ)
        layers.dense += 0.25 * occ
        mask |= occ > 0.3
    return mask


def _rib_fracture_mask(scene: _Scene, frac: dict) -> np.ndarray:
    cx, cy, r = frac["x"], frac["y"], frac["r"]
    return np.hypot(scene.X - cx, scene.Y - cy) <= r


def _device(scene: _Scene, layers: _Layers, kind: str, rng) -> np.ndarray:
    g = scene.g
    a = g.a
    wire = np.zeros((scene.h, scene.w), np.float32)
    top = -0.5 * scene.h / min(scene.w, scene.h) - 0.01
    hy = g.heart_axes()[1]
    carina_y = hy - 0.95 * (hy - a.apex_y) * 0.55 + 0.06
    if kind == "endotracheal_tube":
        tip = carina_y - (0.09 + 0.04 * rng.uniform())
        x = a.xm - 0.004
        for off, wgt in ((-0.011, 0.5), (0.011, 0.5), (-0.004, 1.4)):
            scene.splat.curve(np.array([[x + off + 0.01, top], [x + off, tip]]), wgt, wire)
    elif kind == "central_venous_catheter":
        sg = -1 if rng.uniform() < 0.7 else 1  # mostly right internal jugular
        p0 = (a.xm + sg * 0.09, top)
        p1 = (a.xm + sg * 0.05, a.apex_y + 0.1)
        p2 = (a.xm - 0.055 * g.med_scale, hy - 0.08 + 0.04 * rng.uniform())
        scene.splat.curve(_bezier(p0, p1, p2), 1.3, wire)
    elif kind == "pacemaker":
        gx, gy = a.xm + 0.23 + 0.03 * rng.uniform(), a.clav_y + 0.085
        box = _edge(0.034 - np.abs(scene.X - gx), scene.px) * _edge(0.026 - np.abs(scene.Y - gy), scene.px)
        box = _blur(box, 0.7)
        layers.metal += 2.5 * box
        hx, hy_, ax, bx, th, ext, vert = g.heart_axes()
        ra = (a.xm - 0.04, hy_ - 0.02)
        rv = (hx + 0.35 * ext, hy_ + 0.6 * vert)
        entry = (a.xm + 0.1, a.clav_y + 0.05)
        lead1 = np.concatenate([_bezier((gx - 0.03, gy), (gx - 0.07, gy - 0.03), entry),
                                _bezier(entry, (a.xm + 0.0, a.clav_y + 0.08), (a.xm - 0.03, hy_ - 0.1))[1:],
                                _bezier((a.xm - 0.03, hy_ - 0.1), (a.xm - 0.04, hy_ + 0.05), rv)[1:]])
        scene.splat.curve(lead1, 1.6, wire)
        lead2 = _bezier((a.xm - 0.03, hy_ - 0.1), (a.xm - 0.07, hy_ - 0.06), ra)
        scene.splat.curve(lead2, 1.6, wire)
        wire = wire + box / 1.2
    wire = _blur(wire, 0.5 * max(1.0, min(scene.w, scene.h) / 256))
    layers.metal += 1.2 * np.clip(wire, 0, 2)
    return wire > 0.12


# ----------------------------------------------------------------------------- render

def _plan_findings(case, include: bool):
    """Labels to draw (no_finding dropped), each with its own generator."""
    out = []
    if not include:
        return out
    seen: dict[str, int] = {}
    for label in case.findings:
        if label.finding == "no_finding":
            continue
        k = seen.get(label.finding, 0)
        seen[label.finding] = k + 1
        out.append((label, _finding_rng(case, label, k)))
    return out


def render_case(case, width: int, height: int, *, include_findings: bool = True) -> GeneratedImage:
    """Render one case as a chest radiograph with exact masks and the measured CTR.

    Args:
        case: a :class:`synthmed.sampler.Case`; its seed, sex, age, view and findings decide the image.
        width, height: image size in pixels (128..1024).
        include_findings: False draws the same patient with no findings.

    Returns:
        GeneratedImage with float32 HxW pixels in [0, 1], one bool mask per finding and
        ``measurements["cardiothoracic_ratio"]``.

    Example:
        >>> from synthmed.sampler import Case, FindingLabel
        >>> c = Case("case-0000000", 0, None, 3, (FindingLabel("cardiomegaly", None, "severe"),), "M", 60, "PA")
        >>> render_case(c, 128, 128).measurements["cardiothoracic_ratio"] > 0.6
        True
    """
    width, height = int(width), int(height)
    if not (16 <= width <= 4096 and 16 <= height <= 4096):
        raise ValueError(f"width and height must be within 16..4096 pixels, got {width}x{height}")
    # 1. anatomy, from the case seed in a fixed order
    a = _draw_anatomy(case)
    plan = _plan_findings(case, include_findings)

    # 2. findings that change the anatomy's geometry (their own generators)
    g = _Geometry(a, ctr=a.ctr)
    fracture = None
    device_kinds: list[tuple[str, np.random.Generator, str]] = []
    for label, rng in plan:
        f, sev = label.finding, _severity(label)
        if f == "cardiomegaly":
            lo, hi = _CTR_BAND[label.severity or "moderate"]
            g.ctr = float(rng.uniform(lo, hi))
        elif f == "enlarged_cardiomediastinum":
            g.med_scale = max(g.med_scale, (1.35, 1.6, 1.9)[sev])
        elif f == "pneumothorax":
            for side in _sides(label.location, "right"):
                g.collapse[side] = min(g.collapse[side], (0.86, 0.7, 0.5)[sev] + 0.03 * rng.uniform(-1, 1))
        elif f == "atelectasis":
            sides, key = _region_key(label.location or "right_lower_lobe")
            for side in sides:
                if "upper" not in key:
                    g.raise_dia[side] = max(g.raise_dia[side], (0.015, 0.03, 0.05)[sev])
                else:
                    g.hilum_shift[side] = (0.015, 0.03, 0.045)[sev]
        elif f == "fracture":
            side = _sides(label.location, "right")[0]
            fracture = {"side": side, "rib": int(rng.integers(4, 8)), "u": float(rng.uniform(0.6, 0.85)),
                        "step": float(rng.uniform(0.35, 0.6)), "gap": float(rng.uniform(0.004, 0.007))}
        elif f in ("support_devices", "endotracheal_tube", "central_venous_catheter", "pacemaker"):
            kind = f if f != "support_devices" else \
                ("endotracheal_tube", "central_venous_catheter", "pacemaker")[int(rng.integers(3))]
            device_kinds.append((kind, rng, f))

    # 3. the thorax and heart (for the CTR), then the lung fields
    X, Y = _grid(width, height, 1.0)
    thorax = (np.abs(X - a.xc) < _cage_half(g, Y, "R")) & (Y > a.apex_y) & (Y < max(a.cp.values()))
    thorax_w = int((thorax.sum(axis=1)).max())
    ctr_ok = _CTR_LIMIT[next((lb.severity or "moderate" for lb, _ in plan if lb.finding == "cardiomegaly"), None)]
    heart = _heart_field(g, X, Y) <= 1.0
    for _ in range(8):  # pixel rounding: nudge the heart until the measured ratio is in its band
        measured = heart.sum(axis=1).max() / max(thorax_w, 1)
        if ctr_ok[0] <= measured <= ctr_ok[1]:
            break
        target = 0.5 * (ctr_ok[0] + min(ctr_ok[1], ctr_ok[0] + 0.04)) if measured < ctr_ok[0] else ctr_ok[1] - 0.01
        g.ctr = g.ctr * target / max(measured, 1e-3)
        heart = _heart_field(g, X, Y) <= 1.0
    scene = _Scene(g, width, height)
    ctr = float(heart.sum(axis=1).max() / max(thorax_w, 1))

    # 4. findings drawn as layers, each with an exact mask
    shape = (height, width)
    layers = _Layers(fill=np.zeros(shape, np.float32), dense=np.zeros(shape, np.float32),
                     metal=np.zeros(shape, np.float32), no_vessels=np.zeros(shape, np.float32), masks={})
    for label, rng in plan:
        f = label.finding
        if f == "pneumonia":
            m = _airspace(scene, layers, label, rng, kind="patchy")
        elif f == "consolidation":
            m = _airspace(scene, layers, label, rng, kind="lobar")
        elif f == "lung_opacity":
            m = _airspace(scene, layers, label, rng, kind="haze")
        elif f in ("nodule", "mass"):
            m = _lesion(scene, layers, label, rng, kind=f)
        elif f == "lung_lesion":
            sev = _severity(label)
            kind = "nodule" if sev == 0 else "mass" if sev == 2 else ("nodule", "mass")[int(rng.integers(2))]
            m = _lesion(scene, layers, label, rng, kind=kind)
        elif f == "pleural_effusion":
            m = _effusion(scene, layers, label, rng)
        elif f == "pneumothorax":
            m = _pneumothorax_mask(scene, layers, label)
        elif f == "atelectasis":
            m = _atelectasis(scene, layers, label, rng)
        elif f == "edema":
            m = _edema(scene, layers, label, rng)
        elif f == "pleural_other":
            m = _pleural_thickening(scene, layers, label, rng)
        elif f == "cardiomegaly":
            m = heart.copy()
        elif f == "enlarged_cardiomediastinum":
            hy = g.heart_axes()[1] - 0.5 * g.heart_axes()[6]
            half = np.maximum(_mediastinum_half(g, Y, "R"), _mediastinum_half(g, Y, "L"))
            m = (np.abs(X - a.xm) < half * 1.0 + 0.004) & (Y > a.apex_y + 0.02) & (Y < hy)
        elif f == "fracture":
            m = None  # drawn with the ribs below
        else:
            m = None
        if m is not None:
            layers.masks[f] = m if f not in layers.masks else (layers.masks[f] | m)
    for kind, rng, f in device_kinds:
        m = _device(scene, layers, kind, rng)
        layers.masks[f] = m if f not in layers.masks else (layers.masks[f] | m)

    # 5. attenuation through the layers, then exposure, blur and noise
    pixels, frac_info = _compose(scene, layers, fracture)
    if fracture is not None:
        layers.masks["fracture"] = _rib_fracture_mask(scene, frac_info)
    masks = {k: np.ascontiguousarray(v, dtype=bool) for k, v in layers.masks.items()}
    return GeneratedImage(pixels=pixels, masks=masks, measurements={"cardiothoracic_ratio": round(ctr, 4)})


def _compose(scene: _Scene, layers: _Layers, fracture):
    g, a = scene.g, scene.g.a
    X, Y = scene.X, scene.Y
    h, w = scene.h, scene.w
    px = scene.px
    rng = np.random.default_rng(a.noise_seed)
    sg_of = {"R": -1, "L": 1}

    # soft tissue: an elliptic torso under sloping shoulders, with a neck
    shoulder = a.apex_y - 0.06 + 0.55 * np.clip(np.abs(X - a.xm) - 0.1, 0, None) ** 2
    bw = a.body_w * (1.0 - 0.1 * ((Y - 0.05) / 0.5) ** 2) + 0.05 * np.clip((a.apex_y + 0.05 - Y) / 0.1, 0, 1)
    torso = np.clip(1.0 - ((X - a.xm * 0.5) / bw) ** 2, 0.0, 1.0) ** 0.7 * _edge(Y - shoulder, 0.03)
    neck = 0.6 * np.clip(1.0 - ((X - a.xm) / 0.095) ** 2, 0.0, 1.0) ** 0.7
    soft = np.maximum(torso, neck)
    # the abdomen below the diaphragm is a little thicker than the chest wall
    abdomen = _edge(Y - 0.5 * (a.dome["R"] + a.dome["L"]), 0.08)
    A = (1.55 + 0.2 * abdomen) * soft
    # breasts (F): soft-tissue mounds over the lower lungs with a sharp lower edge
    if a.breast > 0:
        for side in ("R", "L"):
            bx = a.xc + sg_of[side] * 0.2 * a.cage_w / 0.33
            by = a.dome[side] - 0.02
            r = np.hypot((X - bx) / (0.17 * a.breast + 0.05), (Y - by) / (0.11 * a.breast + 0.04))
            A += 0.32 * a.breast * np.sqrt(np.clip(1 - r ** 2, 0, 1)) * (0.6 + 0.4 * np.clip((Y - by + 0.1) / 0.1, 0, 1))
    # pectoral muscles (more in men)
    for side in ("R", "L"):
        u = sg_of[side] * (X - a.xc)
        pec = np.clip(1 - ((u - a.cage_w * 0.85) / 0.14) ** 2 - ((Y - a.apex_y - 0.13) / 0.12) ** 2, 0, 1)
        A += (0.12 if a.sex == "M" else 0.06) * pec

    # aerated lung: thickness from a blurred low-resolution copy of the lung fields
    lung_soft = np.maximum(scene.lung["R"], scene.lung["L"])
    # a pneumothorax's pleural space is air too (it is marked as having no vessels)
    air_soft = np.maximum(lung_soft, layers.no_vessels)
    small = max(1, min(w, h) // 96)
    lo = air_soft[small // 2::small, small // 2::small]
    prof = ndimage.gaussian_filter(lo, 0.045 / (px * small), mode="constant")
    prof = _resize(prof, h, w)
    thick = air_soft * np.clip(0.2 + 1.15 * prof, 0, 1) ** 1.1
    aerated = thick * (1.0 - layers.fill)
    A -= 1.02 * aerated
    # fluid in the air spaces is a bit denser than soft tissue
    A += 0.25 * thick * layers.fill

    # heart: a little denser than the chest wall
    hr = _heart_field(g, X, Y)
    A += 0.2 * np.sqrt(np.clip(1 - hr ** 2, 0, 1))
    # aortic knob
    kx, ky = _knob_centre(g)
    kr = np.hypot(X - kx, Y - ky) / a.knob_r
    A += 0.12 * np.sqrt(np.clip(1 - kr ** 2, 0, 1))

    # vascular markings: branching trees from the hila, tapering to the periphery
    vess = [np.zeros((h, w), np.float32) for _ in range(3)]
    pts = []  # (x, y, weight, class) of both sides, splatted once per class
    for side in ("R", "L"):
        vx, vy, vw = a.vessels[side]
        hx = a.xm + sg_of[side] * (a.med_w * g.med_scale + 0.035)
        hy = a.hilum_y[side] - g.hilum_shift[side]
        s = g.collapse[side]
        ox, oy = a.xm + sg_of[side] * (a.med_w + 0.03), a.dome[side] - 0.06
        x, y = hx + vx, hy + vy * (1 + 0.15 * (a.dome[side] - 0.12))
        x, y = ox + (x - ox) * s, oy + (y - oy) * (0.35 + 0.65 * s)
        pts.append((x, y, 80 * 0.785 * vw ** 2 * 0.0025 / px ** 2, np.digitize(vw, [0.0022, 0.0045])))
    x, y, wt, cls = (np.concatenate(c) for c in zip(*pts))
    for c in range(3):
        sel = cls == c
        scene.splat.points(x[sel], y[sel], wt[sel], vess[c])
    vmap = sum(_blur(v, max(0.5, sig / px)) for v, sig in zip(vess, (0.0012, 0.0024, 0.0045)))
    vis = np.clip(lung_soft * 1.3, 0, 1) * (1.0 - layers.no_vessels) * (1.0 - 0.8 * layers.fill)
    A += np.clip(vmap, 0, 2.0) * 0.6 * vis

    # trachea and main bronchi (air)
    hy = g.heart_axes()[1]
    carina = (a.xm - 0.004, hy - 0.95 * (hy - a.apex_y) * 0.55 + 0.06)
    tr = _edge(0.016 - np.abs(X - a.xm + 0.004 + 0.02 * np.clip(Y - carina[1], -0.4, 0) * 0), px * 2) \
        * _edge(carina[1] - Y, px * 3)
    bron = np.zeros((h, w), np.float32)
    for side, dx, dy in (("R", -0.085, 0.07), ("L", 0.1, 0.06)):
        scene.splat.curve(np.array([carina, (carina[0] + dx, carina[1] + dy)]), 1.0, bron)
    bron = _blur(bron, 0.011 / px)
    A -= 0.45 * (tr + np.clip(bron * 0.011 / px * 1.5, 0, 1))

    # gastric bubble under the left hemidiaphragm
    if a.bubble[0]:
        bx, by = a.xc + 0.17, a.dome["L"] - g.raise_dia["L"] + 0.03 + a.bubble[1] * 0.6
        br = np.hypot((X - bx) / (1.5 * a.bubble[1]), (Y - by) / a.bubble[1])
        bub = np.clip((1 - br) / 0.25, 0, 1) * (Y < by + 0.3 * a.bubble[1])
        A -= 0.55 * bub * (1 - layers.fill)

    # bones
    bone = np.zeros((h, w), np.float32)
    bone += _spine(scene)
    bone += _ribs(scene, fracture)
    bone += _clavicles_scapulae(scene)
    A += a.bone * bone

    # fluid, lesions and metal from the findings
    A += layers.dense + layers.metal
    A = np.maximum(A, 0.0)

    # 6. exposure, detector blur, quantum noise
    P = 1.0 - np.exp(-1.05 * A)
    noise = rng.standard_normal((h, w), dtype=np.float32)
    # quantum noise before the detector's blur, so it is slightly correlated like a real one
    P = P + 0.034 * np.sqrt(np.clip(P, 0.02, 1.0)) * noise
    P = _blur(P, max(0.6, 0.55 * min(w, h) / 256))
    P = np.clip(P, 0.0, 1.0).astype(np.float32)
    return P, (fracture or {})


def _band(d, half):
    """Bone cross-section across a band: cortex brighter than the medulla."""
    r = np.abs(d) / half
    inside = np.clip(1 - r ** 2, 0, 1)
    cortex = np.maximum(1.0 - ((r - 0.85) * (1 / 0.2)) ** 2, 0.0)
    return 0.55 * np.sqrt(inside) + 0.45 * cortex


def _span(scene: _Scene, lo: float, hi: float, axis: str) -> slice:
    """Pixel index range covering normalised coordinates [lo, hi] along x or y."""
    n = scene.w if axis == "x" else scene.h
    s = min(scene.w, scene.h)
    i0 = int(math.floor(lo * s + n / 2 - 0.5)) - 1
    i1 = int(math.ceil(hi * s + n / 2 - 0.5)) + 2
    return slice(min(max(i0, 0), n), min(max(i1, 0), n))


def _spine(scene: _Scene):
    a = scene.g.a
    full = np.zeros_like(scene.X)
    cols = _span(scene, a.xm - 0.05, a.xm + 0.05, "x")
    rows = _span(scene, a.apex_y - 0.2, 10.0, "y")
    X, Y = scene.X[rows, cols], scene.Y[rows, cols]
    vw = 0.033
    x = X - a.xm
    col = _edge(vw - np.abs(x), scene.px * 1.5)
    period = 0.047
    ph = ((Y - a.apex_y + 0.3) / period) % 1.0
    body = col * (0.7 + 0.3 * _edge(np.minimum(ph, 1 - ph) - 0.1, 0.05))
    # pedicles: paired ovals, and the spinous process in the midline
    ped = np.zeros_like(X)
    for sgn in (-1, 1):
        ped += np.clip(1 - ((x - sgn * 0.62 * vw) / 0.009) ** 2 - ((ph - 0.35) / 0.17) ** 2, 0, 1)
    spin = np.clip(1 - (x / 0.006) ** 2 - ((ph - 0.6) / 0.22) ** 2, 0, 1)
    full[rows, cols] = 0.32 * body + 0.3 * np.sqrt(ped) + 0.2 * np.sqrt(spin) * col
    return full


def _ribs(scene: _Scene, fracture):
    """Posterior ribs arching from the spine, anterior ribs sloping down medially."""
    g, a = scene.g, scene.g.a
    out = np.zeros_like(scene.X)
    rows = _span(scene, a.apex_y - 0.06, max(a.cp.values()) + 0.3, "y")
    mid = _span(scene, a.xm, a.xm, "x").start + 1
    n = 11
    k = np.arange(n)
    y_k = (a.rib_y0 + a.rib_sp * k * (1 + 0.045 * k) * (1.0 if a.view == "PA" else 0.92)).astype(np.float32)
    t_k = (0.019 + 0.0012 * k).astype(np.float32)
    # per-rib lookups, gathered by each pixel's rib index (float32, like the coordinate grids)
    mid_k, fade_k = y_k + t_k / 2, (1.0 - 0.4 * k / n).astype(np.float32)
    ant_half_k, ant_on_k = 0.55 * t_k, (k < 7).astype(np.float32)
    for side in ("R", "L"):
        sg = _sign(side)
        cols = slice(0, mid) if side == "R" else slice(mid, scene.w)
        X, Y = scene.X[rows, cols], scene.Y[rows, cols]
        u = sg * (X - a.xm) - 0.02  # from the costovertebral joint
        cw = a.cage_w
        uu = np.clip(u, 0, None) / cw
        # posterior arc: up a little from the spine, then curving down to the lateral wall
        curv = 1.0 + 0.9 * np.clip((a.rib_y0 + 0.16 - Y) / 0.16, 0, 1)
        gpost = cw * curv * (-0.26 * uu + 0.24 * uu ** 2 + 0.9 * np.clip(uu - 0.72, 0, None) ** 2)
        F = Y - gpost
        if fracture is not None and fracture["side"] == side:
            j = fracture["rib"]
            uf = fracture["u"]
            near = np.abs(F - (y_k[j] + t_k[j] / 2)) < a.rib_sp * 0.45
            F = F + np.where(near & (uu > uf), fracture["step"] * t_k[j], 0.0)
        idx = np.clip(np.searchsorted(y_k, F) - 1, 0, n - 1)
        d = F - mid_k[idx]
        post = _band(d, t_k[idx] / 2) * (u > -0.01) * _edge(cw + 0.03 - uu * cw, 0.01) \
            * (0.35 + 0.65 * _edge(a.cp[side] + 0.02 - Y, 0.1))
        post *= fade_k[idx]
        if fracture is not None and fracture["side"] == side:
            j = fracture["rib"]
            uf = fracture["u"]
            gap = _edge(np.abs(uu - uf) * cw - fracture["gap"] / 2, scene.px)
            post *= np.where(idx == j, gap, 1.0)
            ui = uf * cw + 0.02
            fracture["x"] = float(a.xm + sg * ui)
            uu0 = uf
            fracture["y"] = float(y_k[j] + t_k[j] / 2 + cw * (-0.26 * uu0 + 0.24 * uu0 ** 2 + 0.9 * max(uu0 - 0.72, 0) ** 2))
            fracture["r"] = float(1.6 * t_k[j])
        out[rows, cols] += 0.32 * post
        # anterior ribs: from the lateral wall, sloping down and in; cartilage (medial) invisible
        lat_y = cw * (-0.26 + 0.24 + 0.9 * 0.28 ** 2)
        v = np.clip(cw - np.clip(u, 0, None), 0, None) / cw  # 0 at the lateral wall
        gant = lat_y + cw * (0.75 * v - 0.3 * v ** 2)
        Fa = Y - gant
        ia = np.clip(np.searchsorted(y_k, Fa) - 1, 0, n - 1)
        da = Fa - mid_k[ia]
        ant = _band(da, ant_half_k[ia]) * _edge(0.62 - v, 0.12) * (u < cw + 0.005) * ant_on_k[ia]
        out[rows, cols] += 0.16 * ant
    return out


def _clavicles_scapulae(scene: _Scene):
    g, a = scene.g, scene.g.a
    full = np.zeros_like(scene.X)
    rows = _span(scene, a.apex_y - 0.12, a.apex_y + 0.4, "y")
    mid = _span(scene, a.xm, a.xm, "x").start + 1
    for side in ("R", "L"):
        sg = _sign(side)
        cols = slice(0, mid) if side == "R" else slice(mid, scene.w)
        X, Y = scene.X[rows, cols], scene.Y[rows, cols]
        out = full[rows, cols]
        u = sg * (X - a.xm)
        L = a.cage_w + 0.07
        t = np.clip((u - 0.025) / L, 0, 1)
        yc = a.clav_y - a.clav_slope * L * t + 0.007 * np.sin(2 * np.pi * t)
        half = 0.013 + 0.004 * (1 - t) + 0.004 * t ** 4
        clav = _band(Y - yc, half) * _edge(u - 0.025, 0.004) * _edge(L + 0.025 - u, 0.01)
        out += 0.55 * clav
        # scapula: PA rotates it off the lung; AP leaves its medial border over the lung
        med = a.cage_w - (0.0 if a.view == "PA" else 0.085) - 0.01 * a.scapula
        top = a.apex_y + 0.02
        ty = (Y - top) / 0.32
        border = med + 0.12 * np.clip(ty, 0, 1) ** 1.5  # medial border runs down and out
        sc = _edge(u - border, 0.006) * _edge(ty, 0.05) * _edge(1 - ty, 0.08) * _edge(border + 0.1 - u, 0.04)
        out += 0.22 * sc + 0.15 * _band(u - border - 0.006, 0.006) * _edge(ty, 0.05) * _edge(1 - ty, 0.08)
        # humeral head at the shoulder
        hx, hy = a.xm + sg * (a.body_w + 0.035), a.apex_y + 0.01
        hr = np.hypot(X - hx, Y - hy) / 0.065
        out += 0.4 * _band(hr * 0.065, 0.065) * (hr < 1)
    return full


# ----------------------------------------------------------------------------- backend

class PhantomBackend:
    """Procedural chest radiographs with exact masks (see the module docstring).

    Args:
        width, height: image size in pixels, 128..1024, multiples of 8.

    Example:
        >>> from synthmed.sampler import Case, FindingLabel
        >>> case = Case("case-0000000", 0, "train", 1, (FindingLabel("no_finding"),), "M", 50, "PA")
        >>> PhantomBackend(128, 128).generate([case], [None])[0].pixels.dtype
        dtype('float32')
    """

    def __init__(self, width: int = 256, height: int = 256):
        lo, hi = PHANTOM_SIZE_RANGE
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi or int(value) % 8:
                raise ValueError(f"{name} must be an integer multiple of 8 within {lo}..{hi}, got {value!r}")
        self.width, self.height = int(width), int(height)
        self.info = BackendInfo(name="phantom", model_id=MODEL_ID, model_hash=MODEL_HASH,
                                hashed=f"the phantom ({MODEL_HASH})",
                                settings={"width": self.width, "height": self.height,
                                          "convention": "patient right on image left",
                                          "exposure": "1 - exp(-attenuation)"})

    def generate(self, cases: Sequence, prompts: Sequence) -> list[GeneratedImage]:
        """One image per case, in order; prompts are ignored (the case holds every label)."""
        return [render_case(case, self.width, self.height) for case in cases]

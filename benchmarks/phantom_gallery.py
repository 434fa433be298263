"""A labelled gallery of the phantom backend: each finding at mild / moderate / severe.

Rows are findings, columns severities (findings without a severity repeat with other seeds);
the first row shows no_finding as PA and AP, female and male. Saves docs/phantom_gallery.png.

    python benchmarks/phantom_gallery.py [--size 240] [--out docs/phantom_gallery.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from synthmed.backends.phantom import render_case
from synthmed.sampler import Case, FindingLabel

ROWS = [
    ("pneumonia", "right_lower_lobe"),
    ("consolidation", "right_upper_lobe"),
    ("lung_opacity", "left_lower_zone"),
    ("atelectasis", "left_lower_lobe"),
    ("pleural_effusion", "right"),
    ("pneumothorax", "left"),
    ("cardiomegaly", None),
    ("enlarged_cardiomediastinum", None),
    ("edema", "bilateral"),
    ("nodule", "right_upper_lobe"),
    ("mass", "left_upper_lobe"),
    ("pleural_other", "right"),
    ("fracture", "left"),
    ("support_devices", None),
]
DEVICE_ROW = ["endotracheal_tube", "central_venous_catheter", "pacemaker"]
SEVERITIES = ["mild", "moderate", "severe"]


def tile(case: Case, size: int, text: str) -> Image.Image:
    img = render_case(case, size, size)
    im = Image.fromarray((img.pixels * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    draw = ImageDraw.Draw(im)
    ctr = img.measurements["cardiothoracic_ratio"]
    draw.rectangle([0, 0, size, 12], fill=(0, 0, 0))
    draw.text((3, 1), f"{text}  CTR {ctr:.2f}", fill=(255, 255, 0))
    return im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=240)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "phantom_gallery.png"))
    ap.add_argument("--cols", type=int, default=4)
    args = ap.parse_args()
    size = args.size
    tiles: list[list[Image.Image]] = []
    normals = [("PA", "F", 11, 34), ("PA", "M", 12, 61), ("AP", "F", 13, 72), ("AP", "M", 14, 45)]
    tiles.append([tile(Case(f"n{i}", i, None, seed, (FindingLabel("no_finding"),), sex, age, view), size,
                       f"no_finding {view} {sex}{age}") for i, (view, sex, seed, age) in enumerate(normals)])
    for r, (finding, loc) in enumerate(ROWS):
        row = []
        for c, sev in enumerate(SEVERITIES):
            severe = None if finding in ("pleural_other", "fracture", "support_devices") else sev
            f = finding if finding != "support_devices" else DEVICE_ROW[c]
            label = FindingLabel(f, loc, severe)
            case = Case(f"c{r}{c}", r, None, 100 + r, (label,), "MF"[c % 2], 55, "PA")
            row.append(tile(case, size, f"{f} {loc or ''} {severe or ''}".replace("  ", " ")))
        # the last column: the same patient without the finding, for comparison
        row.append(tile(Case(f"c{r}x", r, None, 100 + r, (), "MF"[2 % 2], 55, "PA"), size, "same, no finding"))
        tiles.append(row)
    cols = max(len(r) for r in tiles)
    sheet = Image.new("RGB", (cols * size, len(tiles) * size), (40, 40, 40))
    for i, row in enumerate(tiles):
        for j, im in enumerate(row):
            sheet.paste(im, (j * size, i * size))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(tiles)} rows x {cols} columns of {size} px)")


if __name__ == "__main__":
    main()

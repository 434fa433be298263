"""Shared by the tests of scripts/: a script loaded as a module, and a tiny manifest of random films."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    """scripts/NAME.py imported as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_manifest(folder: Path, findings: Sequence[str], *, n: int, size: int, val_every: int,
                        views: Sequence[str] = ("PA",)) -> Path:
    """``n`` random ``size`` x ``size`` drr films in ``folder`` (every ``val_every``-th held out), findings and
    views in turn; returns the manifest.csv."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"images/case-{i:03d}.png"
        Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(folder / name)
        rows.append({"file_name": name, "split": "val" if i % val_every == 0 else "train",
                     "findings": findings[i % len(findings)], "view": views[i % len(views)], "backend": "drr"})
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "manifest.csv"

"""dataset_card.json and the folder's README.md: what the set is, where it came from, how it may be used.

Example:
    >>> "not for diagnostic use" in INTENDED_USE
    True
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .. import __version__
from ..spec import DatasetSpec

INTENDED_USE = "synthetic data for research and development; not for diagnostic use"


def software_versions(spec: DatasetSpec, backend: str) -> dict[str, str]:
    """Versions of the software that makes a run's files here: decided by the spec and backend, not by what
    this process happens to have imported (so that every executor writes the same card)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    used = [("PIL", "Pillow")]  # it writes the PNGs and masks: its zlib decides their bytes
    if "dicom" in spec.image.formats:
        used += [("pydicom", "pydicom"), ("highdicom", "highdicom")]
    if backend == "diffusion":
        used += [("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers")]
    versions = {"synthmed": __version__, "python": platform.python_version(), "numpy": numpy.__version__}
    for module, dist in used:
        try:
            versions[module] = getattr(sys.modules.get(module), "__version__", None) or version(dist)
        except PackageNotFoundError:
            pass
    return versions


def _model_as_named(spec: DatasetSpec, model: str | None) -> str | None:
    """The model as the card shows it: as the spec names it (relative to the spec, as written), or a folder given on
    the command line by its name; not the absolute path synthmed resolved, which says where the maker's files are,
    not what made the set (the manifest's model_hash says that)."""
    if not isinstance(model, str) or not os.path.isabs(model):
        return model
    if model == spec.generator.model:
        return spec.to_dict().get("generator", {}).get("model", Path(model).name)
    return Path(model).name


def write_card(spec: DatasetSpec, out: Path, cases, run: dict, worker_versions: dict | None = None) -> None:
    """dataset_card.json and a short README.md: what this set is, where it came from, how it may be used.

    ``worker_versions``: the software versions of the processes that made the images, where that was not this one.
    """
    from ..atomic import atomic_write_bytes

    versions = {**software_versions(spec, run["backend"]), **(worker_versions or {})}
    counts = cases.counts()
    anatomy = {}
    if run["backend"] == "drr":  # where the CT the films are projected from comes from
        from ..backends.drr import anatomy_card

        anatomy["anatomy"] = anatomy_card(spec.generator.anatomy)
    card = {
        "name": spec.name, "description": spec.description, "synthetic": True, "intended_use": INTENDED_USE,
        "output_format": run["format"],
        "count": len(cases), "spec_hash": spec.spec_hash, "spec": spec.to_dict(),
        "backend": {"name": run["backend"], "model": _model_as_named(spec, run["model"])},
        "counts": [{k: v for k, v in r.items() if k != "target"} | {"target": round(r["target"], 6)} for r in counts],
        "software": versions,
        **anatomy,
        "files": {"manifest": "manifest.csv", "metadata": "images/<split>/metadata.csv", "cases": "cases.jsonl",
                  "images": "images/<split>/<case_id>.png", "dicom": "dicom/<split>/<case_id>.dcm",
                  "sr": "dicom/<split>/<case_id>_sr.dcm", "seg": "dicom/<split>/<case_id>_seg.dcm",
                  "masks": "masks/<split>/<case_id>_mask_<finding>.png",
                  "manifest_columns": "https://github.com/synthmed/synthmed/blob/main/schemas/manifest_columns.json"},
    }
    # in the spec's own order: a spec read back from the card must plan the same cases (split order matters)
    atomic_write_bytes(out / "dataset_card.json",
                       (json.dumps(card, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    splits = ", ".join(f"{s} {sum(r[s] for r in counts):,}" for s in spec.splits.keys)
    readme = (f"# {spec.name}\n\nSYNTHETIC chest X-ray dataset made by synthmed {__version__}: {len(cases):,} images "
              f"({splits}).\nNo image shows a real patient. Intended use: {INTENDED_USE}.\n\n"
              f"- `manifest.csv`: one row per image: what it shows (findings, location, severity, the 14 CheXpert "
              f"columns), patient, view, prompt, seed, file paths and sha256.\n"
              f"- `dataset_card.json`: the spec (sha256 {spec.spec_hash[:12]}), counts per cell, software versions.\n"
              + (f"- `images/<split>/`: {spec.image.png_bit_depth}-bit grayscale PNGs"
                 + (" (the DICOM files keep 12 bits)" if spec.image.png_bit_depth == 8 and spec.image.bit_depth == 16
                    and "dicom" in spec.image.formats else "") + ".\n"
                 if "png" in spec.image.formats else "")
              + ("- `dicom/<split>/`: per image the DICOM image, `<case_id>_sr.dcm` (its findings, coded: a DICOM SR, "
                 "TID 1500) and, where there are masks, `<case_id>_seg.dcm` (a DICOM SEG); all one study.\n"
                 if "dicom" in spec.image.formats else "") +
              "- Load with Hugging Face: `datasets.load_dataset('imagefolder', data_dir='.')`.\n")
    if "anatomy" in card:
        readme += f"\n{card['anatomy']['images']}\nAnatomy: {card['anatomy']['source']} (`dataset_card.json`, " \
                  "`anatomy`, has the sha256 of every file).\n"
    atomic_write_bytes(out / "README.md", readme.encode("utf-8"))

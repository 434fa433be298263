"""Every quality check synthmed knows, in report order: one :class:`Check` per word of ``qc.gate``.

Whatever names checks reads this table: the spec's default ``qc.gate`` (:data:`DEFAULT_GATE`) and the checks
reject-and-regenerate can fix (:data:`REGENERABLE_CHECKS`), the order of ``qc_flags``
(:data:`FLAG_MEANINGS`), the run (:func:`synthmed.qc.run.qc` computes each family's section in this order,
keeps for it what it ``needs``, and refuses a gate naming no check), the report's check table (one row per
check, in this order) and the terminal summary (:mod:`synthmed.qc.report`). It imports nothing of synthmed
and no numpy, so ``synthmed validate`` reads it for free.

A *family* is the module that computes checks together: one section of qc_report.json's ``sections``
(``synthmed.qc.reference_metrics`` gives ``fid``, ``kid``, ``precision``, ``recall`` and ``coverage``), or
the per-image checks, which :func:`synthmed.qc.checks.check_row` runs on one read of each file. A family's
module defines ``section(inputs) -> dict`` (none for the per-image checks) and may define
``table_rows(section, inputs) -> {name: row}``; without it each check's row is the section's ``status``,
``value`` and ``threshold`` (:func:`synthmed.qc.check_table.set_row`).

Example:
    >>> get("diversity").module, get("diversity").threshold
    ('synthmed.qc.diversity', 'max_ms_ssim')
    >>> "diversity" in DEFAULT_GATE, FAMILIES[0].section, [c.name for c in get_family("reference").checks][:2]
    (False, None, ['fid', 'kid'])
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

# What a run keeps for a check beyond the per-image results, the manifest rows and the spec
NEEDS = {
    "cases": "cases.jsonl, the build's own record of its plan",
    "features": "every image's features (the feature extractor; by default the auditor's embedding)",
    "prediction": "the auditor's reading of every image (a full run only)",
    "diversity_images": "a copy of the first images of each finding cell, at most 128 pixels a side (a full run only)",
    "small_copies": "a 64 x 64 copy of every image (with a training manifest)",
    "reference_set": "the reference manifest's images, read (--reference)",
    "training_set": "the training manifest's images, read (--training-manifest)",
}
LEVELS = ("image", "set")


@dataclass(frozen=True)
class Check:
    """One check: the word in ``qc.gate``, the report's check table and, where it names images, ``qc_flags``.

    Attributes:
        name: the word.
        description: what it tests, as the report's check table says.
        module: the module of its family, which computes it.
        level: ``image`` (per file, :func:`synthmed.qc.checks.check_row`) or ``set``.
        section: its family's key in qc_report.json's ``sections``; None for the per-image checks.
        gating: in the default ``qc.gate``.
        threshold: the ``qc.thresholds`` field of its limit (None: it has none of its own).
        flag: what it means on one image, for a check that names the images it fails in ``qc_flags``.
        needs: what the run keeps for it (keys of :data:`NEEDS`).
        regenerable: remaking the image can fix it (reject-and-regenerate, ``qc.reject``).
        explain_skip: the terminal summary says why its section was skipped (it needs an input one gives).
        note: a remark its row in the check table carries.
    """

    name: str
    description: str
    module: str
    level: str = "set"
    section: str | None = None
    gating: bool = False
    threshold: str | None = None
    flag: str | None = None
    needs: tuple[str, ...] = ()
    regenerable: bool = False
    explain_skip: bool = False
    note: str | None = None

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"check {self.name!r}: level must be one of {LEVELS}, got {self.level!r}")
        if (self.section is None) != (self.level == "image"):
            raise ValueError(f"check {self.name!r}: a set-level check has a section, a per-image one none")
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"check {self.name!r}: unknown need(s) {unknown} (known: {', '.join(NEEDS)})")


def _image(name: str, meaning: str, *, gating: bool = True, threshold: str | None = None,
           regenerable: bool = False, note: str | None = None) -> Check:
    """A per-image check: its row says what failing it means on an image, and it names those images."""
    return Check(name, meaning, "synthmed.qc.checks", level="image", gating=gating, threshold=threshold,
                 flag=meaning, regenerable=regenerable, note=note)


def _reference(name: str, description: str, threshold: str) -> Check:
    return Check(name, description, "synthmed.qc.reference_metrics", section="reference", threshold=threshold,
                 needs=("features", "reference_set"), explain_skip=True)


# The order is the report's: the per-image checks (in qc_flags order), then the set-level families as qc runs them.
CHECKS: tuple[Check, ...] = (
    _image("readable", "the file is missing or does not decode (or an SR or SEG is not one)"),
    _image("size", "width x height differ from the spec", regenerable=True),
    _image("bit_depth", "bit depth differs from the spec"),
    _image("nan", "NaN or infinite pixels", regenerable=True,
           note="files hold integers; NaN is checked on a backend's output when reject.max_tries > 0"),
    _image("blank", "(nearly) blank: the 1st-99th percentile range is below min_dynamic_range of full scale",
           threshold="min_dynamic_range", regenerable=True),
    _image("saturated", "more than max_saturated_fraction of the pixels at full white, or max_black_fraction at "
           "black", threshold="max_saturated_fraction", regenerable=True),
    _image("sha256", "the file's sha256 differs from the manifest's"),
    _image("dicom_match", "the PNG's samples differ from what the writer makes of the DICOM's pixels"),
    _image("empty_mask", "a finding's mask marks no pixel: the label says it is there, the mask shows nothing"),
    # Statistical checks (intensity) are reported but gate only where a spec asks: at k = 3 a large clean set
    # still has images in the tails, and regenerating them would bend the distribution.
    Check("intensity", "region means or histogram quantiles outside the reference bands (mean ± k·σ)",
          "synthmed.qc.intensity", section="intensity", threshold="intensity_k", needs=("reference_set",),
          flag="region means or histogram quantiles outside the reference bands (mean ± k·σ)"),
    Check("dciodvfy", "dciodvfy (dicom3tools) reports errors", "synthmed.qc.dciodvfy", section="dciodvfy",
          gating=True, flag="dciodvfy (dicom3tools) reports errors"),
    Check("manifest_consistency", "rows that disagree with cases.jsonl or the spec (case, labels, patient, view, "
          "size, split, file paths; each split's metadata.csv)", "synthmed.qc.manifest_consistency",
          section="manifest_consistency", gating=True, needs=("cases",)),
    Check("spec_fidelity", "lowest 1 - TVD of an attribute or pair against the plan of the cases built",
          "synthmed.qc.spec_fidelity", section="spec_fidelity", threshold="min_spec_fidelity", needs=("cases",)),
    Check("duplicates", "fraction of images in a near-duplicate pair", "synthmed.qc.duplicates",
          section="duplicates", threshold="max_duplicate_fraction", needs=("features",),
          flag="a near-duplicate of another image of the set"),
    Check("diversity", "mean MS-SSIM within a finding cell (lower is more diverse)", "synthmed.qc.diversity",
          section="diversity", threshold="max_ms_ssim", needs=("diversity_images",)),
    _reference("fid", "Fréchet distance to the reference set's features", "max_fid"),
    _reference("kid", "kernel (MMD²) distance to the reference set's features", "max_kid"),
    _reference("precision", "share of generated images inside the reference manifold", "min_precision"),
    _reference("recall", "share of reference images inside the generated manifold", "min_recall"),
    _reference("coverage", "share of reference neighbourhoods holding a generated image", "min_coverage"),
    # gates where the auditor applies (synthmed.qc.label_fidelity.auditor_applies); elsewhere reported only
    Check("label_fidelity", "agreement of the auditor's predictions with the manifest's labels",
          "synthmed.qc.label_fidelity", section="auditor", gating=True, threshold="min_label_fidelity",
          needs=("prediction",), explain_skip=True),
    Check("memorisation", "fraction of generated images closer to a training image than training images are to "
          "each other (1st percentile)", "synthmed.qc.memorisation", section="memorisation",
          threshold="max_memorised_fraction", needs=("features", "training_set", "small_copies"),
          explain_skip=True, flag="closer to a training image than the training images are to each other"),
)

CHECK_NAMES: tuple[str, ...] = tuple(c.name for c in CHECKS)
PER_IMAGE_CHECKS: tuple[str, ...] = tuple(c.name for c in CHECKS if c.level == "image")
SET_CHECKS: tuple[str, ...] = tuple(c.name for c in CHECKS if c.level == "set")
DEFAULT_GATE: tuple[str, ...] = tuple(c.name for c in CHECKS if c.gating)
REGENERABLE_CHECKS: tuple[str, ...] = tuple(c.name for c in CHECKS if c.regenerable)
# check -> what failing it means on an image; the order is the order of qc_flags
FLAG_MEANINGS: dict[str, str] = {c.name: c.flag for c in CHECKS if c.flag is not None}
# sections whose skip the terminal summary explains (each needs an input the user gives)
EXPLAIN_SKIP_SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(c.section for c in CHECKS if c.explain_skip and c.section))


@dataclass(frozen=True)
class Family:
    """The checks one module computes together, and the section of qc_report.json it writes (None: per image)."""

    module: str
    section: str | None
    checks: tuple[Check, ...]

    def load(self) -> ModuleType:
        """The family's module (imported on first use: it may need numpy, scipy or torch)."""
        return importlib.import_module(self.module)


def families_of(checks: Sequence[Check]) -> tuple[Family, ...]:
    """Consecutive checks of one module make a family; ValueError where a module's checks are not consecutive."""
    families: list[Family] = []
    for check in checks:
        if families and families[-1].module == check.module:
            last = families[-1]
            if last.section != check.section:
                raise ValueError(f"check {check.name!r}: {check.module} writes one section, {last.section!r}")
            families[-1] = Family(last.module, last.section, last.checks + (check,))
        elif any(f.module == check.module for f in families):
            raise ValueError(f"check {check.name!r}: the checks of {check.module} must be consecutive in CHECKS")
        else:
            families.append(Family(check.module, check.section, (check,)))
    return tuple(families)


FAMILIES: tuple[Family, ...] = families_of(CHECKS)


def get(name: str) -> Check:
    """The check of that name; KeyError naming the known ones."""
    for check in CHECKS:
        if check.name == name:
            return check
    raise KeyError(f"no check {name!r} (known: {', '.join(CHECK_NAMES)})")


def get_family(section: str | None) -> Family:
    """The family that writes this section of qc_report.json (None: the per-image checks)."""
    for family in FAMILIES:
        if family.section == section:
            return family
    raise KeyError(f"no family writes the section {section!r}")


def unknown_checks(names: Sequence[str]) -> list[str]:
    """The names that are no check (e.g. in a spec's ``qc.gate``), in their order."""
    return [n for n in names if n not in CHECK_NAMES]


def regenerable_in(gate: Sequence[str]) -> tuple[str, ...]:
    """The gating checks that regenerating an image can fix, in registry order."""
    return tuple(c for c in REGENERABLE_CHECKS if c in gate)


def needed(what: str) -> bool:
    """Whether any registered check needs ``what`` (a key of :data:`NEEDS`)."""
    if what not in NEEDS:
        raise KeyError(f"no need {what!r} (known: {', '.join(NEEDS)})")
    return any(what in c.needs for c in CHECKS)

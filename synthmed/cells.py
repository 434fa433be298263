"""What a spec's findings mixture means: its cells, each a finding x location x severity combination of one
entry with its probability, and the label of one finding of a case. No randomness (the sampler draws
cases from these cells); the spec uses the cells to check a mixture, the sampler to allocate cases.

Example:
    >>> from synthmed.spec import load_spec
    >>> spec = load_spec("spec_version: 1\\nname: d\\ncount: 6\\nfindings: [{finding: pneumothorax, weight: 1, location: {right: 1, left: 1}}]")
    >>> [(c.location, c.severity) for c in enumerate_cells(spec.findings)][:2]
    [('right', 'mild'), ('right', 'moderate')]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from .vocabulary import Vocabulary, get_vocabulary


@dataclass(frozen=True, slots=True)
class FindingLabel:
    """One finding of a case: what, where (or None), how severe (or None)."""

    finding: str
    location: str | None = None
    severity: str | None = None

    def codes(self, vocab: Vocabulary | None = None) -> dict[str, str]:
        """Coded concepts as ``SYSTEM:code`` strings, e.g. ``{'finding': 'SCT:233604007', ...}``."""
        vocab = vocab or get_vocabulary()
        out = {"finding": str(vocab.findings[self.finding].code)}
        if self.location:
            out["location"] = str(vocab.locations[self.location].code)
        if self.severity:
            out["severity"] = str(vocab.severities[self.severity].code)
        return out

    def to_dict(self, vocab: Vocabulary | None = None) -> dict:
        return {"finding": self.finding, "location": self.location, "severity": self.severity,
                "codes": self.codes(vocab)}



# ----------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    """A finding x location x severity combination of one mixture entry, with its probability."""

    component: int
    findings: tuple[FindingLabel, ...]
    prob: float

    @property
    def finding(self) -> str:
        return "+".join(f.finding for f in self.findings)

    @property
    def location(self) -> str:
        return "/".join(dict.fromkeys(f.location for f in self.findings if f.location)) or "-"

    @property
    def severity(self) -> str:
        return "/".join(dict.fromkeys(f.severity for f in self.findings if f.severity)) or "-"


MAX_ENTRY_CELLS = 200_000  # four findings that each draw their own lobe and severity make 104,976
MAX_CELLS = 500_000  # the whole spec: planning that many takes about 90 s and 3 GB


def cell_bound(component, vocab: Vocabulary | None = None) -> int:
    """How many cells :func:`enumerate_cells` goes through for one entry (before cells with the same labels merge):
    the product of its location and severity choices. Checked against MAX_ENTRY_CELLS and MAX_CELLS before any is
    built: an entry of eight findings that each draw their own location and severity would be 11 billion.

    Example:
        >>> from synthmed.spec import load_spec
        >>> spec = load_spec("dataset_specs/pneumonia.yaml")
        >>> [cell_bound(c) for c in spec.findings]
        [1, 9, 6]
    """
    vocab = vocab or get_vocabulary()
    located = [f for f in component.findings if vocab.findings[f].location_kinds]
    graded = [f for f in component.findings if vocab.findings[f].severity]
    bound = 1
    if component.location:
        bound *= len(component.location.items) if located else 1
    else:
        for f in located:
            bound *= len(vocab.findings[f].default_location)
    if component.severity:
        bound *= len(component.severity.items) if graded else 1
    else:
        bound *= len(vocab.severities) ** len(graded)
    return bound


def enumerate_cells(components: Sequence, vocab: Vocabulary | None = None) -> list[Cell]:
    """Every cell of the mixture in spec order; cells of one entry with the same labels are merged.

    A location (severity) given in an entry is drawn once per case and shared by its findings,
    each at the finest level it admits. Where none is given, each finding draws its own from
    the vocabulary's default locations (all three severities equally).
    """
    vocab = vocab or get_vocabulary()
    severities = list(vocab.severities)
    cells: list[Cell] = []
    for comp in components:
        located = [f for f in comp.findings if vocab.findings[f].location_kinds]
        graded = [f for f in comp.findings if vocab.findings[f].severity]
        # each slot: (findings it applies to, [(value, prob)])
        loc_slots = ([(located, list(comp.location.items))] if comp.location else
                     [([f], _normalised(vocab.findings[f].default_location)) for f in located])
        sev_slots = ([(graded, list(comp.severity.items))] if comp.severity else
                     [([f], [(s, 1 / len(severities)) for s in severities]) for f in graded])
        merged: dict[tuple, float] = {}
        for loc_choice in itertools.product(*[values for _, values in loc_slots]):
            for sev_choice in itertools.product(*[values for _, values in sev_slots]):
                loc_of: dict[str, str] = {}
                sev_of: dict[str, str] = {}
                prob = comp.weight
                for (targets, _), (value, p) in zip(loc_slots, loc_choice):
                    prob *= p
                    for f in targets:
                        loc_of[f] = vocab.project_location(value, f)
                for (targets, _), (value, p) in zip(sev_slots, sev_choice):
                    prob *= p
                    for f in targets:
                        sev_of[f] = value
                labels = tuple(FindingLabel(f, loc_of.get(f), sev_of.get(f)) for f in comp.findings)
                merged[labels] = merged.get(labels, 0.0) + prob
        cells.extend(Cell(comp.index, labels, prob) for labels, prob in merged.items())
    return cells


def _normalised(items) -> list[tuple[str, float]]:
    total = sum(w for _, w in items)
    return [(k, w / total) for k, w in items]

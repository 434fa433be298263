"""Which label-map structures (TotalSegmentator names) the drr backend needs: every film, and each finding at
each location. One table, read from what findings.py and render.py look up; ``synthmed validate`` refuses a
user's CT (``generator.anatomy``) that lacks one, naming it. Pure Python: validation imports no numpy here.

Example:
    >>> [need.text for need in required_structures("consolidation", "right_middle_lobe")]
    ['lung_middle_lobe_right']
    >>> required_structures("fracture", "left")[0].text
    'one of rib_left_4, rib_left_5, rib_left_6, rib_left_7'
"""

from __future__ import annotations

from dataclasses import dataclass

RIGHT_LUNG = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
LEFT_LUNG = ("lung_upper_lobe_left", "lung_lower_lobe_left")
LOBES = RIGHT_LUNG + LEFT_LUNG
# vocabulary location -> its lobe (the lingula is the left upper lobe's lowest part)
LOBE_OF = {"right_upper_lobe": "lung_upper_lobe_right", "right_middle_lobe": "lung_middle_lobe_right",
           "right_lower_lobe": "lung_lower_lobe_right", "left_upper_lobe": "lung_upper_lobe_left",
           "lingula": "lung_upper_lobe_left", "left_lower_lobe": "lung_lower_lobe_left"}
MEDIASTINUM = ("aorta", "superior_vena_cava", "brachiocephalic_trunk", "brachiocephalic_vein_left",
               "brachiocephalic_vein_right", "common_carotid_artery_left", "common_carotid_artery_right",
               "subclavian_artery_left", "subclavian_artery_right", "esophagus", "trachea")
FRACTURE_RIBS = (4, 5, 6, 7)


@dataclass(frozen=True)
class Need:
    """Structures of which at least one must be in the label map (most needs name one)."""

    any_of: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.any_of[0] if len(self.any_of) == 1 else f"one of {', '.join(self.any_of)}"

    def met_by(self, names) -> bool:
        return any(n in names for n in self.any_of)


def _each(*names: str) -> tuple[Need, ...]:
    return tuple(Need((n,)) for n in names)


# every film: the lungs (the body's landmarks, inspiration) and the heart (the cardiothoracic ratio)
BASE = _each(*LOBES, "heart")


def _lung_of(location: str | None, default: str) -> tuple[str, ...]:
    """The lobes of a location: a lobe itself, else the lobes of its side (a zone, a side), or of both."""
    loc = location or default
    if loc in LOBE_OF:
        return (LOBE_OF[loc],)
    if loc == "bilateral":
        return LOBES
    return LEFT_LUNG if loc.startswith("left") else RIGHT_LUNG


def _sides(location: str | None, default: str) -> tuple[str, ...]:
    loc = location or default
    if loc == "bilateral":
        return ("right", "left")
    return ("left",) if loc.startswith("left") or loc == "lingula" else ("right",)


def _collapsed_lobes(location: str | None) -> tuple[str, ...]:
    """Atelectasis collapses a named lobe, a zone's lobe, a side's lower lobe (findings._collapse_lobe)."""
    loc = location or "right_lower_lobe"
    if loc in LOBE_OF:
        return (LOBE_OF[loc],)
    if loc == "bilateral":
        return ("lung_lower_lobe_right", "lung_lower_lobe_left")
    side = "left" if loc.startswith("left") else "right"
    if loc.endswith("_zone"):
        level = {"upper": "upper", "middle": "middle" if side == "right" else "upper", "lower": "lower"}
        return (f"lung_{level[loc.split('_')[1]]}_lobe_{side}",)
    return (f"lung_lower_lobe_{side}",)


def required_structures(finding: str, location: str | None = None) -> tuple[Need, ...]:
    """The structures ``finding`` at ``location`` (a vocabulary id, None for the backend's default) needs
    beyond :data:`BASE`; a finding the table does not know needs nothing more."""
    if finding in ("consolidation", "pneumonia", "lung_opacity"):
        return _each(*_lung_of(location, "right_lower_lobe"))
    if finding in ("nodule", "mass", "lung_lesion"):
        return _each(*_lung_of(location, "right_upper_lobe"))
    if finding in ("pleural_effusion", "pneumothorax", "pleural_other"):
        return _each(*_lung_of(location, "right"))
    if finding == "edema":
        return _each(*_lung_of(location, "bilateral"))
    if finding == "atelectasis":
        return _each(*_collapsed_lobes(location))
    if finding == "fracture":
        return tuple(Need(tuple(f"rib_{side}_{n}" for n in FRACTURE_RIBS)) for side in _sides(location, "right"))
    if finding == "endotracheal_tube":
        return _each("trachea")
    if finding == "central_venous_catheter":
        return _each("superior_vena_cava", "trachea")
    if finding == "pacemaker":
        return _each("heart", "superior_vena_cava", *LOBES)
    if finding == "support_devices":  # one of the three devices, drawn per case
        return _each("trachea", "superior_vena_cava", "heart", *LOBES)
    if finding == "cardiomegaly":
        return _each("heart")
    if finding == "enlarged_cardiomediastinum":
        return (Need(("heart",)), Need(MEDIASTINUM))
    return ()


def spec_needs(components, vocab) -> dict:
    """Every structure need of a spec's findings (``findings`` entries, as :class:`synthmed.spec.FindingComponent`)
    with the first finding (and location) that needs it, in words; the entries' location choices are gone through
    one finding at a time, never as the product the cells are (an entry of many findings makes millions).

    Example:
        >>> from synthmed.spec import load_spec
        >>> from synthmed.vocabulary import get_vocabulary
        >>> needs = spec_needs(load_spec("dataset_specs/pneumonia.yaml").findings, get_vocabulary())
        >>> needs[Need(("lung_lower_lobe_right",))]
        'pneumonia at right_lower_lobe'
    """
    needs: dict = {}
    for comp in components:
        for finding in comp.findings:
            if comp.location:
                locations = [vocab.project_location(loc, finding) for loc in comp.location.keys]
            elif vocab.findings[finding].location_kinds:
                locations = [loc for loc, _ in vocab.findings[finding].default_location]
            else:
                locations = [None]
            for location in dict.fromkeys(locations):
                for need in required_structures(finding, location):
                    needs.setdefault(need, f"{finding} at {location}" if location else finding)
    return needs


# structures the backend reads at all (a folder of per-structure masks loads only these)
BONE_PREFIXES = ("rib_", "vertebrae_", "sternum", "clavicula_", "scapula_", "humerus_", "skull", "hip_",
                 "femur_", "sacrum")
USED = frozenset(LOBES + MEDIASTINUM + ("heart", "spinal_cord"))


def is_used(name: str) -> bool:
    """Whether the backend looks at a structure (the lungs, heart, mediastinum, airway, bones)."""
    return name in USED or name.startswith(BONE_PREFIXES)

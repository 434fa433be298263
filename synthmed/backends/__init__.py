"""Image backends behind one small protocol: cases and prompts in, images (and masks) out.

A backend is a pure function of each case: the same case gives the same image whatever
batch it is generated in. Backends are looked up by name with :func:`create_backend`;
the heavy ones import their libraries only when created.

Example:
    >>> from synthmed.spec import load_spec
    >>> spec = load_spec("spec_version: 1\\nname: d\\ncount: 2\\nfindings: [{finding: cardiomegaly, weight: 1}]")
    >>> backend = create_backend(spec, backend="pattern")
    >>> backend.info.name
    'pattern'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..prompts import Prompt
    from ..sampler import Case
    from ..spec import DatasetSpec

BACKENDS = ("diffusion", "phantom", "pattern", "drr")


@dataclass(frozen=True)
class BackendInfo:
    """What made the images, as recorded in the manifest and the dataset card."""

    name: str
    model_id: str
    model_hash: str
    settings: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageGeometry:
    """How a film was taken, where a backend simulates it: what the DICOM writer states as its geometry.

    Args:
        view: PA, AP or LL.
        imager_pixel_spacing: (row, column) spacing in mm at the detector (DICOM ImagerPixelSpacing).
        source_to_detector_mm: source-to-image distance (DICOM DistanceSourceToDetector).
        source_to_patient_mm: source to the patient's isocentre, the centre of the lungs (DICOM
            DistanceSourceToPatient), so that ``magnification`` = source_to_detector / source_to_patient.
        patient_orientation: (row direction, column direction) as displayed, e.g. ("L", "F").

    Example:
        >>> g = ImageGeometry("PA", (1.40625, 1.40625), 1800.0, 1650.0, ("L", "F"))
        >>> round(g.magnification, 4), g.pixel_spacing
        (1.0909, (1.2890625, 1.2890625))
    """

    view: str
    imager_pixel_spacing: tuple[float, float]
    source_to_detector_mm: float
    source_to_patient_mm: float
    patient_orientation: tuple[str, str]

    def __post_init__(self):
        spacing = tuple(self.imager_pixel_spacing)
        if len(spacing) != 2 or not all(isinstance(s, (int, float)) and 0 < s < 1e3 for s in spacing):
            raise ValueError(f"imager_pixel_spacing must be two positive sizes in mm, "
                             f"got {self.imager_pixel_spacing!r}")
        if not 0 < self.source_to_patient_mm < self.source_to_detector_mm < 1e5:
            raise ValueError(f"need 0 < source_to_patient_mm < source_to_detector_mm, got "
                             f"{self.source_to_patient_mm!r} and {self.source_to_detector_mm!r}")
        orientation = tuple(self.patient_orientation)
        if len(orientation) != 2 or not all(isinstance(o, str) and o and set(o) <= set("LRAPHF") for o in orientation):
            raise ValueError(f"patient_orientation must be two DICOM directions (L R A P H F), got "
                             f"{self.patient_orientation!r}")

    @property
    def magnification(self) -> float:
        """Detector size over size at the isocentre (DICOM EstimatedRadiographicMagnificationFactor)."""
        return self.source_to_detector_mm / self.source_to_patient_mm

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """(row, column) spacing in mm at the isocentre: the imager spacing over the magnification."""
        m = self.magnification
        return (self.imager_pixel_spacing[0] / m, self.imager_pixel_spacing[1] / m)


@dataclass(frozen=True)
class GeneratedImage:
    """One image: float32 pixels in [0, 1] (height x width), optional masks, measurements and geometry.

    Args:
        pixels: 2-D float32 array in [0, 1]; 0 is black (air), 1 is white (bone, metal).
        masks: finding id -> 2-D bool array of the same shape, where the backend knows it.
        measurements: named figures a backend measured on the image, e.g. ``cardiothoracic_ratio``.
        geometry: the simulated acquisition geometry, where the backend knows it (the drr backend);
            None for backends that know none (the DICOM then states a nominal spacing).
        anatomy_id: the CT volume the image was projected from (the drr backend), else None.
    """

    pixels: "np.ndarray"
    masks: Mapping[str, "np.ndarray"] = field(default_factory=dict)
    measurements: Mapping[str, float] = field(default_factory=dict)
    geometry: ImageGeometry | None = None
    anatomy_id: str | None = None


class Backend(Protocol):
    """What :func:`synthmed.generate` needs from an image source."""

    info: BackendInfo

    def generate(self, cases: Sequence["Case"], prompts: Sequence["Prompt"]) -> list[GeneratedImage]:
        """One image per case, in order; each a pure function of its case (and prompt)."""
        ...  # pragma: no cover


class BackendUnavailable(RuntimeError):
    """The backend named in a spec or option cannot run here (not built, or a missing extra)."""


def create_backend(spec: "DatasetSpec", *, backend: str | None = None, model: str | None = None) -> Backend:
    """Build the backend a spec asks for (``backend``/``model`` override the spec's generator)."""
    name = backend or spec.generator.backend
    from ..spec import BACKEND_VIEWS

    undrawn = [v for v in spec.view.keys if name in BACKEND_VIEWS and v not in BACKEND_VIEWS[name]]
    if undrawn:
        raise BackendUnavailable(f"the {name} backend draws {' and '.join(BACKEND_VIEWS[name])} films, not "
                                 f"{', '.join(undrawn)} (view in the spec); use --backend drr or diffusion")
    if name == "pattern":
        from ..testing import PatternBackend

        return PatternBackend(spec.image.width, spec.image.height)
    if name == "phantom":
        try:
            from .phantom import PhantomBackend
        except ImportError:  # pragma: no cover - until the phantom lands
            raise BackendUnavailable("the phantom backend is not part of this installation") from None
        from ..spec import PHANTOM_SIZE_RANGE

        lo, hi = PHANTOM_SIZE_RANGE
        if not (lo <= spec.image.width <= hi and lo <= spec.image.height <= hi):
            raise BackendUnavailable(f"the phantom backend draws {lo}..{hi} pixels a side, not "
                                     f"{spec.image.width} x {spec.image.height} (image.size in the spec)")
        return PhantomBackend(spec.image.width, spec.image.height)
    if name == "diffusion":
        return _diffusion_backend(spec, model)
    if name == "drr":
        return _drr_backend(spec)
    raise BackendUnavailable(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")


def default_model_dir():
    """Where the shipped default model lives inside the package."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "models" / "default"


def _diffusion_backend(spec: "DatasetSpec", model: str | None):
    g = spec.generator
    model = model or g.model
    if model == "default":
        path = default_model_dir()
        if not (path / "model_index.json").is_file():
            raise BackendUnavailable(
                "the shipped default model is not in this installation; set generator.model (or --model) to a local "
                "diffusers pipeline folder, or use --backend phantom")
        model_id = "synthmed-default"
    else:
        path, model_id = model, None
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"the diffusion backend needs torch, diffusers and transformers ({e.name} is missing): "
                                 "pip install 'synthmed[diffusion]'") from None
    from .diffusion import DiffusionBackend, ModelFolderError

    try:
        return DiffusionBackend(path, width=spec.image.width, height=spec.image.height, steps=g.steps,
                                guidance_scale=g.guidance_scale, scheduler=g.scheduler, dtype=g.dtype, device=g.device,
                                allow_pickle=g.allow_pickle, compile=g.compile, quantize=g.quantize,
                                coarse_to_fine=g.coarse_to_fine, threads=g.threads, model_id=model_id)
    except (ModelFolderError, ValueError) as e:  # ValueError: settings the machine cannot run (device)
        raise BackendUnavailable(str(e)) from None


def _drr_backend(spec: "DatasetSpec"):
    """The CT-derived backend, refused up front for findings or views it does not draw, or missing data."""
    from .drr import VIEWS, AnatomyMissing, DrrBackend, FindingNotDrawable, check_drawable

    try:
        check_drawable(f for c in spec.findings for f in c.findings)
    except FindingNotDrawable as e:
        raise BackendUnavailable(f"{e} (findings in the spec)") from None
    bad_views = [v for v in spec.view.keys if v not in VIEWS]
    if bad_views:
        raise BackendUnavailable(f"the drr backend draws views {', '.join(VIEWS)}, not {', '.join(bad_views)} "
                                 "(view in the spec)")
    from .drr.volumes import VolumeError

    try:
        return DrrBackend(spec.image.width, spec.image.height, volumes=spec.generator.anatomy)
    except (AnatomyMissing, VolumeError) as e:
        raise BackendUnavailable(str(e)) from None
    except ValueError as e:
        raise BackendUnavailable(f"{e} (image.size in the spec)") from None

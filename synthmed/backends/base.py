"""The backend protocol and what a backend returns: a leaf module every backend imports.

Example:
    >>> import numpy as np
    >>> GeneratedImage(np.zeros((4, 4), np.float32)).masks
    {}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..prompts import Prompt
    from ..sampler import Case


@dataclass(frozen=True)
class BackendInfo:
    """What made the images, as recorded in the manifest and the dataset card."""

    name: str
    model_id: str
    model_hash: str
    settings: Mapping[str, object] = field(default_factory=dict)
    hashed: str = "the model"  # what model_hash is a digest of, as a resume refusal names it


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

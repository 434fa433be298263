"""DICOM SEG writer: the masks of one synthetic image as a binary Segmentation, and back.

Built with highdicom (``highdicom.seg.Segmentation``), referencing the image (Source Image Sequence and
Referenced Series Sequence, by SOP Instance UID), in the image's study, a series of its own (number 3):

- BINARY, 1 bit per pixel, explicit VR little endian; frames of empty masks are left out (a reader gets
  zeros for them) unless every mask is empty;
- one segment per mask, in the backend's order: label = the finding id; Segmented Property Type = the
  finding's code (as in the SR); category Morphologically Abnormal Structure (SCT 49755003), or Physical
  Object (SCT 260787004) for support devices; Anatomic Region = the finding's site (lobe or zone, or the
  chest with the side as modifier; :mod:`synthmed.writers.coding`); tracking UID the SR's for that finding;
- algorithm type AUTOMATIC, algorithm ``synthmed <backend>/<model>``, family (99SYNTHMED, IMAGE-SYNTHESIS):
  the mask is what the generator drew, not a model's reading of the image;
- no frame of reference and no Pixel Measures (a projection radiograph has neither that a SEG can carry):
  the geometry is the referenced image's; Patient Orientation is copied from it;
- marked synthetic and deterministic as the SR is (:mod:`synthmed.writers.sr`): UIDs derived (kinds
  ``seg-series``, ``seg-instance``, ``seg-dimensions``), placeholder dates, no clock.

Example:
    >>> import numpy as np
    >>> from synthmed.sampler import Case, FindingLabel
    >>> from synthmed.writers.dicom import dicom_dataset
    >>> case = Case("case-0000001", 1, "train", 7, (FindingLabel("pneumonia", "right_lower_lobe", "mild"),))
    >>> provenance = dict(spec_hash="ab12", backend="toy", model_id="toy-1", model_hash="0", synthmed_version="0.1.0")
    >>> image = dicom_dataset(np.zeros((8, 8), np.uint16), case, iod="dx", dataset_name="demo", prompt="p",
    ...                       **provenance)
    >>> mask = np.zeros((8, 8), bool); mask[2:5, 1:4] = True
    >>> back = read_seg_masks(seg_bytes(image, case, {"pneumonia": mask}, **provenance))
    >>> list(back), bool((back["pneumonia"] == mask).all())
    (['pneumonia'], True)
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, BinaryIO, Mapping

import numpy as np

from ..vocabulary import Code, get_vocabulary
from .coding import UnknownCodeError, as_code, coded_concept, finding_of, finding_site
from .dicom import (PLACEHOLDER_DATE, PLACEHOLDER_TIME, derive_uid, finish_derived_object, image_uid_root,
                    long_string, part10_bytes, patient_id)
from .sr import finding_tracking_uid

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from ..sampler import Case

SEG_SERIES_NUMBER = 3
ABNORMAL_STRUCTURE = Code("SCT", "49755003", "Morphologically abnormal structure")
PHYSICAL_OBJECT = Code("SCT", "260787004", "Physical object")
IMAGE_SYNTHESIS = Code("99SYNTHMED", "IMAGE-SYNTHESIS", "Image synthesis (the mask is what the generator drew)")


class SEGReadError(ValueError):
    """A SEG that does not hold synthmed's masks (not a segmentation, or a code outside the vocabulary)."""


def seg_bytes(image: "Dataset", case: "Case", masks: Mapping[str, np.ndarray], *, spec_hash: str, backend: str,
              model_id: str, model_hash: str, synthmed_version: str) -> bytes:
    """A binary DICOM Segmentation of ``masks`` (finding -> 2-D bool mask) on ``image``; deterministic bytes.

    Args:
        image: the image's dataset (:func:`synthmed.writers.dicom.dicom_dataset`).
        case: the Case the image shows (its findings give each segment's site and tracking UID).
        masks: finding id -> bool (or 0/1) array of the image's (rows, columns); at least one.
        spec_hash, backend, model_id, model_hash, synthmed_version: provenance, as for the image.

    Example:
        >>> import numpy as np
        >>> from synthmed.sampler import Case, FindingLabel
        >>> from synthmed.writers.dicom import dicom_dataset
        >>> case = Case("case-0000002", 2, None, None, (FindingLabel("cardiomegaly", None, "severe"),))
        >>> kw = dict(spec_hash="h", backend="b", model_id="m", model_hash="x", synthmed_version="0.1.0")
        >>> image = dicom_dataset(np.zeros((4, 4), np.uint8), case, bits_stored=8, dataset_name="d", prompt="p", **kw)
        >>> seg_bytes(image, case, {"cardiomegaly": np.eye(4, dtype=bool)}, **kw)[128:132]
        b'DICM'
    """
    import highdicom as hd
    from pydicom.dataset import Dataset

    # 1. Check inputs
    vocab = get_vocabulary()
    if not masks:
        raise ValueError(f"`masks` of {case.case_id} is empty; a SEG needs at least one mask")
    if getattr(image, "PatientID", None) != patient_id(spec_hash, case.case_id):
        raise ValueError(f"`image` is not the image of {case.case_id} (its Patient ID is "
                         f"{getattr(image, 'PatientID', None)!r})")
    shape = (int(image.Rows), int(image.Columns))
    stack = []
    for finding, mask in masks.items():
        if finding not in vocab.findings:
            raise ValueError(f"`masks[{finding!r}]` of {case.case_id}: {finding!r} is not a finding in the vocabulary")
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"`masks[{finding!r}]` of {case.case_id} has shape {mask.shape}, the image "
                             f"{shape[0]} rows x {shape[1]} columns")
        if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
            raise ValueError(f"`masks[{finding!r}]` of {case.case_id} must be bool or 0/1, got values "
                             f"{np.unique(mask)[:5].tolist()}")
        stack.append(mask.astype(bool))
    pixels = np.stack(stack, axis=-1)[np.newaxis]  # (frames=1, rows, columns, segments)
    model = f"{backend}/{model_id}"
    root = image_uid_root(image, spec_hash)

    # 2. One segment per mask, coded as the SR codes the finding
    algorithm = hd.AlgorithmIdentificationSequence(name=long_string(f"synthmed {model}"),
                                                  family=coded_concept(IMAGE_SYNTHESIS),
                                                  version=long_string(synthmed_version))
    descriptions = []
    for number, finding in enumerate(masks, start=1):
        entry = vocab.findings[finding]
        labels = [(n, label) for n, label in enumerate(case.findings) if label.finding == finding]
        if labels:
            tracking_uid = finding_tracking_uid(root, case.case_id, labels[0][0])
            tracking_id = f"SYNTHETIC {case.case_id} finding {labels[0][0] + 1}: {finding}"
        else:  # a mask the backend drew beyond the case's findings
            tracking_uid = derive_uid(root, case.case_id, f"segment-{finding}")
            tracking_id = f"SYNTHETIC {case.case_id} segment {number}: {finding}"
        sites = list(dict.fromkeys(finding_site(label.location, vocab) for _, label in labels if label.location))
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=long_string(finding),
            segmented_property_category=coded_concept(
                PHYSICAL_OBJECT if entry.chexpert == "Support Devices" else ABNORMAL_STRUCTURE),
            segmented_property_type=coded_concept(entry.code), algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm, tracking_uid=tracking_uid, tracking_id=long_string(tracking_id),
            anatomic_regions=[coded_concept(site) for site, _ in sites] or None)
        for item, (_, side) in zip(description.get("AnatomicRegionSequence", []), sites):
            if side is not None:
                modifier = Dataset()
                modifier.CodeValue, modifier.CodingSchemeDesignator = side.code, side.system
                modifier.CodeMeaning = side.display
                item.AnatomicRegionModifierSequence = [modifier]
        descriptions.append(description)

    # 3. The segmentation, in the image's study. highdicom copies a projection image's Pixel Spacing into a Pixel
    # Measures Sequence without Slice Thickness, which its own reader (segread) then refuses: the SEG takes
    # the image's geometry by reference instead (it has no frame of reference to put it in anyway).
    source = Dataset()
    for elem in image:
        if elem.keyword not in ("PixelSpacing", "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription",
                                "PixelData"):
            source.add(elem)
    source.file_meta = image.file_meta
    description = image.get("StudyDescription", "").removeprefix("SYNTHETIC chest X-ray - ")
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=pixels, segmentation_type="BINARY", segment_descriptions=descriptions,
        series_instance_uid=derive_uid(root, case.case_id, "seg-series"), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derive_uid(root, case.case_id, "seg-instance"), instance_number=1,
        manufacturer="synthmed", manufacturer_model_name=long_string(model),
        software_versions=long_string(synthmed_version), device_serial_number="SYNTHETIC",
        omit_empty_frames=bool(pixels.any()), content_label="SYNTHETIC_MASKS",
        content_description=long_string("SYNTHETIC masks: what the generator drew; no real patient"),
        series_description=long_string(f"SYNTHETIC masks {description}"), content_date=PLACEHOLDER_DATE,
        content_time=PLACEHOLDER_TIME, series_date=PLACEHOLDER_DATE, series_time=PLACEHOLDER_TIME)

    # 4. What highdicom draws at random or leaves out for a projection image
    dimensions = derive_uid(root, case.case_id, "seg-dimensions")
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = dimensions
    if "PatientOrientation" in image:  # type 2C in General Image when there is no frame of reference
        seg.PatientOrientation = image.PatientOrientation
    finish_derived_object(seg, image, made="masks", spec_hash=spec_hash, backend=backend, model_id=model_id,
                          model_hash=model_hash, synthmed_version=synthmed_version)
    return part10_bytes(seg)


def read_seg_masks(source: "str | os.PathLike | bytes | BinaryIO") -> dict[str, np.ndarray]:
    """The masks of a SEG written by :func:`seg_bytes`: finding id -> bool array (rows, columns), in segment order.

    Args:
        source: the SEG file's path, its bytes, or an open binary file.

    Raises:
        SEGReadError: not a segmentation of one image, or a segment whose type is not a vocabulary finding.

    Example:
        >>> read_seg_masks("out/pneumonia/dicom/train/case-0000000_seg.dcm")  # doctest: +SKIP
        {'pneumonia': array([[False, ...]])}
    """
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the SEG"
    try:
        seg = hd.seg.segread(io.BytesIO(source) if isinstance(source, bytes) else source)
        (_, _, instance_uid), *others = seg.get_source_image_uids()
        if others:
            raise ValueError(f"it references {len(others) + 1} images; synthmed writes one per SEG")
        numbers = seg.get_segment_numbers()
        pixels = seg.get_pixels_by_source_instance([instance_uid], segment_numbers=numbers,
                                                   ignore_spatial_locations=True, dtype=bool)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError, InvalidDicomError) as e:
        raise SEGReadError(f"{where} is not a synthmed segmentation: {e}") from None
    masks = {}
    for k, number in enumerate(numbers):
        try:
            finding = finding_of(as_code(seg.get_segment_description(number).segmented_property_type))
        except UnknownCodeError as e:
            raise SEGReadError(f"{where}, segment {number}: {e}") from None
        masks[finding] = pixels[0, :, :, k]
    return masks

"""DICOM SR writer: the findings of one synthetic image as a TID 1500 Measurement Report, and back.

The image's labels -- what the generator was asked to draw -- as a Structured Report that a PACS, OHIF or 3D
Slicer shows beside the image, built with highdicom:

- IOD: Comprehensive 3D SR (1.2.840.10008.5.1.4.1.1.88.34), the IOD highdicom, dcmqi and OHIF use for TID 1500;
  in the image's study (same Study Instance UID, patient and placeholders), a series of its own (number 2);
- root: TID 1500 "Imaging Measurement Report", procedure reported SCT 399208008 "Plain chest X-ray", observer a
  device (TID 1004) named ``SYNTHETIC ground truth (synthmed)``;
- one TID 1501 measurement group per finding of the case, in the case's order: tracking identifier
  (``SYNTHETIC <case id> finding <n>: <finding>``, a derived UID that the SEG's segment of that finding shares),
  Finding = the finding's code, Finding Site = its location (:mod:`synthmed.writers.coding`), a qualitative
  evaluation Severity = its severity, the algorithm (TID 4019: synthmed, backend/model, version) and the image
  as the group's source (by SOP Class and Instance UID); ``no_finding`` is a group like any other;
- marked synthetic as the image is: Contributing Equipment "Synthesizing Equipment" (DCM 109100), patient
  ``SYNTHETIC^<case id>`` with Patient Identity Removed YES, Series Description starting with SYNTHETIC;
- deterministic: UIDs from :func:`synthmed.writers.dicom.derive_uid` (kinds ``sr-series``, ``sr-instance``,
  ``finding-<n>``), dates and times the image's placeholders; highdicom's clock-dependent attributes (Instance
  Creation Date/Time, its own Contribution DateTime) are removed, so the bytes depend on the inputs only.

Example:
    >>> import numpy as np
    >>> from synthmed.sampler import Case, FindingLabel
    >>> from synthmed.writers.dicom import dicom_dataset
    >>> case = Case("case-0000001", 1, "train", 7, (FindingLabel("pneumonia", "right_lower_lobe", "mild"),))
    >>> provenance = dict(spec_hash="ab12", backend="toy", model_id="toy-1", model_hash="0", synthmed_version="0.1.0")
    >>> image = dicom_dataset(np.zeros((8, 8), np.uint16), case, iod="dx", dataset_name="demo", prompt="p",
    ...                       **provenance)
    >>> read_sr_labels(sr_bytes(image, case, **provenance))
    (FindingLabel(finding='pneumonia', location='right_lower_lobe', severity='mild'),)
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, BinaryIO

from ..vocabulary import Code, get_vocabulary
from .coding import SEVERITY, UnknownCodeError, as_code, coded_concept, finding_of, finding_site, location_of, \
    severity_of
from .dicom import PLACEHOLDER_DATE, PLACEHOLDER_TIME, derive_uid, finish_derived_object, long_string, part10_bytes

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from ..sampler import Case, FindingLabel

SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SR_SERIES_NUMBER = 2
PLAIN_CHEST_XRAY = Code("SCT", "399208008", "Plain chest X-ray")
OBSERVER_NAME = "SYNTHETIC ground truth (synthmed)"


class SRReadError(ValueError):
    """An SR that does not hold synthmed's labels (not TID 1500, or a code outside the vocabulary)."""


def finding_tracking_uid(spec_hash: str, case_id: str, n: int) -> str:
    """The tracking UID of a case's ``n``-th finding (0-based), shared by its SR group and its SEG segment.

    Example:
        >>> finding_tracking_uid("ab12", "case-0000001", 0) == finding_tracking_uid("ab12", "case-0000001", 0)
        True
    """
    return derive_uid(spec_hash, case_id, f"finding-{n}")


def sr_bytes(image: "Dataset", case: "Case", *, spec_hash: str, backend: str, model_id: str, model_hash: str,
             synthmed_version: str) -> bytes:
    """A Comprehensive 3D SR (TID 1500) of ``case``'s findings, referencing ``image``; deterministic bytes.

    Args:
        image: the image's dataset (:func:`synthmed.writers.dicom.dicom_dataset`): its study, patient and
            SOP Instance UID are referenced.
        case: the Case the image shows; at least one finding.
        spec_hash, backend, model_id, model_hash, synthmed_version: provenance, as for the image.

    Example:
        >>> import numpy as np
        >>> from synthmed.sampler import Case, FindingLabel
        >>> from synthmed.writers.dicom import dicom_dataset
        >>> case = Case("case-0000002", 2, None, None, (FindingLabel("cardiomegaly", None, "severe"),))
        >>> kw = dict(spec_hash="h", backend="b", model_id="m", model_hash="x", synthmed_version="0.1.0")
        >>> image = dicom_dataset(np.zeros((4, 4), np.uint8), case, bits_stored=8, dataset_name="d", prompt="p", **kw)
        >>> sr_bytes(image, case, **kw)[128:132]
        b'DICM'
    """
    from highdicom.sr import (AlgorithmIdentification, Comprehensive3DSR, DeviceObserverIdentifyingAttributes,
                              FindingSite, MeasurementReport, MeasurementsAndQualitativeEvaluations,
                              ObservationContext, ObserverContext, QualitativeEvaluation,
                              SourceImageForMeasurementGroup, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    # 1. Check inputs
    if not case.findings:
        raise ValueError(f"`case.findings` of {case.case_id} is empty; an SR needs at least one finding "
                         "(no_finding is one)")
    if getattr(image, "PatientID", None) != case.case_id:
        raise ValueError(f"`image` is not the image of {case.case_id} (its Patient ID is "
                         f"{getattr(image, 'PatientID', None)!r})")
    vocab = get_vocabulary()
    model = f"{backend}/{model_id}"

    # 2. One measurement group per finding
    source = SourceImageForMeasurementGroup(referenced_sop_class_uid=image.SOPClassUID,
                                            referenced_sop_instance_uid=image.SOPInstanceUID)
    algorithm = AlgorithmIdentification(name=long_string(f"synthmed {model}"), version=long_string(synthmed_version))
    groups = []
    for n, label in enumerate(case.findings):
        sites = []
        if label.location is not None:
            site, side = finding_site(label.location, vocab)
            sites.append(FindingSite(coded_concept(site), laterality=coded_concept(side) if side else None))
        evaluations = []
        if label.severity is not None:
            evaluations.append(QualitativeEvaluation(coded_concept(SEVERITY),
                                                     coded_concept(vocab.severities[label.severity].code)))
        tracking = TrackingIdentifier(uid=finding_tracking_uid(spec_hash, case.case_id, n),
                                      identifier=long_string(f"SYNTHETIC {case.case_id} finding {n + 1}: {label.finding}"))
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=coded_concept(vocab.findings[label.finding].code),
            finding_sites=sites or None, qualitative_evaluations=evaluations or None, algorithm_id=algorithm,
            source_images=[source]))

    # 3. The report: observed by a device, synthmed
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid(spec_hash, "synthmed-device", model), name=OBSERVER_NAME, manufacturer_name="synthmed",
            model_name=long_string(model)))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=coded_concept(PLAIN_CHEST_XRAY), imaging_measurements=groups)

    # 4. The document, in the image's study
    description = image.get("StudyDescription", "").removeprefix("SYNTHETIC chest X-ray - ")
    sr = Comprehensive3DSR(
        evidence=[image], content=report[0], series_instance_uid=derive_uid(spec_hash, case.case_id, "sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=derive_uid(spec_hash, case.case_id, "sr-instance"),
        instance_number=1, manufacturer="synthmed", is_complete=True, is_final=True,
        series_description=long_string(f"SYNTHETIC labels {description}"), content_date=PLACEHOLDER_DATE,
        content_time=PLACEHOLDER_TIME, series_date=PLACEHOLDER_DATE, series_time=PLACEHOLDER_TIME)
    finish_derived_object(sr, image, made="labels", spec_hash=spec_hash, backend=backend, model_id=model_id,
                          model_hash=model_hash, synthmed_version=synthmed_version)
    return part10_bytes(sr)


# ----------------------------------------------------------------------------- reading

def read_sr_labels(source: "str | os.PathLike | bytes | BinaryIO") -> "tuple[FindingLabel, ...]":
    """The findings an SR written by :func:`sr_bytes` states, as FindingLabels in its order.

    Args:
        source: the SR file's path, its bytes, or an open binary file.

    Raises:
        SRReadError: not a TID 1500 report, or a code synthmed's vocabulary does not have (named).

    Example:
        >>> read_sr_labels("out/pneumonia/dicom/train/case-0000000_sr.dcm")  # doctest: +SKIP
        (FindingLabel(finding='pneumonia', location='right_lower_lobe', severity='mild'),)
    """
    from highdicom.sr import srread
    from pydicom.errors import InvalidDicomError

    from ..sampler import FindingLabel

    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the SR"
    try:
        sr = srread(io.BytesIO(source) if isinstance(source, bytes) else source)
        groups = sr.content.get_image_measurement_groups()
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError, InvalidDicomError) as e:
        raise SRReadError(f"{where} is not a TID 1500 measurement report: {e}") from None
    labels = []
    for n, group in enumerate(groups, start=1):
        try:
            if group.finding_type is None:
                raise UnknownCodeError("it has no Finding")
            finding = finding_of(as_code(group.finding_type))
            location = None
            if group.finding_sites:
                site = group.finding_sites[0]
                side = site.laterality
                location = location_of(as_code(site.value), as_code(side) if side is not None else None)
            severity = None
            for evaluation in group.get_qualitative_evaluations(name=coded_concept(SEVERITY)):
                severity = severity_of(as_code(evaluation.value))
        except UnknownCodeError as e:
            raise SRReadError(f"{where}, measurement group {n}: {e}") from None
        labels.append(FindingLabel(finding, location, severity))
    return tuple(labels)

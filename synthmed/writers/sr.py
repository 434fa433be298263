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

Speed. Building the document with highdicom costs tens of milliseconds (evidence collection, deep copies and
validation of the content tree), once per image. :func:`sr_bytes` therefore builds it with highdicom once per
*template key* -- the provenance, the findings' (finding, location, severity) tuple, the image's SOP Class and
the image attributes highdicom copies into the SR (those that vary per case by presence only) -- and keeps the
encoded bytes as a template: a tree of constant byte runs, the sequences and items whose lengths depend on the
per-case values, and slots for those values (the SR's and the image's UIDs, the tracking UIDs and identifiers,
Patient's Name, Patient ID, Study ID, Patient's Sex and Age). Later cases of the same key are the template with
their values put in the slots and the enclosing lengths recomputed: byte for byte what highdicom and pydicom
write (a template is checked against the document it was made from, and refused if any value of that case
survives outside a slot). Values a template cannot carry safely (non-ASCII text, malformed UIDs, ...) go the
highdicom way, as does everything the first time.

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

import functools
import io
import os
import re
import struct
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, BinaryIO

from ..vocabulary import Code, get_vocabulary
from .coding import SEVERITY, UnknownCodeError, as_code, coded_concept, finding_of, finding_site, location_of, \
    severity_of
from .dicom import (PLACEHOLDER_DATE, PLACEHOLDER_TIME, derive_uid, finish_derived_object, image_uid_root,
                    long_string, part10_bytes, patient_id)

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

    The first case of each template key is built with highdicom; later ones are filled into its template
    (module docstring, "Speed"), with the same bytes. Safe to call from several threads.

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
    _check_inputs(image, case, spec_hash)
    provenance = dict(spec_hash=spec_hash, backend=backend, model_id=model_id, model_hash=model_hash,
                      synthmed_version=synthmed_version)
    key = _template_key(image, case, provenance)
    values = _slot_values(image, case, spec_hash) if key is not None else None
    if values is not None:
        template = _TEMPLATES.get(key)
        if template is not None:
            return template.render(values)
    data = _sr_bytes_highdicom(image, case, **provenance)
    if values is not None:
        template = _Template.build(data, values, case.case_id)
        if template is not None:
            _TEMPLATES.put(key, template)
    return data


def _check_inputs(image: "Dataset", case: "Case", spec_hash: str) -> None:
    if not case.findings:
        raise ValueError(f"`case.findings` of {case.case_id} is empty; an SR needs at least one finding "
                         "(no_finding is one)")
    if getattr(image, "PatientID", None) != patient_id(spec_hash, case.case_id):
        raise ValueError(f"`image` is not the image of {case.case_id} (its Patient ID is "
                         f"{getattr(image, 'PatientID', None)!r})")


def _tracking_identifier(case_id: str, n: int, finding: str) -> str:
    """The Tracking Identifier text of a case's ``n``-th finding (0-based)."""
    return long_string(f"SYNTHETIC {case_id} finding {n + 1}: {finding}")


def _sr_bytes_highdicom(image: "Dataset", case: "Case", *, spec_hash: str, backend: str, model_id: str,
                        model_hash: str, synthmed_version: str) -> bytes:
    """:func:`sr_bytes` built with highdicom, every time: the reference the templates reproduce."""
    from highdicom.sr import (AlgorithmIdentification, Comprehensive3DSR, DeviceObserverIdentifyingAttributes,
                              FindingSite, MeasurementReport, MeasurementsAndQualitativeEvaluations,
                              ObservationContext, ObserverContext, QualitativeEvaluation,
                              SourceImageForMeasurementGroup, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    # 1. Check inputs
    _check_inputs(image, case, spec_hash)
    vocab = get_vocabulary()
    model = f"{backend}/{model_id}"
    root = image_uid_root(image, spec_hash)

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
        tracking = TrackingIdentifier(uid=finding_tracking_uid(root, case.case_id, n),
                                      identifier=_tracking_identifier(case.case_id, n, label.finding))
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
        evidence=[image], content=report[0], series_instance_uid=derive_uid(root, case.case_id, "sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=derive_uid(root, case.case_id, "sr-instance"),
        instance_number=1, manufacturer="synthmed", is_complete=True, is_final=True,
        series_description=long_string(f"SYNTHETIC labels {description}"), content_date=PLACEHOLDER_DATE,
        content_time=PLACEHOLDER_TIME, series_date=PLACEHOLDER_DATE, series_time=PLACEHOLDER_TIME)
    finish_derived_object(sr, image, made="labels", spec_hash=spec_hash, backend=backend, model_id=model_id,
                          model_hash=model_hash, synthmed_version=synthmed_version)
    return part10_bytes(sr)


# ----------------------------------------------------------------------------- templates
#
# What an SR depends on, besides the per-case values in slots: the provenance, the findings' shape, and the
# image attributes highdicom reads -- the root attributes of the image IOD's Patient and Study modules (what
# ``copy_patient_and_study_information`` copies), what ``ContributingEquipment.for_image_acquisition`` reads,
# the character set and the evidence UIDs. Those attributes go into the template key by value, except the
# ones that fill slots, which go in by presence (and VR).
#
# Keep this in step with _sr_bytes_highdicom: anything else of the case or the image that it comes to use
# must join the key (_template_key) or become a slot (_slot_values). tests/writers/test_sr.py compares the two
# ways byte for byte over cases that differ in everything else (split, seed, view, geometry, prompt, ...).

# The image attributes whose values fill slots: keyword -> slot name. The UIDs can be anywhere in the SR
# (evidence, content tree, file meta): their slots are found by value. The others are copied to the SR's
# top level: their slots are found by tag there (values like "F" or "058Y" are too short to find by value).
_UID_ATTRIBUTES = {"StudyInstanceUID": "study", "SeriesInstanceUID": "image-series",
                   "SOPInstanceUID": "image-instance"}
_TOP_LEVEL_ATTRIBUTES = {"PatientName": "PatientName", "PatientID": "PatientID", "StudyID": "StudyID",
                         "PatientSex": "PatientSex", "PatientAge": "PatientAge"}
_EXTRA_DEPENDENCIES = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
                       "StudyInstanceUID", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
                       "DeviceSerialNumber", "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress",
                       "StationName", "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime",
                       "PatientIdentityRemoved", "DeidentificationMethod", "PatientAge", "StudyDescription",
                       "ReferringPhysicianName", "AccessionNumber", "StudyDate", "StudyTime", "PatientBirthDate")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but backslash: encodes the same in every charset
_AGE = re.compile(r"[0-9]{3}[DWMY]")
_TEMPLATE_CACHE_SIZE = 256


@functools.lru_cache(maxsize=16)
def _dependency_tags(sop_class_uid: str) -> "tuple[frozenset[int], frozenset[int]] | None":
    """(tags of the image attributes an SR of an image of this SOP class depends on, those of them that fill
    slots), or None when highdicom does not know the SOP class."""
    from pydicom.datadict import tag_for_keyword

    try:
        from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

        iod = get_sop_class_iod_map()[sop_class_uid]
        keywords = set(_EXTRA_DEPENDENCIES)
        for module in get_iod_module_map()[iod]:
            if module["ie"] in ("Patient", "Study"):
                keywords.update(str(item["keyword"]) for item in get_module_attribute_map()[module["key"]]
                                if len(item["path"]) == 0)
    except (ImportError, KeyError, TypeError):
        return None
    tags = frozenset(t for t in map(tag_for_keyword, keywords) if t is not None)
    slots = frozenset(tag_for_keyword(k) for k in (*_UID_ATTRIBUTES, *_TOP_LEVEL_ATTRIBUTES))
    return tags, slots


def _hashable(value):
    """An image attribute's value as part of a template key, or raise TypeError (sequences, bytes, ...)."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import PersonName

    if value is None or isinstance(value, (str, int, float)):
        return type(value).__name__, str(value)
    if isinstance(value, PersonName):
        return "PN", str(value)
    if isinstance(value, (MultiValue, list, tuple)):
        return "MV", tuple(_hashable(v) for v in value)
    raise TypeError(f"not a template key value: {type(value).__name__}")


def _template_key(image: "Dataset", case: "Case", provenance: dict) -> tuple | None:
    """What the SR of ``case`` depends on besides its slot values; None where a template cannot be used."""
    try:
        if not all(isinstance(v, str) for v in provenance.values()):
            return None
        shape = tuple((label.finding, label.location, label.severity) for label in case.findings)
        sop_class = image.get("SOPClassUID")
        dependencies = _dependency_tags(str(sop_class)) if isinstance(sop_class, str) else None
        if dependencies is None:
            return None
        tags, slot_tags = dependencies
        parts = []
        for tag in sorted(t for t in image.keys() if t in tags):
            elem = image[tag]
            parts.append((tag, elem.VR) if tag in slot_tags else (tag, elem.VR, _hashable(elem.value)))
        key = (tuple(provenance.items()), shape, str(sop_class), tuple(parts))
        hash(key)
    except (TypeError, AttributeError, KeyError):
        return None
    return key


def _slot_values(image: "Dataset", case: "Case", spec_hash: str) -> dict[str, str] | None:
    """The values of a case's slots; None where one is not plain enough to be written the way pydicom would
    (then the case goes the highdicom way)."""
    from pydicom.valuerep import PersonName

    root = image_uid_root(image, spec_hash)
    values = {"sr-instance": derive_uid(root, case.case_id, "sr-instance"),
              "sr-series": derive_uid(root, case.case_id, "sr-series")}
    for n, label in enumerate(case.findings):
        values[f"tracking-uid-{n}"] = finding_tracking_uid(root, case.case_id, n)
        values[f"tracking-text-{n}"] = _tracking_identifier(case.case_id, n, label.finding)
    for keyword, name in _UID_ATTRIBUTES.items():
        value = image.get(keyword)
        if not isinstance(value, str) or len(value) > 64 or not _UID.fullmatch(value):
            return None
        values[name] = str(value)
    for keyword, name in _TOP_LEVEL_ATTRIBUTES.items():
        if keyword in image:
            value = image[keyword].value
            if not isinstance(value, (str, PersonName)):
                return None
            values[name] = str(value)
    if not all(_PLAIN.fullmatch(v) for v in values.values()):
        return None
    # what highdicom and pydicom would refuse or warn about goes their way, to refuse or warn the same
    name, sex, age = values.get("PatientName"), values.get("PatientSex"), values.get("PatientAge")
    if (name is None or (name and "^" not in name) or len(name) > 64 or sex not in ("", "M", "F", "O")
            or len(values.get("PatientID", "")) > 64 or len(values.get("StudyID", "")) > 16
            or (age is not None and not _AGE.fullmatch(age))
            or any(len(v) > 64 for k, v in values.items() if k.startswith("tracking-text-"))):
        return None
    return values


class _Unsupported(ValueError):
    """The encoded SR has something a template does not model (undefined lengths, an odd VR in a slot)."""


_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_SLOT_VRS = frozenset((b"UI", b"LO", b"SH", b"PN", b"CS", b"AS", b"LT", b"ST", b"UT", b"UC"))
_ITEM = b"\xfe\xff\x00\xe0"
_GROUP_LENGTH_HEADER = b"\x02\x00\x00\x00UL\x04\x00"
_TOP_LEVEL_SLOTS = {0x00100010: "PatientName", 0x00100020: "PatientID", 0x00200010: "StudyID",
                    0x00100040: "PatientSex", 0x00101010: "PatientAge"}


class _Slot:
    """An element whose value is a case's: its tag and VR, and how its value is padded."""
    __slots__ = ("name", "prefix", "long", "pad")

    def __init__(self, name: str, prefix: bytes, vr: bytes):
        self.name, self.prefix, self.long = name, prefix, vr in _LONG_VRS
        self.pad = b"\x00" if vr == b"UI" else b" "

    def encode(self, value: str) -> bytes:
        data = value.encode("ascii")
        if len(data) % 2:
            data += self.pad
        length = struct.pack("<I", len(data)) if self.long else struct.pack("<H", len(data))
        return self.prefix + length + data


class _Sequence:
    """A sequence with a slot in some item: its header (tag, VR, reserved bytes) and items (lists of parts)."""
    __slots__ = ("prefix", "items")

    def __init__(self, prefix: bytes, items: tuple):
        self.prefix, self.items = prefix, items


def _render(parts, values: dict[str, str]) -> bytes:
    out = []
    for part in parts:
        if type(part) is bytes:
            out.append(part)
        elif type(part) is _Slot:
            out.append(part.encode(values[part.name]))
        else:
            items = [_render(item, values) for item in part.items]
            body = b"".join(_ITEM + struct.pack("<I", len(item)) + item for item in items)
            out.append(part.prefix + struct.pack("<I", len(body)) + body)
    return b"".join(out)


def _merge(parts: list) -> tuple:
    """Adjacent constant runs joined, as a tuple (templates are shared between threads, never changed)."""
    merged: list = []
    for part in parts:
        if type(part) is bytes and merged and type(merged[-1]) is bytes:
            merged[-1] += part
        else:
            merged.append(part)
    return tuple(merged)


def _parse(data: bytes, start: int, end: int, by_value: dict, top_level: bool, found: set) -> list:
    """The elements of an explicit VR little endian dataset in ``data[start:end]``, as template parts."""
    parts = []
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise _Unsupported("truncated element header")
        tag_bytes = data[pos:pos + 4]
        group, element = struct.unpack("<HH", tag_bytes)
        vr = data[pos + 4:pos + 6]
        if group == 0xFFFE:
            raise _Unsupported("an item or delimiter outside a sequence")
        if vr in _LONG_VRS:
            if data[pos + 6:pos + 8] != b"\x00\x00":
                raise _Unsupported("reserved bytes not zero")
            (length,), header = struct.unpack("<I", data[pos + 8:pos + 12]), 12
        else:
            (length,), header = struct.unpack("<H", data[pos + 6:pos + 8]), 8
        if length == 0xFFFFFFFF:
            raise _Unsupported("undefined length")
        value_start, value_end = pos + header, pos + header + length
        if value_end > end:
            raise _Unsupported("value past its dataset")
        tag = (group << 16) | element
        if vr == b"SQ":
            items = []
            at = value_start
            while at < value_end:
                if data[at:at + 4] != _ITEM:
                    raise _Unsupported("not an item in a sequence")
                (item_length,) = struct.unpack("<I", data[at + 4:at + 8])
                if item_length == 0xFFFFFFFF or at + 8 + item_length > value_end:
                    raise _Unsupported("item of undefined length or past its sequence")
                items.append(_merge(_parse(data, at + 8, at + 8 + item_length, by_value, False, found)))
                at += 8 + item_length
            if all(len(item) <= 1 and all(type(p) is bytes for p in item) for item in items):
                parts.append(data[pos:value_end])
            else:
                parts.append(_Sequence(tag_bytes + b"SQ\x00\x00", tuple(items)))
        else:
            name = _TOP_LEVEL_SLOTS.get(tag) if top_level else None
            if name is None:
                name = by_value.get((vr, data[value_start:value_end]))
            if name is None:
                parts.append(data[pos:value_end])
            else:
                if vr not in _SLOT_VRS:
                    raise _Unsupported(f"slot {name} in an element of VR {vr!r}")
                parts.append(_Slot(name, data[pos:pos + (8 if vr in _LONG_VRS else 6)], vr))
                found.add(name)
        pos = value_end
    return parts


def _constants(parts):
    for part in parts:
        if type(part) is bytes:
            yield part
        elif type(part) is _Sequence:
            for item in part.items:
                yield from _constants(item)


class _Template:
    """An encoded SR as constant byte runs, sequences whose lengths depend on slot values, and slots."""
    __slots__ = ("preamble", "meta", "body")

    def __init__(self, preamble: bytes, meta: tuple, body: tuple):
        self.preamble, self.meta, self.body = preamble, meta, body

    def render(self, values: dict[str, str]) -> bytes:
        meta = _render(self.meta, values)
        return b"".join((self.preamble, _GROUP_LENGTH_HEADER, struct.pack("<I", len(meta)), meta,
                         _render(self.body, values)))

    @classmethod
    def build(cls, data: bytes, values: dict[str, str], case_id: str) -> "_Template | None":
        """The template of the SR ``data`` whose slots held ``values``; None if it would not give the bytes
        highdicom writes for every other case of its key (checked as far as ``data`` shows)."""
        by_value: dict = {}
        for name, value in values.items():
            if name in _TOP_LEVEL_SLOTS.values():
                continue
            encoded = value.encode("ascii")
            for vr in _SLOT_VRS:
                padded = encoded + (b"\x00" if vr == b"UI" else b" ") if len(encoded) % 2 else encoded
                if by_value.setdefault((vr, padded), name) != name:
                    return None  # two slots with one value: which is which cannot be told
        found: set = set()
        try:
            if data[128:132] != b"DICM" or data[132:140] != _GROUP_LENGTH_HEADER:
                raise _Unsupported("no file meta group length")
            (meta_length,) = struct.unpack("<I", data[140:144])
            meta = _merge(_parse(data, 144, 144 + meta_length, by_value, False, found))
            body = _merge(_parse(data, 144 + meta_length, len(data), by_value, True, found))
        except (_Unsupported, struct.error):
            return None
        template = cls(data[:128 + 4], meta, body)
        if found != set(values):
            return None  # a value that is nowhere, or a slot for an attribute the image does not have
        # no value of this case may survive outside the slots: it would be another case's too
        survivors = [v.encode("ascii") for v in (*values.values(), case_id) if len(v) >= 8]
        for run in (*_constants(meta), *_constants(body)):
            if any(v in run for v in survivors):
                return None
        if template.render(values) != data:
            return None
        return template


class _TemplateCache:
    """A small least-recently-used map of template key -> template, safe across threads."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._templates: OrderedDict = OrderedDict()

    def get(self, key) -> _Template | None:
        with self._lock:
            template = self._templates.get(key)
            if template is not None:
                self._templates.move_to_end(key)
            return template

    def put(self, key, template: _Template) -> None:
        with self._lock:
            self._templates[key] = template
            self._templates.move_to_end(key)
            while len(self._templates) > self.size:
                self._templates.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._templates.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._templates)


_TEMPLATES = _TemplateCache(_TEMPLATE_CACHE_SIZE)


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
